"""The gated path, the authors' three-branch layer, over the store (``omnimem.store``):
``gated_attention`` (``attention.py``), its per-group selection (``selection.py``), its cache
(``cache.py``) and tiers (``offload.py``), and the Wan layer that runs it (``wan.py``)."""

from omnimem.gated.attention import gated_attention, select_group_blocks
from omnimem.gated.cache import GatedCache
from omnimem.gated.selection import GroupSelection
from omnimem.gated.wan import GatedWanSelfAttention

__all__ = ["GatedCache", "GatedWanSelfAttention", "GroupSelection", "gated_attention", "select_group_blocks"]
