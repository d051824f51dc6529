"""The sparse path's autoregressive cache over the store (``omnimem.store``): ``OmniMemCache``
(``cache.py``) and its offloaded and quantized tiers (``offload.py``), which call
``omnimem.sparse_attention``."""

from omnimem.sparse.cache import OmniMemCache

__all__ = ["OmniMemCache"]
