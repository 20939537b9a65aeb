"""The measuring stick: task generators (``bench.tasks``), fidelity metrics (``bench.metrics``)."""
