"""FlexAttention backend: a ``BlockMask`` built from the selection table plus an exact ``mask_mod``.

Compiled, FlexAttention visits only the blocks of the table: history blocks that every query of
a 128-query tile attends in full are "full" blocks (no mask evaluation); partial history blocks,
blocks shared by some query groups only and the chunk's boundary blocks are "partial" blocks
whose tokens the ``mask_mod`` decides. Eager FlexAttention ignores block sparsity and applies the
``mask_mod`` to every key, so the ``mask_mod`` alone encodes the whole contract: both modes are
exact. ``history_len`` reaches the kernel as a tensor captured by the ``mask_mod`` and every
table has a static shape, so a growing history in a preallocated buffer never recompiles.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from omnimem.config import OmniMemConfig
from omnimem.selection import Selection, token_mask_mod

Q_BLOCK_SIZE = 128

# torch 2.11 and 2.13 differ in small ways; probe once instead of pinning a version.
_HAS_RETURN_AUX = "return_aux" in inspect.signature(flex_attention).parameters
_HAS_COMPUTE_Q_BLOCKS = "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters
if _HAS_RETURN_AUX:
    from torch.nn.attention.flex_attention import AuxRequest


@functools.cache
def compiled_flex_attention():
    """The process-wide compiled ``flex_attention`` (static shapes; compiled once per shape)."""
    return torch.compile(flex_attention, dynamic=False, fullgraph=True)


def _dense_to_ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    num_blocks = dense.sum(-1, dtype=torch.int32)
    indices = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True)
    return num_blocks, indices.to(torch.int32)


def build_block_mask(
    selection: Selection,
    block_attended: torch.Tensor,
    mask_mod,
    *,
    num_q_heads: int,
    q_len: int,
    kv_len: int,
    chunk_len: int,
) -> BlockMask:
    """The ``BlockMask`` of ``selection`` over a ``[q_len, kv_len]`` score matrix.

    ``block_attended`` is ``selection.attended_block_mask()`` (``[B, Hkv, G, NB]`` bool).
    """
    bs, group_size = selection.block_size, selection.query_group_size
    num_groups, num_blocks = block_attended.shape[2], block_attended.shape[3]
    device = block_attended.device
    num_q_blocks = math.ceil(q_len / Q_BLOCK_SIZE)

    if num_groups == 1:
        any_group = all_groups = block_attended.expand(-1, -1, num_q_blocks, -1)
    else:
        # A 128-query tile may span several groups: a block is full there only if all of them
        # attend it, and must be visited if any does.
        tile_first = torch.arange(num_q_blocks, device=device) * Q_BLOCK_SIZE
        tile_last = (tile_first + Q_BLOCK_SIZE).clamp(max=q_len) - 1
        group = torch.arange(num_groups, device=device)
        member = (group >= (tile_first // group_size)[:, None]) & (
            group <= (tile_last // group_size)[:, None]
        )
        count = torch.einsum("mg,bhgj->bhmj", member.float(), block_attended.float())
        any_group = count > 0
        all_groups = count == member.sum(-1, dtype=torch.float32)[:, None]

    start = torch.arange(num_blocks, device=device) * bs
    end = start + bs
    history_len = selection.history_len
    chunk_end = history_len + chunk_len
    chunk_full = (start >= history_len) & (end <= chunk_end) & (end <= kv_len)
    chunk_any = (start < chunk_end) & (end > history_len)
    full = (all_groups & (end <= history_len)) | chunk_full
    partial = ((any_group & (start < history_len)) | chunk_any) & ~full

    heads_per_kv = num_q_heads // block_attended.shape[1]
    if heads_per_kv > 1:
        full = full.repeat_interleave(heads_per_kv, dim=1)
        partial = partial.repeat_interleave(heads_per_kv, dim=1)
    kv_num_blocks, kv_indices = _dense_to_ordered(partial)
    full_kv_num_blocks, full_kv_indices = _dense_to_ordered(full)
    extra = {"compute_q_blocks": False} if _HAS_COMPUTE_Q_BLOCKS else {}
    return BlockMask.from_kv_blocks(
        kv_num_blocks,
        kv_indices,
        full_kv_num_blocks,
        full_kv_indices,
        BLOCK_SIZE=(Q_BLOCK_SIZE, bs),
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
    num_q_heads, q_len = q.shape[1], q.shape[2]
    block_attended = selection.attended_block_mask()
    mask_mod = token_mask_mod(
        selection, num_q_heads=num_q_heads, chunk_len=chunk_len, block_attended=block_attended
    )
    block_mask = build_block_mask(
        selection,
        block_attended,
        mask_mod,
        num_q_heads=num_q_heads,
        q_len=q_len,
        kv_len=k.shape[2],
        chunk_len=chunk_len,
    )
    # Compiled CPU FlexAttention cannot return the log-sum-exp; the eager path is exact too.
    compiled = config.compile and not (return_lse and q.device.type == "cpu")
    kwargs = dict(block_mask=block_mask, scale=scale, enable_gqa=num_q_heads != k.shape[1])
    if compiled:
        return _run(compiled_flex_attention(), q, k, v, return_lse, kwargs)
    with warnings.catch_warnings():
        # Eager mode was asked for (compile=False): its "unfused implementation" warning is noise.
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return _run(flex_attention, q, k, v, return_lse, kwargs)


def _run(attention, q, k, v, return_lse: bool, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not return_lse:
        return attention(q, k, v, **kwargs), None
    if _HAS_RETURN_AUX:
        out, aux = attention(q, k, v, return_aux=AuxRequest(lse=True), **kwargs)
        return out, aux.lse.float()
    out, lse = attention(q, k, v, return_lse=True, **kwargs)
    return out, lse.float()
