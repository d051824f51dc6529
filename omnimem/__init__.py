"""omnimem: per-head sparse retrieval over the full KV history of autoregressive video models."""

from omnimem.api import resolve_backend, select_blocks, sparse_attention, use_backend
from omnimem.config import OmniMemConfig
from omnimem.selection import Selection

__all__ = [
    "OmniMemConfig",
    "Selection",
    "resolve_backend",
    "select_blocks",
    "sparse_attention",
    "use_backend",
]
__version__ = "0.1.0"
