"""omnimem: per-head sparse retrieval over the full KV history of autoregressive video models."""

from omnimem.api import resolve_backend, select_blocks, sparse_attention, use_backend
from omnimem.causal_wan import patch_causal_wan, unpatch_causal_wan
from omnimem.config import GatedConfig, OmniMemConfig
from omnimem.gated.attention import gated_attention, select_group_blocks
from omnimem.gated.cache import GatedCache
from omnimem.gated.selection import GroupSelection
from omnimem.gated.wan import GatedWanSelfAttention
from omnimem.integration import cached_attention
from omnimem.pooling import PooledKV, pool_kv
from omnimem.selection import Selection
from omnimem.sizing import kv_cache_bytes
from omnimem.sparse.cache import OmniMemCache

__all__ = [
    "GatedCache",
    "GatedConfig",
    "GatedWanSelfAttention",
    "GroupSelection",
    "OmniMemCache",
    "OmniMemConfig",
    "PooledKV",
    "Selection",
    "cached_attention",
    "gated_attention",
    "kv_cache_bytes",
    "patch_causal_wan",
    "pool_kv",
    "resolve_backend",
    "select_blocks",
    "select_group_blocks",
    "sparse_attention",
    "unpatch_causal_wan",
    "use_backend",
]
__version__ = "0.1.0"
