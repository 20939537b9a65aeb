"""infercache: cheaper transformer inference by managing its caches.

Pillars: ``compress`` (KV-cache compression policies), ``reuse`` (prefix/chunk KV reuse on a tiered store),
``stream`` (bounded memory for endless streams), ``diffusion`` (step-level feature caching) and ``bench``.
"""

__version__ = "0.1.0"
