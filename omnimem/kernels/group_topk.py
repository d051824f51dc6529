"""Scores and top-k of the gated layer's fine-grained selection in one pass (reference:
``gated_selection.select_groups_torch``).

A program takes ``ROWS`` query groups of one (batch, KV head) and one split of the candidate
blocks. Per tile of ``BLOCK_N`` block means it computes the scores on tensor cores, keeps a
running, unsorted set of its best ``top_k`` keys per row, in the torch path's int64 key
(score, then the lower block index on ties). Per score it costs one float comparison with the
row's worst kept score; only the few that may beat it are packed into keys and inserted, one
insertion round per key of the row with the most (at most ``top_k``). Once the sets have
settled a tile is a matrix product and a comparison, not a sort. The ``[G, NB]`` score matrix
is never written. The splits' sets (``SPLITS * K_PAD`` keys per row) are merged by a top-k.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from omnimem.selection import _INDEX_BITS, _TIER_SHIFT

_MAX_KEY = tl.constexpr((1 << 63) - 1)  # a jit global must be a constexpr


@triton.jit
def _packed_key(score, block, INDEX_BITS: tl.constexpr, TIER_SHIFT: tl.constexpr):
    """The torch path's int64 key of a candidate: tier bit, order-preserving bits of the
    float32 score (-0.0 as +0.0), then the block index reversed (ties: lower index first)."""
    score = tl.where(score == 0.0, 0.0, score)
    bits = score.to(tl.int32, bitcast=True).to(tl.int64)
    ordered = tl.where(bits >= 0, bits + (1 << 31), (1 << 31) - 1 - (bits & 0x7FFFFFFF))
    index = (1 << INDEX_BITS) - 1 - block.to(tl.int64)
    return (1 << TIER_SHIFT) | (ordered << INDEX_BITS) | index[None, :]


@triton.jit
def _key_score(key, INDEX_BITS: tl.constexpr):
    """The float32 score packed in ``key`` (``-inf`` for the empty key 0)."""
    ordered = (key >> INDEX_BITS) & 0xFFFFFFFF
    bits = tl.where(ordered >= (1 << 31), ordered - (1 << 31), ((1 << 31) - 1 - ordered) | (1 << 31))
    score = bits.to(tl.uint32).to(tl.float32, bitcast=True)
    return tl.where(key == 0, float("-inf"), score)


@triton.jit
def _group_topk_kernel(
    pq_ptr, km_ptr, end_ptr, keys_ptr,
    stride_qb, stride_qh, stride_qg, stride_qd,
    stride_kb, stride_kh, stride_kj, stride_kd,
    num_kv_heads, num_groups, blocks_per_split, scale,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    K_PAD: tl.constexpr, TOP_K: tl.constexpr, INDEX_BITS: tl.constexpr, TIER_SHIFT: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    row_tile = tl.program_id(0)
    batch_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    batch = batch_head // num_kv_heads
    head = batch_head % num_kv_heads
    rows = row_tile * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_groups
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < HEAD_DIM
    q_base = pq_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    q = tl.load(
        q_base + rows[:, None] * stride_qg + dims[None, :] * stride_qd,
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    k_base = km_ptr + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    end = tl.load(end_ptr).to(tl.int32)
    lo = split * blocks_per_split
    hi = tl.minimum(lo + blocks_per_split, end)

    slot = tl.arange(0, K_PAD)
    # 0 marks an empty slot (below every real key, whose tier bit is set); padding slots past
    # TOP_K hold the largest key so that they are never the set's worst.
    best = tl.where(slot[None, :] < TOP_K, 0, _MAX_KEY).to(tl.int64) + tl.zeros([ROWS, K_PAD], tl.int64)
    worst = tl.zeros([ROWS], tl.int64)
    worst_score = tl.full([ROWS], float("-inf"), tl.float32)
    for start in range(lo, hi, BLOCK_N):
        block = start + tl.arange(0, BLOCK_N)
        block_ok = block < hi
        keys = tl.load(
            k_base + block.to(tl.int64)[:, None] * stride_kj + dims[None, :] * stride_kd,
            mask=block_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        score = tl.dot(q, tl.trans(keys), input_precision=PRECISION) * scale
        # Streaming part, one float compare per score: only scores that may beat a row's
        # worst kept key (ties included; the packed keys settle them) go any further.
        maybe = (score >= worst_score[:, None]) & row_ok[:, None] & block_ok[None, :]
        pending_rows = tl.sum(maybe.to(tl.int32), 1)
        # Inserting in descending order, at most TOP_K of a row's pending keys can enter.
        rounds = tl.minimum(tl.max(pending_rows, 0), TOP_K)
        if rounds > 0:
            pending = tl.where(maybe, _packed_key(score, block, INDEX_BITS, TIER_SHIFT), 0)
            for _ in range(rounds):
                top = tl.max(pending, 1)
                # Replace the first worst slot of each row whose best pending key beats it.
                first_worst = tl.min(tl.where(best == worst[:, None], slot[None, :], K_PAD), 1)
                replace = (slot[None, :] == first_worst[:, None]) & (top > worst)[:, None]
                best = tl.where(replace, top[:, None], best)
                worst = tl.min(best, 1)
                pending = tl.where(pending == top[:, None], 0, pending)
            worst_score = _key_score(worst, INDEX_BITS)

    best = tl.where(slot[None, :] < TOP_K, best, 0)
    best = tl.sort(best, dim=1, descending=True)
    out = keys_ptr + ((batch_head * num_splits + split).to(tl.int64) * num_groups + rows[:, None]) * K_PAD
    tl.store(out + slot[None, :], best, mask=row_ok[:, None])


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan(
    num_rows: int,
    num_slots: int,
    batch_heads: int,
    device: torch.device,
    rows: int,
    block_n: int,
    per_sm: int,
):
    """``(splits, blocks_per_split)``: enough programs for about ``per_sm`` per SM."""
    row_tiles = math.ceil(num_rows / rows)
    tiles = max(1, math.ceil(num_slots / block_n))
    splits = max(1, min(tiles, math.ceil(per_sm * _num_sms(device) / (row_tiles * batch_heads))))
    return splits, math.ceil(tiles / splits) * block_n


def group_topk(
    pooled_q: torch.Tensor,
    k_means: torch.Tensor,
    end: torch.Tensor,
    *,
    top_k: int,
    scale: float,
    rows: int = 64,
    block_n: int = 64,
    precision: str | None = None,
    num_warps: int = 4,
    per_sm: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block_idx [B, Hkv, G, top_k] int32, num_blocks [B, Hkv, G] int32)``, as
    ``select_groups_torch`` (near-ties aside: tensor-core scores round differently).

    ``pooled_q [B, Hkv, G, D]`` and ``k_means [B, Hkv, NB, D]`` are float32; ``end`` is a 0-d
    integer tensor (candidates are the blocks ``[0, end)``). ``precision``: the dot's input
    precision (default ``"tf32x3"`` on GPUs, float32-accurate; ``"ieee"`` interpreted).
    """
    batch, kv_heads, groups, head_dim = pooled_q.shape
    num_slots = k_means.shape[2]
    if precision is None:
        precision = "tf32x3" if pooled_q.is_cuda else "ieee"
    k_pad = triton.next_power_of_2(top_k)
    splits, per_split = plan(groups, num_slots, batch * kv_heads, pooled_q.device, rows, block_n, per_sm)
    keys = torch.empty((batch, kv_heads, splits, groups, k_pad), dtype=torch.int64, device=pooled_q.device)
    grid = (math.ceil(groups / rows), batch * kv_heads, splits)
    _group_topk_kernel[grid](
        pq_ptr=pooled_q, km_ptr=k_means, end_ptr=end, keys_ptr=keys,
        stride_qb=pooled_q.stride(0), stride_qh=pooled_q.stride(1),
        stride_qg=pooled_q.stride(2), stride_qd=pooled_q.stride(3),
        stride_kb=k_means.stride(0), stride_kh=k_means.stride(1),
        stride_kj=k_means.stride(2), stride_kd=k_means.stride(3),
        num_kv_heads=kv_heads, num_groups=groups, blocks_per_split=per_split, scale=scale,
        ROWS=rows, BLOCK_N=block_n, HEAD_DIM=head_dim, D_PAD=max(16, triton.next_power_of_2(head_dim)),
        K_PAD=k_pad, TOP_K=top_k, INDEX_BITS=_INDEX_BITS, TIER_SHIFT=_TIER_SHIFT, PRECISION=precision,
        num_warps=num_warps,
    )  # fmt: skip
    keys = keys.permute(0, 1, 3, 2, 4).flatten(-2)  # [B, Hkv, G, splits * K_PAD]
    if keys.shape[-1] != top_k:
        keys = torch.topk(keys, top_k, dim=-1, sorted=True).values
    index_mask = (1 << _INDEX_BITS) - 1
    block = torch.where(keys > 0, index_mask - (keys & index_mask), -1).int()
    return block, (keys > 0).sum(-1, dtype=torch.int32)
