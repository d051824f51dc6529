"""The history's storage beneath both caches (docs/memory.md): its formats (``formats.py``: native,
fp8, int4; ``blocks.py``: ``QuantizedBlocks``), its tiers (``tiers.py``: device, ``host.py``,
``disk.py``) and the staging of a call's blocks between them (``staging.py``). The sparse path
(``omnimem.sparse``) and the gated path (``omnimem.gated``) are siblings over it."""
