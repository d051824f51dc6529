"""omnimem: per-head sparse retrieval over the full KV history of autoregressive video models."""

from omnimem.api import resolve_backend, select_blocks, sparse_attention, use_backend
from omnimem.cache import OmniMemCache
from omnimem.config import OmniMemConfig
from omnimem.integration import cached_attention
from omnimem.selection import Selection

__all__ = [
    "OmniMemCache",
    "OmniMemConfig",
    "Selection",
    "cached_attention",
    "resolve_backend",
    "select_blocks",
    "sparse_attention",
    "use_backend",
]
__version__ = "0.1.0"
