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
import logging
import math

import torch
import triton
import triton.language as tl

from omnimem.selection import _INDEX_BITS, _TIER_SHIFT

_MAX_KEY = tl.constexpr((1 << 63) - 1)  # a jit global must be a constexpr


@triton.jit
def _ordered_bits(score):
    """int64 in ``[0, 2**32)`` ordered as the float32 ``score`` (-0.0 as +0.0)."""
    score = tl.where(score == 0.0, 0.0, score)
    bits = score.to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(bits >= 0, bits + (1 << 31), (1 << 31) - 1 - (bits & 0x7FFFFFFF))


@triton.jit
def _bits_score(ordered):
    """The float32 whose ``_ordered_bits`` are ``ordered``."""
    bits = tl.where(ordered >= (1 << 31), ordered - (1 << 31), ((1 << 31) - 1 - ordered) | (1 << 31))
    return bits.to(tl.uint32).to(tl.float32, bitcast=True)


@triton.jit
def _packed_key(score, block, INDEX_BITS: tl.constexpr, TIER_SHIFT: tl.constexpr):
    """The torch path's int64 key of a candidate (``score`` and ``block`` broadcast): tier
    bit, order-preserving bits of the float32 score, then the block index reversed (ties:
    lower index first)."""
    index = (1 << INDEX_BITS) - 1 - block.to(tl.int64)
    return (1 << TIER_SHIFT) | (_ordered_bits(score) << INDEX_BITS) | index


@triton.jit
def _key_score(key, INDEX_BITS: tl.constexpr):
    """The float32 score packed in ``key`` (``-inf`` for the empty key 0)."""
    score = _bits_score((key >> INDEX_BITS) & 0xFFFFFFFF)
    return tl.where(key == 0, float("-inf"), score)


