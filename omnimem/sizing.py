"""How much memory a cache needs: ``kv_cache_bytes`` (docs/tuning.md, "Sizing")."""

from __future__ import annotations

import math

import torch

from omnimem.config import GatedConfig, OmniMemConfig
from omnimem.selection import RetrievalRules
from omnimem.store.formats import check_kv_format, token_bytes
from omnimem.store.index import check_index_format


def kv_cache_bytes(
    capacity: int,
    *,
    num_kv_heads: int,
    head_dim: int,
    batch: int = 1,
    layers: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    config: OmniMemConfig | GatedConfig | None = None,
    max_chunk_tokens: int = 0,
    offload: bool = False,
    kv_format: str = "native",
    index_format: str = "float32",
) -> int:
    """Bytes the caches of ``layers`` attention layers allocate on their device.

    With an ``OmniMemConfig`` (or ``None``): ``OmniMemCache`` buffers of ``capacity +
    max_chunk_tokens`` tokens of keys and values plus one float32 key sum per block; with
    ``offload=True``, what an offloaded one keeps on the device instead: the sums and its
    staging buffers (the history itself is in host memory). With a
    ``GatedConfig``: ``GatedCache`` buffers of ``capacity`` tokens plus, per block, one float32
    mean key and one mean key and value in ``dtype``; with ``offload=True``, the block means
    and the live region (``max(window_tokens, max_chunk_tokens) + block_size`` tokens).

    ``kv_format`` (``"native"``, ``"fp8"``, ``"int4"``; ``omnimem.store.formats``): the history's
    keys and values at that format's bytes per token, scales included (``token_bytes``); the
    chunk being written, the block sums and means stay in their own dtypes; a quantized
    ``GatedCache`` keeps its live region natively too (offloaded: with a scratch and a staging
    store); a quantized ``OmniMemCache`` keeps two quantized staging stores, the last commit's
    blocks quantized and the native tail (partial block and chunk), beside the history (in
    host memory when offloaded).

    ``index_format`` (``OmniMemCache`` only): ``"int8"`` counts the block sums as one byte a
    channel plus a float32 step per block (``omnimem.store.index.Int8BlockSums``).

    Example (what a minute of history adds to one layer, Wan2.1-1.3B, 128-token blocks):
        >>> from omnimem import kv_cache_bytes
        >>> sizes = dict(num_kv_heads=12, head_dim=128, dtype=torch.bfloat16, max_chunk_tokens=4680)
        >>> minute = 240 * 1560
        >>> def added(f):
        ...     one, two = (kv_cache_bytes(n * minute, **sizes, kv_format=f) for n in (1, 2))
        ...     return two - one
        >>> [round(added(f) / added("native"), 3) for f in ("fp8", "int4")]
        [0.504, 0.271]
    """
    sizes = dict(
        capacity=capacity, num_kv_heads=num_kv_heads, head_dim=head_dim, batch=batch, layers=layers,
        max_chunk_tokens=max_chunk_tokens,
    )  # fmt: skip
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TypeError(f"{name} must be a non-negative int, got {value!r}")
    if not isinstance(offload, bool):
        raise TypeError(f"offload must be a bool, got {type(offload).__name__}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    check_kv_format(kv_format)
    check_index_format(index_format)
    itemsize = torch.empty((), dtype=dtype).element_size()

    def history(tokens: int, block_size: int) -> int:
        """Keys and values of ``tokens`` history tokens in ``kv_format`` (whole blocks' scales)."""
        if kv_format == "native":
            return 2 * tokens * row * itemsize
        blocks = math.ceil(tokens / block_size)
        per = token_bytes(kv_format, head_dim=head_dim, block_size=block_size, itemsize=itemsize)
        return math.ceil(per * blocks * block_size * batch * num_kv_heads)

    row = batch * num_kv_heads * head_dim  # elements of one token (or one block summary)
    if isinstance(config, GatedConfig):
        if index_format != "float32":
            raise ValueError(
                "index_format applies to OmniMemCache (an OmniMemConfig); GatedCache keeps block means"
            )
        blocks = math.ceil(capacity / config.block_size)
        means = blocks * row * (4 + 2 * itemsize)
        live = min(capacity, max(config.window_tokens, max_chunk_tokens) + config.block_size)
        live = 2 * live * row * itemsize  # the live region, native on the device (omnimem.gated.offload)
        if offload and kv_format != "native":  # quantized on the device, staged from the host
            scratch = history(max_chunk_tokens + 2 * config.block_size, config.block_size)
            staged = history(staged_slots(config, max_chunk_tokens) * config.block_size, config.block_size)
            per_layer = live + means + scratch + staged
        elif offload:
            per_layer = live + means
        elif kv_format != "native":  # quantized blocks beneath the live region
            per_layer = history(capacity, config.block_size) + live + means
        else:
            per_layer = history(capacity, config.block_size) + means
    elif config is None or isinstance(config, OmniMemConfig):
        config = config or OmniMemConfig()
        length = capacity + max_chunk_tokens
        sum_blocks = math.ceil(length / config.block_size)
        sums = sum_blocks * row * 4
        if index_format == "int8":
            sums = sum_blocks * (row + 4 * batch * num_kv_heads)
        staged, work, fresh = staging_sizes(config, length, max_chunk_tokens)
        staging = (4 * work + 2 * fresh) * row * itemsize  # two work pairs, one fresh pair
        if kv_format != "native":
            # Native: the tail of both work pairs ([partial | chunk]) and the fresh pair;
            # quantized: two staging stores, the last commit's blocks, and (resident) the history.
            tail = work - staged * config.block_size
            native = (4 * tail + 2 * fresh) * row * itemsize
            per_layer = sums + native + 2 * history(staged * config.block_size, config.block_size)
            per_layer += history(fresh, config.block_size)
            if not offload:
                per_layer += history(capacity, config.block_size)
        elif offload:
            per_layer = sums + staging
        else:
            per_layer = 2 * length * row * itemsize + sums
    else:
        raise TypeError(f"config must be an OmniMemConfig or a GatedConfig, got {type(config).__name__}")
    return layers * per_layer


def host_history_bytes(
    capacity: int, *, kv_format: str, num_kv_heads: int, head_dim: int, batch: int, block_size: int
) -> int:
    """Host bytes of an offloaded quantized ``OmniMemCache``'s history: ``capacity`` tokens in
    whole blocks at the format's bytes, scales included."""
    per_token = token_bytes(kv_format, head_dim=head_dim, block_size=block_size)
    return math.ceil(per_token * math.ceil(capacity / block_size) * block_size * batch * num_kv_heads)


def staged_slots(config, max_chunk_tokens: int) -> int:
    """Slots of an offloaded quantized ``GatedCache``'s staging store: the union of every
    query group's ``top_k`` blocks."""
    return math.ceil(max_chunk_tokens / config.query_group_size) * config.top_k


def staging_sizes(config, length: int, max_chunk_tokens: int) -> tuple[int, int, int]:
    """``(staged blocks, work buffer tokens, fresh buffer tokens)`` of an offloaded cache whose
    buffers span ``length`` tokens: what it keeps on the device besides the block sums (two
    work buffers and one fresh buffer, each for keys and for values)."""
    bs = config.block_size
    num_blocks = math.ceil(length / bs)
    groups = math.ceil(max_chunk_tokens / config.query_group_size) if config.query_group_size else 1
    width = RetrievalRules.from_config(config).table_width(num_blocks)
    num_staged = min(num_blocks, groups * width)  # the union of every group's row
    return num_staged, num_staged * bs + bs + max_chunk_tokens, (math.ceil(max_chunk_tokens / bs) + 1) * bs
