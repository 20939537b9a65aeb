"""infercache: cheaper transformer inference by managing its caches.

Pillars: ``compress`` (KV-cache compression policies), ``reuse`` (prefix/chunk KV reuse on a tiered store),
``stream`` (bounded memory for endless streams), ``diffusion`` (step-level feature caching) and ``bench``.
"""

from .compress import PROTOCOLS, UnsupportedModelError, compress, compressed_cache, generate, methods
from .policies import UnknownMethodError

__version__ = "0.1.0"

__all__ = ["PROTOCOLS", "compress", "compressed_cache", "generate", "methods", "UnknownMethodError", "UnsupportedModelError", "__version__"]
