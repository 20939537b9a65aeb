"""Other KV-compression libraries run as benchmark peers on the very same inputs as infercache.

Each peer lives in its own virtualenv (its pins clash with ours) and is driven through a
subprocess: see :mod:`.kvpress` and ``docs/peers.md``.
"""