@triton.jit
def _load_rows(base, rows, rows_ok, stride_row, stride_dim, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """Rows ``rows`` of a ``[*, HEAD_DIM]`` matrix as ``[len(rows), D_PAD]`` (0 where masked)."""
    dims = tl.arange(0, D_PAD)
    ptrs = base + rows.to(tl.int64)[:, None] * stride_row + dims[None, :] * stride_dim
    return tl.load(ptrs, mask=rows_ok[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _split_program(
    pq_ptr, km_ptr, end_ptr, stride_qb, stride_qh, stride_qg, stride_qd, stride_kb, stride_kh,
    num_kv_heads, num_groups, blocks_per_split,
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
):  # fmt: skip
    """A (row tile, batch x KV head, split) program's rows, their pooled queries, its head's
    block means and its block range ``[lo, hi)`` (cut at the candidates' end)."""
    batch_head = tl.program_id(1)
    batch = batch_head // num_kv_heads
    head = batch_head % num_kv_heads
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_groups
    q_base = pq_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    q = _load_rows(q_base, rows, row_ok, stride_qg, stride_qd, HEAD_DIM, D_PAD)
    k_base = km_ptr + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    lo = tl.program_id(2) * blocks_per_split
    hi = tl.minimum(lo + blocks_per_split, tl.load(end_ptr).to(tl.int32))
    return batch_head, rows, row_ok, q, k_base, lo, hi


@triton.jit
def _stream_topk_kernel(
    pq_ptr, km_ptr, end_ptr, keys_ptr, flags_ptr,
    stride_qb, stride_qh, stride_qg, stride_qd,
    stride_kb, stride_kh, stride_kj, stride_kd,
    num_kv_heads, num_groups, blocks_per_split, scale,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    K_PAD: tl.constexpr, TOP_K: tl.constexpr, INDEX_BITS: tl.constexpr, TIER_SHIFT: tl.constexpr,
    PRECISION: tl.constexpr, HAS_FLAGS: tl.constexpr,
):  # fmt: skip
    batch_head, rows, row_ok, q, k_base, lo, hi = _split_program(
        pq_ptr, km_ptr, end_ptr, stride_qb, stride_qh, stride_qg, stride_qd, stride_kb, stride_kh,
        num_kv_heads, num_groups, blocks_per_split, ROWS, HEAD_DIM, D_PAD,
    )  # fmt: skip
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    if HAS_FLAGS:  # the fallback of the two-pass path: only rows it flagged are redone
        row_ok = row_ok & (tl.load(flags_ptr + batch_head * num_groups + rows, mask=row_ok, other=0) != 0)
        hi = tl.where(tl.max(row_ok.to(tl.int32), 0) > 0, hi, lo)

    slot = tl.arange(0, K_PAD)
    # 0 marks an empty slot (below every real key, whose tier bit is set); padding slots past
    # TOP_K hold the largest key so that they are never the set's worst.
    best = tl.where(slot[None, :] < TOP_K, 0, _MAX_KEY).to(tl.int64) + tl.zeros([ROWS, K_PAD], tl.int64)
    worst = tl.zeros([ROWS], tl.int64)
    worst_score = tl.full([ROWS], float("-inf"), tl.float32)
    for start in range(lo, hi, BLOCK_N):
        block = start + tl.arange(0, BLOCK_N)
        block_ok = block < hi
        keys = _load_rows(k_base, block, block_ok, stride_kj, stride_kd, HEAD_DIM, D_PAD)
        score = tl.dot(q, tl.trans(keys), input_precision=PRECISION) * scale
        # Streaming part, one float compare per score: only scores that may beat a row's
        # worst kept key (ties included; the packed keys settle them) go any further.
        maybe = (score >= worst_score[:, None]) & row_ok[:, None] & block_ok[None, :]
        pending_rows = tl.sum(maybe.to(tl.int32), 1)
        # Inserting in descending order, at most TOP_K of a row's pending keys can enter.
        rounds = tl.minimum(tl.max(pending_rows, 0), TOP_K)
        if rounds > 0:
            pending = tl.where(maybe, _packed_key(score, block[None, :], INDEX_BITS, TIER_SHIFT), 0)
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


@triton.jit
def _bucket_max_kernel(
    pq_ptr, km_ptr, end_ptr, bmax_ptr, knorm_ptr,
    stride_qb, stride_qh, stride_qg, stride_qd,
    stride_kb, stride_kh, stride_kj, stride_kd,
    num_kv_heads, num_groups, num_buckets, blocks_per_split,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BUCKET: tl.constexpr, HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Pass 1: approximate (tensor-core) scores, reduced to each ``BUCKET`` of blocks' maximum
    per row, and the largest squared norm of the block means (for the error bound)."""
    batch_head, rows, row_ok, q, k_base, lo, hi = _split_program(
        pq_ptr, km_ptr, end_ptr, stride_qb, stride_qh, stride_qg, stride_qd, stride_kb, stride_kh,
        num_kv_heads, num_groups, blocks_per_split, ROWS, HEAD_DIM, D_PAD,
    )  # fmt: skip
    out_rows = bmax_ptr + (batch_head.to(tl.int64) * num_groups + rows[:, None]) * num_buckets
    norms = tl.zeros([BLOCK_N], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        block = start + tl.arange(0, BLOCK_N)
        block_ok = block < hi
        keys = _load_rows(k_base, block, block_ok, stride_kj, stride_kd, HEAD_DIM, D_PAD)
        score = tl.dot(q, tl.trans(keys), input_precision=PRECISION)
        # NaN means (a corrupted block) are no candidates: they neither raise a bucket's
        # maximum nor the error bound (tl.max's NaN handling is left unspecified: say it).
        score = tl.where(block_ok[None, :] & (score == score), score, float("-inf"))
        bucket_max = tl.max(tl.reshape(score, [ROWS, BLOCK_N // BUCKET, BUCKET]), 2)
        bucket = start // BUCKET + tl.arange(0, BLOCK_N // BUCKET)
        tl.store(out_rows + bucket[None, :], bucket_max, mask=row_ok[:, None])
        squares = tl.sum(keys * keys, 1)
        norms = tl.maximum(norms, tl.where(squares == squares, squares, 0.0))
    tl.atomic_max(knorm_ptr + batch_head, tl.max(norms, 0))


@triton.jit
def _refine_kernel(
    pq_ptr, km_ptr, end_ptr, bmax_ptr, knorm_ptr, buckets_ptr, cand_ptr, keys_ptr, flags_ptr,
    stride_qb, stride_qh, stride_qg, stride_qd,
    stride_kb, stride_kh, stride_kj, stride_kd,
    num_kv_heads, num_groups, num_buckets, scale, error_bound,
    BUCKETS_PAD: tl.constexpr, BUCKET: tl.constexpr, CANDIDATES: tl.constexpr,
    CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, K_PAD: tl.constexpr,
    TOP_K: tl.constexpr, INDEX_BITS: tl.constexpr, TIER_SHIFT: tl.constexpr, LEVEL_STEPS: tl.constexpr,
):  # fmt: skip
    """Pass 2, one query group: the threshold under which no top-k block can lie, the buckets
    above it, exact float32 scores of their blocks, and the top-k of those (rows with more
    than ``CANDIDATES`` buckets above it are flagged for the one-pass kernel)."""
    row = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // num_kv_heads
    head = batch_head % num_kv_heads
    row_id = batch_head.to(tl.int64) * num_groups + row
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < HEAD_DIM
    q_base = pq_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + row * stride_qg
    q = tl.load(q_base + dims * stride_qd, mask=dim_ok, other=0.0)
    end = tl.load(end_ptr).to(tl.int32)

    # A level that at least TOP_K bucket maxima reach (so at most the TOP_K-th largest), by
    # bisection between the row's smallest and largest maximum; -inf with fewer valid buckets.
    bucket = tl.arange(0, BUCKETS_PAD)
    valid = bucket < (end + BUCKET - 1) // BUCKET
    bmax = tl.load(bmax_ptr + row_id * num_buckets + bucket, mask=valid, other=float("-inf"))
    num_valid = tl.sum(valid.to(tl.int32), 0)
    low = tl.where(num_valid > 0, tl.min(tl.where(valid, bmax, float("inf")), 0), 0.0)
    high = tl.where(num_valid > 0, tl.max(bmax, 0), 0.0)
    for _ in tl.static_range(LEVEL_STEPS):
        mid = low + (high - low) * 0.5
        enough = tl.sum((valid & (bmax >= mid)).to(tl.int32), 0) >= TOP_K
        low = tl.where(enough, mid, low)
        high = tl.where(enough, high, mid)
    # Every top-k block's exact score is within 2 * eps of a kept bucket's approximate max:
    # eps bounds |approximate - exact| (Cauchy-Schwarz on the rounding of each product).
    eps = error_bound * tl.sqrt(tl.sum(q * q, 0) * tl.load(knorm_ptr + batch_head))
    threshold = tl.where(num_valid >= TOP_K, low - 2.0 * eps, float("-inf"))
    keep = valid & (bmax >= threshold)
    count = tl.sum(keep.to(tl.int32), 0)
    tl.store(flags_ptr + row_id, (count > CANDIDATES).to(tl.int32))
    slot = tl.cumsum(keep.to(tl.int32), 0) - 1
    tl.store(buckets_ptr + row_id * CANDIDATES + slot, bucket, mask=keep & (slot < CANDIDATES))
    tl.debug_barrier()

    # Exact scores of the kept buckets' blocks, CHUNK buckets at a time, as packed keys.
    kept = tl.minimum(count, CANDIDATES)
    k_base = km_ptr + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    lane = tl.arange(0, CHUNK * BUCKET)
    for first in range(0, kept, CHUNK):
        entry = first + lane // BUCKET
        chosen = tl.load(buckets_ptr + row_id * CANDIDATES + entry, mask=entry < kept, other=0)
        block = chosen * BUCKET + lane % BUCKET
        ok = (entry < kept) & (block < end)
        keys = _load_rows(k_base, block, ok, stride_kj, stride_kd, HEAD_DIM, D_PAD)
        score = tl.sum(keys * q[None, :], 1) * scale
        ok = ok & (score == score)  # NaN means: no candidate
        key = tl.where(ok, _packed_key(score, block, INDEX_BITS, TIER_SHIFT), 0)
        tl.store(cand_ptr + row_id * (CANDIDATES * BUCKET) + first * BUCKET + lane, key)
    tl.debug_barrier()
    every = tl.arange(0, CANDIDATES * BUCKET)
    key = tl.load(cand_ptr + row_id * (CANDIDATES * BUCKET) + every, mask=every < kept * BUCKET, other=0)
    key = tl.sort(key, descending=True)
    # The first K_PAD of the sorted keys: fold the row into [n, K_PAD] and keep row 0.
    folded = tl.reshape(key, [CANDIDATES * BUCKET // K_PAD, K_PAD])
    first_row = (tl.arange(0, CANDIDATES * BUCKET // K_PAD) == 0)[:, None]
    top = tl.sum(tl.where(first_row, folded, 0), 0)
    slot_k = tl.arange(0, K_PAD)
    tl.store(keys_ptr + row_id * K_PAD + slot_k, tl.where(slot_k < TOP_K, top, 0))


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
    programs = max(1, row_tiles * batch_heads)  # an empty batch launches nothing
    splits = max(1, min(tiles, math.ceil(per_sm * _num_sms(device) / programs)))
    return splits, math.ceil(tiles / splits) * block_n


# Pass 1's error bound per unit of |q| * max|k|: tf32 operands (10 explicit bits, truncated or
# rounded: 2**-10 each) and float32 sums of both passes; exact float32 dots (the interpreter)
# only leave the sums. Candidates per row: buckets whose maximum may hold a top-k block.
_ERROR_BOUND = {"tf32": 2.5e-3, "ieee": 1.0e-4}
CANDIDATE_BUCKETS = 32


def stream_topk(
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
    keys: torch.Tensor | None = None,
    row_flags: torch.Tensor | None = None,
) -> torch.Tensor:
    """The one-pass kernel: ``[B, Hkv, G, K_PAD]`` int64 packed keys, best first (0: none).

    With ``row_flags [B * Hkv * G]`` only flagged rows are computed, into ``keys`` (one split):
    the two-pass path's fallback.
    """
    batch, kv_heads, groups, head_dim = pooled_q.shape
    num_slots = k_means.shape[2]
    if precision is None:
        precision = "tf32x3" if pooled_q.is_cuda else "ieee"
    k_pad = triton.next_power_of_2(top_k)
    if row_flags is None:
        splits, per_split = plan(groups, num_slots, batch * kv_heads, pooled_q.device, rows, block_n, per_sm)
        keys = torch.empty(
            (batch, kv_heads, splits, groups, k_pad), dtype=torch.int64, device=pooled_q.device
        )
    else:
        splits, per_split = 1, max(1, math.ceil(num_slots / block_n)) * block_n
    grid = (math.ceil(groups / rows), batch * kv_heads, splits)
    _stream_topk_kernel[grid](
        pq_ptr=pooled_q, km_ptr=k_means, end_ptr=end, keys_ptr=keys, flags_ptr=row_flags,
        stride_qb=pooled_q.stride(0), stride_qh=pooled_q.stride(1),
        stride_qg=pooled_q.stride(2), stride_qd=pooled_q.stride(3),
        stride_kb=k_means.stride(0), stride_kh=k_means.stride(1),
        stride_kj=k_means.stride(2), stride_kd=k_means.stride(3),
        num_kv_heads=kv_heads, num_groups=groups, blocks_per_split=per_split, scale=scale,
        ROWS=rows, BLOCK_N=block_n, HEAD_DIM=head_dim, D_PAD=max(16, triton.next_power_of_2(head_dim)),
        K_PAD=k_pad, TOP_K=top_k, INDEX_BITS=_INDEX_BITS, TIER_SHIFT=_TIER_SHIFT, PRECISION=precision,
        HAS_FLAGS=row_flags is not None, num_warps=num_warps,
    )  # fmt: skip
    keys = keys.view(batch, kv_heads, splits, groups, k_pad).permute(0, 1, 3, 2, 4).flatten(-2)
    if keys.shape[-1] != k_pad:
        keys = torch.topk(keys, k_pad, dim=-1, sorted=True).values
    return keys


def _strides(pooled_q: torch.Tensor, k_means: torch.Tensor) -> dict:
    return dict(
        stride_qb=pooled_q.stride(0), stride_qh=pooled_q.stride(1),
        stride_qg=pooled_q.stride(2), stride_qd=pooled_q.stride(3),
        stride_kb=k_means.stride(0), stride_kh=k_means.stride(1),
        stride_kj=k_means.stride(2), stride_kd=k_means.stride(3),
    )  # fmt: skip


def bucket_maxima(
    pooled_q: torch.Tensor,
    k_means: torch.Tensor,
    end: torch.Tensor,
    *,
    bucket: int,
    rows: int,
    block_n: int,
    precision: str,
    num_warps: int,
    per_sm: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1: ``(bmax [B * Hkv * G, buckets] float32, knorm [B * Hkv] float32)``, unscaled
    approximate scores' maximum per bucket of ``bucket`` blocks (buckets past ``end`` hold
    junk), and each head's largest squared block-mean norm."""
    batch, kv_heads, groups, head_dim = pooled_q.shape
    num_slots = k_means.shape[2]
    splits, per_split = plan(groups, num_slots, batch * kv_heads, pooled_q.device, rows, block_n, per_sm)
    tiles = max(1, math.ceil(num_slots / block_n))
    num_buckets = tiles * (block_n // bucket)  # whole tiles: pass 1 stores every bucket of a tile
    bmax = torch.empty((batch * kv_heads * groups, num_buckets), dtype=torch.float32, device=pooled_q.device)
    knorm = torch.zeros(batch * kv_heads, dtype=torch.float32, device=pooled_q.device)
    _bucket_max_kernel[(math.ceil(groups / rows), batch * kv_heads, splits)](
        pq_ptr=pooled_q, km_ptr=k_means, end_ptr=end, bmax_ptr=bmax, knorm_ptr=knorm,
        **_strides(pooled_q, k_means),
        num_kv_heads=kv_heads, num_groups=groups, num_buckets=num_buckets, blocks_per_split=per_split,
        ROWS=rows, BLOCK_N=block_n, BUCKET=bucket, HEAD_DIM=head_dim,
        D_PAD=max(16, triton.next_power_of_2(head_dim)), PRECISION=precision, num_warps=num_warps,
    )  # fmt: skip
    return bmax, knorm


def two_pass_topk(
    pooled_q: torch.Tensor,
    k_means: torch.Tensor,
    end: torch.Tensor,
    *,
    top_k: int,
    scale: float,
    rows: int = 128,
    block_n: int = 64,
    precision: str | None = None,
    num_warps: int = 8,
    per_sm: int = 4,
    error_bound: float | None = None,
    candidate_buckets: int = CANDIDATE_BUCKETS,
    refine_warps: int = 1,
    refine_chunk: int = 16,
    level_steps: int = 10,
) -> torch.Tensor:
    """Approximate bucket maxima, then exact scores of the few buckets that may hold a top-k
    block; ``[B, Hkv, G, K_PAD]`` int64 packed keys, best first (0: none). Exact: a row whose
    candidates overflow ``CANDIDATE_BUCKETS`` is redone by the one-pass kernel."""
    batch, kv_heads, groups, head_dim = pooled_q.shape
    num_slots = k_means.shape[2]
    device = pooled_q.device
    if precision is None:
        precision = "tf32" if pooled_q.is_cuda else "ieee"
    error_bound = _ERROR_BOUND[precision] if error_bound is None else error_bound
    bucket = 16 if num_slots <= 32768 else 32
    k_pad = triton.next_power_of_2(top_k)
    # Short histories: no more candidate slots than buckets (but room for the top-k).
    fewer = max(triton.next_power_of_2(math.ceil(num_slots / bucket)), triton.cdiv(k_pad, bucket))
    candidate_buckets = min(candidate_buckets, triton.next_power_of_2(fewer))
    d_pad = max(16, triton.next_power_of_2(head_dim))
    rows_total = batch * kv_heads * groups
    bmax, knorm = bucket_maxima(
        pooled_q, k_means, end, bucket=bucket, rows=rows, block_n=block_n, precision=precision,
        num_warps=num_warps, per_sm=per_sm,
    )  # fmt: skip
    num_buckets = bmax.shape[1]
    buckets = torch.empty((rows_total, candidate_buckets), dtype=torch.int32, device=device)
    candidates = torch.empty((rows_total, candidate_buckets * bucket), dtype=torch.int64, device=device)
    keys = torch.empty((batch, kv_heads, groups, k_pad), dtype=torch.int64, device=device)
    flags = torch.empty(rows_total, dtype=torch.int32, device=device)
    _refine_kernel[(groups, batch * kv_heads)](
        pq_ptr=pooled_q, km_ptr=k_means, end_ptr=end, bmax_ptr=bmax, knorm_ptr=knorm,
        buckets_ptr=buckets, cand_ptr=candidates, keys_ptr=keys, flags_ptr=flags,
        **_strides(pooled_q, k_means),
        num_kv_heads=kv_heads, num_groups=groups, num_buckets=num_buckets, scale=scale,
        error_bound=error_bound, BUCKETS_PAD=triton.next_power_of_2(num_buckets), BUCKET=bucket,
        CANDIDATES=candidate_buckets, CHUNK=min(candidate_buckets, max(1, refine_chunk // bucket)),
        HEAD_DIM=head_dim, D_PAD=d_pad, K_PAD=k_pad, TOP_K=top_k, INDEX_BITS=_INDEX_BITS,
        TIER_SHIFT=_TIER_SHIFT, LEVEL_STEPS=level_steps, num_warps=refine_warps,
    )  # fmt: skip
    # Rows whose candidates overflowed: the one-pass kernel, in place (programs of rows
    # without a flag return at once; nothing waits on the host).
    stream_topk(pooled_q, k_means, end, top_k=top_k, scale=scale, keys=keys, row_flags=flags)
    return keys


def decode_keys(keys: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block_idx int32, num_blocks int32)`` from packed keys, best first (0: none)."""
    keys = keys[..., :top_k]
    index_mask = (1 << _INDEX_BITS) - 1
    block = torch.where(keys > 0, index_mask - (keys & index_mask), -1).int()
    return block, (keys > 0).sum(-1, dtype=torch.int32)


@functools.cache
def _log_one_pass(top_k: int) -> None:
    logging.getLogger("omnimem").info(
        "gated selection: top_k=%d does not fit the two-pass kernels' candidate list; "
        "running the one-pass kernel (slower at long histories)",
        top_k,
    )


def group_topk(
    pooled_q: torch.Tensor, k_means: torch.Tensor, end: torch.Tensor, *, top_k: int, scale: float, **options
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block_idx [B, Hkv, G, top_k] int32, num_blocks [B, Hkv, G] int32)``, as
    ``select_groups_torch``: the same keys, up to the float32 rounding order of the scores.

    ``pooled_q [B, Hkv, G, D]`` and ``k_means [B, Hkv, NB, D]`` are float32; ``end`` is a 0-d
    integer tensor (candidates are the blocks ``[0, end)``). The two-pass kernels when
    ``top_k`` fits their candidate list, else the one-pass kernel; ``options`` go to the
    chosen launcher.
    """
    candidate_buckets = options.pop("candidate_buckets", CANDIDATE_BUCKETS)
    if triton.next_power_of_2(top_k) <= candidate_buckets * 16:
        keys = two_pass_topk(
            pooled_q, k_means, end, top_k=top_k, scale=scale, candidate_buckets=candidate_buckets, **options
        )
    else:
        _log_one_pass(top_k)
        options.pop("error_bound", None)
        keys = stream_topk(pooled_q, k_means, end, top_k=top_k, scale=scale, **options)
    return decode_keys(keys, top_k)
