"""FlexAttention backend: a ``BlockMask`` built from the selection table plus an exact ``mask_mod``.

Compiled, FlexAttention visits only the 128x128 tiles of the table: key tiles that every query
of a 128-query tile attends in full are "full" (no mask evaluation); tiles attended in part
(partial history blocks, blocks some query groups skip, the chunk's edges, retrieval blocks
smaller than a tile) are "partial" tiles whose tokens the ``mask_mod`` decides. Eager
FlexAttention ignores block sparsity and applies the ``mask_mod`` to every key, so the
``mask_mod`` alone encodes the whole contract: both modes are exact. ``history_len`` reaches
the kernel as a tensor captured by the ``mask_mod`` and every table has a static shape, so a
growing history in a preallocated buffer never recompiles.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from omnimem.compile import compile_static
from omnimem.config import OmniMemConfig
from omnimem.selection import Selection, attended_blocks, compact_indices, token_mask_mod

TILE = 128  # FlexAttention's query and key tile (tokens)

# torch 2.11 and 2.13 differ in small ways; probe once instead of pinning a version.
_HAS_RETURN_AUX = "return_aux" in inspect.signature(flex_attention).parameters
_HAS_COMPUTE_Q_BLOCKS = "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters
if _HAS_RETURN_AUX:
    from torch.nn.attention.flex_attention import AuxRequest


@functools.cache
def compiled_flex_attention():
    """The process-wide compiled ``flex_attention`` (static shapes; compiled once per shape).

    ``fullgraph``: an exhausted recompile budget must fail loudly, never fall back to eager
    FlexAttention (dense scores: hundreds of GiB at video lengths).
    """
    return compile_static(flex_attention, fullgraph=True)


@functools.cache
def _kernel_options(device: torch.device) -> dict | None:
    # Hopper and newer: TMA loads measured ~3.5% faster at wan-1.3b 60 s (docs/benchmarks.md);
    # FlexAttention itself falls back to plain loads where the inputs do not allow TMA.
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        return {"USE_TMA": True}
    return None


def block_mask_tables(
    kv_block_idx: torch.Tensor,
    history_len: torch.Tensor,
    *,
    num_blocks: int,
    block_size: int,
    query_group_size: int,
    num_q_heads: int,
    q_len: int,
    kv_len: int,
    chunk_len: int,
    tile: int = TILE,
) -> tuple[torch.Tensor, ...]:
    """Dense attended blocks and the partial/full tile tables of a FlexAttention BlockMask.

    FlexAttention tiles are ``TILE x TILE`` tokens whatever the retrieval ``block_size`` (its
    compiled GPU kernel needs tiles divisible by its own, and 128 is its tuned size). A key
    tile is *full* for a query tile when every query group of the query tile attends all of its
    tokens, and must be *visited* when any of them attends any token.

    Returns ``(block_attended [B, Hkv, G, NB], kv_num_blocks, kv_indices, full_kv_num_blocks,
    full_kv_indices)``; the last four are ``[B, Hq, ceil(q_len/tile)(, ceil(kv_len/tile))]`` int32.
    ``tile`` exists for tests; FlexAttention gets ``TILE``.
    """
    block_attended = attended_blocks(kv_block_idx, num_blocks)
    device = block_attended.device
    num_kv_tiles = math.ceil(kv_len / tile)
    num_q_tiles = math.ceil(q_len / tile)

    # Attended tokens of each KV tile, per (batch, KV head, query group).
    token = torch.arange(num_kv_tiles * tile, device=device)
    in_history = token < history_len
    in_chunk = ~in_history & (token < history_len + chunk_len)
    block_of_token = (token // block_size).clamp(max=num_blocks - 1)
    token_attended = (block_attended[..., block_of_token] & in_history) | in_chunk
    attended_count = token_attended.unflatten(-1, (num_kv_tiles, tile)).sum(-1, dtype=torch.int32)
    any_attended, all_attended = attended_count > 0, attended_count == tile

    num_groups = block_attended.shape[2]
    if num_groups == 1:
        visit = any_attended.expand(-1, -1, num_q_tiles, -1)
        full = all_attended.expand(-1, -1, num_q_tiles, -1)
    else:
        tile_first = torch.arange(num_q_tiles, device=device) * tile
        tile_last = (tile_first + tile).clamp(max=q_len) - 1
        group = torch.arange(num_groups, device=device)
        first_group, last_group = tile_first // query_group_size, tile_last // query_group_size
        member = ((group >= first_group[:, None]) & (group <= last_group[:, None])).float()
        visit = torch.einsum("mg,bhgj->bhmj", member, any_attended.float()) > 0
        full = torch.einsum("mg,bhgj->bhmj", member, all_attended.float()) == member.sum(-1)[:, None]
    partial = visit & ~full

    heads_per_kv = num_q_heads // block_attended.shape[1]
    if heads_per_kv > 1:
        full = full.repeat_interleave(heads_per_kv, dim=1)
        partial = partial.repeat_interleave(heads_per_kv, dim=1)
    # Pad with tile 0, not -1: FlexAttention may prefetch one entry past the count.
    kv_num_blocks, kv_indices = compact_indices(partial, num_kv_tiles, pad=0)
    full_kv_num_blocks, full_kv_indices = compact_indices(full, num_kv_tiles, pad=0)
    return block_attended, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices


@functools.cache
def _compiled_block_mask_tables():
    return compile_static(block_mask_tables)


def build_block_mask(
    selection: Selection,
    *,
    num_q_heads: int,
    q_len: int,
    kv_len: int,
    chunk_len: int,
    compiled: bool = False,
    for_backward: bool = False,
) -> BlockMask:
    """The ``BlockMask`` (with its exact ``mask_mod``) of ``selection`` over ``[q_len, kv_len]``.

    ``compiled`` builds the tables through ``torch.compile`` (worth it on GPUs, where the eager
    version is launch-bound). ``for_backward`` also builds the transposed (query-block) tables
    that compiled FlexAttention's backward walks; inference skips them.
    """
    tables = _compiled_block_mask_tables() if compiled else block_mask_tables
    block_attended, *kv_tables = tables(
        selection.kv_block_idx,
        selection.history_len,
        num_blocks=selection.num_history_blocks,
        block_size=selection.block_size,
        query_group_size=selection.query_group_size,
        num_q_heads=num_q_heads,
        q_len=q_len,
        kv_len=kv_len,
        chunk_len=chunk_len,
    )
    mask_mod = token_mask_mod(
        selection, num_q_heads=num_q_heads, chunk_len=chunk_len, block_attended=block_attended
    )
    extra = {"compute_q_blocks": for_backward} if _HAS_COMPUTE_Q_BLOCKS else {}
    return BlockMask.from_kv_blocks(
        *kv_tables,
        BLOCK_SIZE=(TILE, TILE),
        mask_mod=mask_mod,
        seq_lengths=(q_len, kv_len),
        **extra,
    )


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: Selection,
    *,
    chunk_len: int,
    scale: float,
    return_lse: bool,
    config: OmniMemConfig,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    num_q_heads = q.shape[1]
    wants_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if wants_grad and q.device.type != "cuda":
        raise ValueError(
            "the flex backend has no backward on CPU (torch's FlexAttention): use backend='gather' "
            "or backend='dense' for autograd there"
        )
    # Compiled CPU FlexAttention cannot return the log-sum-exp; the eager path is exact too.
    compiled = config.compile and not (return_lse and q.device.type == "cpu")
    if compiled:
        _check_compiled_inputs(q, k, v)
        k, v = keys_padded_for_cpu_template(k, v)
    block_mask = build_block_mask(
        selection,
        num_q_heads=num_q_heads,
        q_len=q.shape[2],
        kv_len=k.shape[2],
        chunk_len=chunk_len,
        compiled=compiled and q.device.type == "cuda",
        for_backward=wants_grad,
    )
    if q.device.type == "cpu":
        v = unattended_values_zeroed(v, selection, chunk_len=chunk_len)
    return attend(q, k, v, block_mask, scale=scale, return_lse=return_lse, compiled=compiled)


def keys_padded_for_cpu_template(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``k, v`` padded with zeros where compiled CPU FlexAttention would miscompute them.

    Inductor's C++ FlexAttention template (torch 2.11-2.13) computes ``q @ k.T`` in column
    blocks of 16 keys; for head dims below 24 its tail block treats 8 leftover keys as 16 on
    AVX2 (8-float vectors), reading 8 keys past the tile and writing 8 scores past the row.
    With one key tile (``kv_len < 128``, the tile) the last row's spill lands on the running
    row maxima and every query goes wrong (measured on AVX2: every kv_len of 8 mod 16 below
    128 wrong, every other length right; AVX-512 right); in a last tile of a longer buffer the
    spill is overwritten or lands in scratch, but the reads still pass the tensor's end. So a
    buffer of such head dims is padded to whole 16-key blocks and to at least one full tile;
    the padded keys lie past the chunk, where no query attends. Head dims of 24 and more take
    another code path and are never copied.
    """
    length, head_dim = k.shape[2], k.shape[3]
    padded = max(TILE, -(-length // 16) * 16)
    if k.device.type != "cpu" or head_dim >= 24 or padded == length:
        return k, v
    pad = (0, 0, 0, padded - length)
    return torch.nn.functional.pad(k, pad), torch.nn.functional.pad(v, pad)


def unattended_values_zeroed(v: torch.Tensor, selection: Selection, *, chunk_len: int) -> torch.Tensor:
    """``v`` with every token that no query of its KV head attends set to 0 (a copy).

    FlexAttention multiplies masked weights of 0 by every value of a key tile it visits (all
    of them in eager mode), so a NaN or inf value beside an attended block would turn whole
    outputs into NaN. Zeroing what nobody attends costs one pass over ``v``: small next to
    attention on the CPU, where flex is the default; on CUDA (the ``triton`` backend's home)
    it would be a pass over every history value per call, so it is not made there. A NaN
    value in a block that another query group of the same head attends still reaches the
    groups that skip it.
    """
    # The attended set's own rule, with every query group of a KV head merged into one.
    any_group = selection.attended_block_mask().any(2, keepdim=True)  # [B, Hkv, 1, NB]
    mask_mod = token_mask_mod(
        selection, num_q_heads=v.shape[1], chunk_len=chunk_len, block_attended=any_group
    )
    b, h, token = (torch.arange(n, device=v.device) for n in v.shape[:3])
    query = torch.zeros(1, dtype=torch.long, device=v.device)  # any query: one merged group
    kept = mask_mod(b[:, None, None], h[None, :, None], query, token)  # [B, Hkv, Lkv]
    return v.masked_fill(~kept[..., None], 0)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    *,
    scale: float,
    return_lse: bool = False,
    compiled: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The run step: FlexAttention of ``q`` over ``k, v`` under a prebuilt ``block_mask``."""
    kwargs = dict(block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if compiled:
        kwargs["kernel_options"] = _kernel_options(q.device)
        return _run(compiled_flex_attention(), q, k, v, return_lse, kwargs)
    with warnings.catch_warnings():
        # Eager mode was asked for (compile=False): its "unfused implementation" warning is noise.
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return _run(flex_attention, q, k, v, return_lse, kwargs)


def _check_compiled_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.device.type == "cuda" and q.shape[-1] < 16:
        raise ValueError(
            f"q's head_dim must be >= 16 for the compiled flex backend on GPUs (tensor-core tiles), "
            f"got {q.shape[-1]}; use compile=False or backend='dense'"
        )


def _run(attention, q, k, v, return_lse: bool, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not return_lse:
        return attention(q, k, v, **kwargs), None
    if _HAS_RETURN_AUX:
        out, aux = attention(q, k, v, return_aux=AuxRequest(lse=True), **kwargs)
        return out, aux.lse.float()
    out, lse = attention(q, k, v, return_lse=True, **kwargs)
    return out, lse.float()
