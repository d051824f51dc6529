"""Scores and top-k of the gated layer's fine-grained selection (reference:
``omnimem.gated.selection.select_groups_torch``), never writing the ``[G, NB]`` score matrix.

Two passes (``two_pass_topk``), exact whatever the data:

1. ``_bucket_max_kernel``: tensor-core scores of ``ROWS`` query groups against tiles of
   block means (tf32, or bfloat16 on a bfloat16 copy of the means: ``approx_keys``), reduced
   to the maximum of every ``BUCKET`` consecutive blocks (4 at the authors' 369,720-token
   history), and the largest block-mean norm (each computed once).
2. ``_refine_kernel``, one query group per program: a level that ``top_k`` bucket maxima
   reach (bisection), lowered by pass 1's
   error bound; only the few buckets above it (about 20 of 3,120 on random keys, 25 after
   bfloat16 scores) can hold a top-k block. Their blocks are scored exactly in
   float32 and ranked by the torch path's int64 key (score, then the lower block index on
   ties), 128 blocks per step; near-ties only add steps. The block indices are
   written.

``_refine_warp_kernel`` is pass 2 for long rows: pass 1 also writes each 64-block tile's
maximum, the level comes from those (~200 instead of ~3,000 values), only candidate tiles'
bucket maxima are read, and a group's program is 1-2 warps, so many more groups run at once.

``_stream_topk_kernel`` is the one-pass alternative (a running set of the best ``top_k`` keys
per row, one float comparison per score), used for ``top_k`` above pass 2's step.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import triton
import triton.language as tl

from omnimem.gated.selection import as_span
from omnimem.kernels.pdl import gdc_launch_dependents, gdc_wait
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
def _key_block(key, INDEX_BITS: tl.constexpr):
    """The block index packed in ``key`` (int32; ``-1`` for the empty key 0)."""
    index_mask = (1 << INDEX_BITS) - 1
    return tl.where(key > 0, index_mask - (key & index_mask), -1).to(tl.int32)


@triton.jit
def _level(values, ok, LEVEL_STEPS: tl.constexpr, TOP_K: tl.constexpr):
    """A level that at least ``TOP_K`` of ``values[ok]`` reach, by bisection between their
    smallest and largest (0 when none is ok)."""
    any_ok = tl.max(ok.to(tl.int32), 0) > 0
    low = tl.where(any_ok, tl.min(tl.where(ok, values, float("inf")), 0), 0.0)
    high = tl.where(any_ok, tl.max(tl.where(ok, values, float("-inf")), 0), 0.0)
    for _ in tl.static_range(LEVEL_STEPS):
        mid = low + (high - low) * 0.5
        enough = tl.sum((ok & (values >= mid)).to(tl.int32), 0) >= TOP_K
        low = tl.where(enough, mid, low)
        high = tl.where(enough, high, mid)
    return low


@triton.jit
def _load_rows(base, rows, rows_ok, stride_row, stride_dim, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """Rows ``rows`` of a ``[*, HEAD_DIM]`` matrix as ``[len(rows), D_PAD]`` (0 where masked)."""
    dims = tl.arange(0, D_PAD)
    ptrs = base + rows.to(tl.int64)[:, None] * stride_row + dims[None, :] * stride_dim
    return tl.load(ptrs, mask=rows_ok[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _split_program(
    pq_ptr, km_ptr, span_ptr, stride_qb, stride_qh, stride_qg, stride_qd, stride_kb, stride_kh,
    num_kv_heads, num_groups, blocks_per_split,
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
):  # fmt: skip
    """A (row tile, batch x KV head, split) program's rows, their pooled queries, its head's
    block means, its block range ``[lo, hi)`` (cut at the candidates' end) and the candidates'
    first block (blocks below it are scored, never kept: tiles stay aligned)."""
    batch_head = tl.program_id(1)
    batch = batch_head // num_kv_heads
    head = batch_head % num_kv_heads
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_groups
    q_base = pq_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    q = _load_rows(q_base, rows, row_ok, stride_qg, stride_qd, HEAD_DIM, D_PAD)
    k_base = km_ptr + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    lo = tl.program_id(2) * blocks_per_split
    hi = tl.minimum(lo + blocks_per_split, tl.load(span_ptr + 1).to(tl.int32))
    return batch_head, rows, row_ok, q, k_base, lo, hi, tl.load(span_ptr).to(tl.int32)


@triton.jit
def _stream_topk_kernel(
    pq_ptr, km_ptr, span_ptr, keys_ptr,
    stride_qb, stride_qh, stride_qg, stride_qd,
    stride_kb, stride_kh, stride_kj, stride_kd,
    num_kv_heads, num_groups, blocks_per_split, scale,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    K_PAD: tl.constexpr, TOP_K: tl.constexpr, INDEX_BITS: tl.constexpr, TIER_SHIFT: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    batch_head, rows, row_ok, q, k_base, lo, hi, lowest = _split_program(
        pq_ptr, km_ptr, span_ptr, stride_qb, stride_qh, stride_qg, stride_qd, stride_kb, stride_kh,
        num_kv_heads, num_groups, blocks_per_split, ROWS, HEAD_DIM, D_PAD,
    )  # fmt: skip
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

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
        maybe = (score >= worst_score[:, None]) & row_ok[:, None] & (block_ok & (block >= lowest))[None, :]
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
    pq_ptr, km_ptr, span_ptr, bmax_ptr, norms_ptr, counts_ptr, tmax_ptr, bounds_ptr,
    stride_qb, stride_qh, stride_qg, stride_qd,
    stride_kb, stride_kh, stride_kj, stride_kd, stride_bb, stride_bh,
    num_kv_heads, num_groups, num_buckets, blocks_per_split, num_tiles,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BUCKET: tl.constexpr, HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr, PRECISION: tl.constexpr, TILE_MAXIMA: tl.constexpr,
    BOUNDS: tl.constexpr = False, PDL_WAIT: tl.constexpr = False, PDL_TRIGGER: tl.constexpr = False,
):  # fmt: skip
    """Pass 1: approximate (tensor-core) scores, reduced to each ``BUCKET`` of blocks' maximum
    per row, and what the error bound needs: the largest squared norm of the scored block
    means, or with ``BOUNDS`` the largest of each column of the blocks' ``[|k|**2,
    |k_attn - k|**2]`` (``bounds_ptr``, ``[B, Hkv, NB, 2]``, rows contiguous). The row tiles
    take turns over the split's block tiles, so each block is counted once, and every program
    writes its own maxima (no buffer needs zeroing). The first split zeroes its rows' candidate
    counters for pass 2 (no extra launch). ``PDL_WAIT``/``PDL_TRIGGER``: see
    ``omnimem.kernels.pdl``."""
    if PDL_WAIT:  # the pooled queries and the span come from the previous launch
        gdc_wait()
    if PDL_TRIGGER:
        gdc_launch_dependents()
    batch_head, rows, row_ok, q, k_base, lo, hi, lowest = _split_program(
        pq_ptr, km_ptr, span_ptr, stride_qb, stride_qh, stride_qg, stride_qd, stride_kb, stride_kh,
        num_kv_heads, num_groups, blocks_per_split, ROWS, HEAD_DIM, D_PAD,
    )  # fmt: skip
    out_rows = bmax_ptr + (batch_head.to(tl.int64) * num_groups + rows[:, None]) * num_buckets
    if tl.program_id(2) == 0:
        tl.store(counts_ptr + batch_head.to(tl.int64) * num_groups + rows, 0, mask=row_ok)
    if km_ptr.dtype.element_ty != tl.float32:  # 16-bit means: the queries round to them too
        q = q.to(km_ptr.dtype.element_ty)
    norms = tl.zeros([BLOCK_N, 2], tl.float32)
    column = tl.arange(0, 2)
    b_base = bounds_ptr + (batch_head // num_kv_heads).to(tl.int64) * stride_bb
    b_base += (batch_head % num_kv_heads).to(tl.int64) * stride_bh
    for start in range(lo, hi, BLOCK_N):
        block = start + tl.arange(0, BLOCK_N)
        block_ok = block < hi
        keys = _load_rows(k_base, block, block_ok, stride_kj, stride_kd, HEAD_DIM, D_PAD)
        score = tl.dot(q, tl.trans(keys), input_precision=PRECISION)
        # NaN means (a corrupted block) are no candidates: they neither raise a bucket's
        # maximum nor the error bound (tl.max's NaN handling is left unspecified: say it).
        score = tl.where((block_ok & (block >= lowest))[None, :] & (score == score), score, float("-inf"))
        bucket_max = tl.max(tl.reshape(score, [ROWS, BLOCK_N // BUCKET, BUCKET]), 2)
        bucket = start // BUCKET + tl.arange(0, BLOCK_N // BUCKET)
        tl.store(out_rows + bucket[None, :], bucket_max, mask=row_ok[:, None])
        if TILE_MAXIMA:  # each BLOCK_N tile's maximum too, for the warp refine pass
            tile_rows = tmax_ptr + (batch_head.to(tl.int64) * num_groups + rows) * num_tiles
            tl.store(tile_rows + start // BLOCK_N, tl.max(bucket_max, 1), mask=row_ok)
        if (start // BLOCK_N) % tl.num_programs(0) == tl.program_id(0):  # this row tile's turn
            if BOUNDS:  # precomputed: the key tile stays in shared memory, unread here
                entries = b_base + block.to(tl.int64)[:, None] * 2 + column[None, :]
                squares = tl.load(entries, mask=block_ok[:, None], other=0.0)
            else:
                wide = keys.to(tl.float32)
                squares = tl.where(column[None, :] == 0, tl.sum(wide * wide, 1)[:, None], 0.0)
            norms = tl.maximum(norms, tl.where(squares == squares, squares, 0.0))
    program = tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
    per_head = tl.num_programs(2) * tl.num_programs(0)
    tl.store(norms_ptr + (batch_head * 2 + column) * per_head + program, tl.max(norms, 0))


@triton.jit
def _group_program(
    pq_ptr, km_ptr, span_ptr, stride_qb, stride_qh, stride_qg, stride_qd, stride_kb, stride_kh,
    num_kv_heads, num_groups, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
):  # fmt: skip
    """A pass-2 program's query group (program ids: group, batch x KV head): its batch x head,
    flat row id, pooled query (pointer and values), its head's block means and the
    candidates' first block and end."""
    row = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // num_kv_heads
    head = batch_head % num_kv_heads
    dims = tl.arange(0, D_PAD)
    q_base = pq_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + row * stride_qg
    q = tl.load(q_base + dims * stride_qd, mask=dims < HEAD_DIM, other=0.0)
    k_base = km_ptr + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    lowest = tl.load(span_ptr).to(tl.int32)
    end = tl.load(span_ptr + 1).to(tl.int32)
    return batch_head, batch_head.to(tl.int64) * num_groups + row, q_base, q, k_base, lowest, end


@triton.jit
def _merge_exact(
    best, block, ok, q_base, k_base, stride_qd, stride_kj, stride_kd, scale,
    D_CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, K_PAD: tl.constexpr,
    INDEX_BITS: tl.constexpr, TIER_SHIFT: tl.constexpr,
):  # fmt: skip
    """``best`` (the running top-k keys, best first) merged with the exact float32 scores of
    ``block[ok]``, ``D_CHUNK`` dimensions per load."""
    k_rows = k_base + block.to(tl.int64) * stride_kj
    score = tl.zeros(block.shape, tl.float32)
    for d in tl.static_range(0, D_PAD, D_CHUNK):
        chunk = d + tl.arange(0, D_CHUNK)
        chunk_ok = chunk < HEAD_DIM
        q_part = tl.load(q_base + chunk * stride_qd, mask=chunk_ok, other=0.0)
        keys = tl.load(
            k_rows[:, None] + chunk[None, :] * stride_kd, mask=ok[:, None] & chunk_ok[None, :], other=0.0
        )
        score += tl.sum(keys * q_part[None, :], 1)
    score = score * scale
    ok = ok & (score == score)  # NaN means: no candidate
    key = tl.where(ok, _packed_key(score, block, INDEX_BITS, TIER_SHIFT), 0)
    both = tl.reshape(tl.join(best, tl.topk(key, K_PAD)), [2 * K_PAD])
    return tl.topk(both, K_PAD)  # best first (bitonic top-k: cheaper than a sort)


@triton.jit
def _store_top(
    best, idx_ptr, num_ptr, row_id, K_PAD: tl.constexpr, TOP_K: tl.constexpr, INDEX_BITS: tl.constexpr
):
    """A group's block indices (best first, -1 padded) and their count."""
    slot = tl.arange(0, K_PAD)
    best = tl.where(slot < TOP_K, best, 0)
    tl.store(idx_ptr + row_id * TOP_K + slot, _key_block(best, INDEX_BITS), mask=slot < TOP_K)
    tl.store(num_ptr + row_id, tl.sum((best > 0).to(tl.int32), 0))


@triton.jit
def _score_error(
    q, norms_ptr, batch_head, num_norms, error_bound, NORMS_PAD: tl.constexpr, BOUNDS: tl.constexpr
):
    """``eps`` bounding ``|approximate - exact|`` for every block score of query ``q`` (pass 1's
    per-program maxima of ``[|k|**2, |k_attn - k|**2]`` at ``norms_ptr``).

    Without ``BOUNDS``: ``error_bound * |q| * max |k|`` (Cauchy-Schwarz on each product's
    relative rounding). With ``BOUNDS`` (pass 1 scored ``q`` rounded to bfloat16, ``q_r``,
    against ``k_attn``): ``q_r . k_attn - q . k = q_r . (k_attn - k) + (q_r - q) . k``, so
    ``|q_r| max|k_attn - k| + |q_r - q| (max|k| + max|k_attn - k|)`` (the second norm also
    covers scoring ``k_attn`` itself) plus ``error_bound * |q_r| (max|k| + max|k_attn - k|)``
    for both passes' float32 sums."""
    entry = tl.arange(0, NORMS_PAD)
    ok = entry < num_norms
    row = norms_ptr + batch_head * 2 * num_norms
    k_max = tl.sqrt(tl.max(tl.load(row + entry, mask=ok, other=0.0), 0))
    if BOUNDS:
        d_max = tl.sqrt(tl.max(tl.load(row + num_norms + entry, mask=ok, other=0.0), 0))
        q_r = q.to(tl.bfloat16).to(tl.float32)
        q_r_norm = tl.sqrt(tl.sum(q_r * q_r, 0))
        q_err = tl.sqrt(tl.sum((q_r - q) * (q_r - q), 0))
        eps = q_r_norm * d_max + (q_err + error_bound * q_r_norm) * (k_max + d_max)
    else:
        eps = error_bound * tl.sqrt(tl.sum(q * q, 0)) * k_max
    return eps


@triton.jit
def _refine_kernel(
    pq_ptr, km_ptr, span_ptr, bmax_ptr, norms_ptr, counts_ptr, list_ptr, idx_ptr, num_ptr,
    stride_qb, stride_qh, stride_qg, stride_qd,
    stride_kb, stride_kh, stride_kj, stride_kd,
    num_kv_heads, num_groups, num_buckets, num_norms, scale, error_bound,
    BUCKETS_PAD: tl.constexpr, NORMS_PAD: tl.constexpr, BUCKET: tl.constexpr,
    CHUNK_BUCKETS: tl.constexpr, D_CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    K_PAD: tl.constexpr, TOP_K: tl.constexpr, INDEX_BITS: tl.constexpr, TIER_SHIFT: tl.constexpr,
    LEVEL_STEPS: tl.constexpr, BOUNDS: tl.constexpr = False, PDL_WAIT: tl.constexpr = False,
):  # fmt: skip
    """Pass 2, one query group: the threshold under which no top-k block can lie, the buckets
    above it, exact float32 scores of their blocks ``CHUNK_BUCKETS`` buckets at a time, and
    the block indices of the top-k of those. ``list_ptr`` is the row of ``bmax`` itself, as
    int32: once the maxima are in registers it holds the kept buckets, so any number fits."""
    if PDL_WAIT:  # every input but the means comes from the previous launches
        gdc_wait()
    batch_head, row_id, q_base, q, k_base, lowest, end = _group_program(
        pq_ptr, km_ptr, span_ptr, stride_qb, stride_qh, stride_qg, stride_qd, stride_kb, stride_kh,
        num_kv_heads, num_groups, HEAD_DIM, D_PAD,
    )  # fmt: skip

    # A level that at least TOP_K bucket maxima reach (so at most the TOP_K-th largest), by
    # bisection. Buckets at -inf (only NaN means) hold no candidate; with fewer than TOP_K
    # other buckets every one is kept.
    bucket = tl.arange(0, BUCKETS_PAD)
    valid = bucket < (end + BUCKET - 1) // BUCKET
    bmax = tl.load(bmax_ptr + row_id * num_buckets + bucket, mask=valid, other=float("-inf"))
    finite = valid & (bmax > float("-inf"))
    num_finite = tl.sum(finite.to(tl.int32), 0)
    low = _level(bmax, finite, LEVEL_STEPS, TOP_K)
    # Every top-k block's exact score is within 2 * eps of a kept bucket's approximate max:
    # eps bounds |approximate - exact| (``_score_error``).
    eps = _score_error(q, norms_ptr, batch_head, num_norms, error_bound, NORMS_PAD, BOUNDS)
    threshold = tl.where(num_finite >= TOP_K, low - 2.0 * eps, float("-inf"))
    keep = finite & (bmax >= threshold)
    count = tl.sum(keep.to(tl.int32), 0)
    # The kept buckets into the row's list, in any order (the ranking fixes the order): an
    # atomic counter per row (zeroed by pass 1) is far cheaper than a prefix sum.
    tl.debug_barrier()  # every maximum is in registers before the list overwrites them
    slot = tl.atomic_add(counts_ptr + row_id + tl.zeros_like(bucket), 1, mask=keep, sem="relaxed")
    row_list = list_ptr + row_id * num_buckets
    tl.store(row_list + slot, bucket, mask=keep)
    tl.debug_barrier()  # the list's stores before any thread reads it

    # Exact scores of the kept buckets' blocks, CHUNK_BUCKETS buckets at a time (one chunk
    # unless near-ties keep many), merged into the running top-k.
    lane = tl.arange(0, CHUNK_BUCKETS * BUCKET)
    best = tl.zeros([K_PAD], tl.int64)
    for first in range(0, count, CHUNK_BUCKETS):
        entry = first + lane // BUCKET
        chosen = tl.load(row_list + entry, mask=entry < count, other=0)
        block = chosen * BUCKET + lane % BUCKET
        ok = (entry < count) & (block < end) & (block >= lowest)
        best = _merge_exact(
            best, block, ok, q_base, k_base, stride_qd, stride_kj, stride_kd, scale,
            D_CHUNK, HEAD_DIM, D_PAD, K_PAD, INDEX_BITS, TIER_SHIFT,
        )  # fmt: skip
    _store_top(best, idx_ptr, num_ptr, row_id, K_PAD, TOP_K, INDEX_BITS)


@triton.jit
def _refine_warp_kernel(
    pq_ptr, km_ptr, span_ptr, bmax_ptr, tmax_ptr, norms_ptr, bucket_list_ptr, tile_list_ptr, idx_ptr, num_ptr,
    stride_qb, stride_qh, stride_qg, stride_qd,
    stride_kb, stride_kh, stride_kj, stride_kd,
    num_kv_heads, num_groups, num_buckets, num_tiles, num_norms, scale, error_bound,
    TILES_PAD: tl.constexpr, NORMS_PAD: tl.constexpr, BUCKET: tl.constexpr, TILE_BUCKETS: tl.constexpr,
    TILE_STEP: tl.constexpr, CHUNK_BUCKETS: tl.constexpr, D_CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr, K_PAD: tl.constexpr, TOP_K: tl.constexpr, INDEX_BITS: tl.constexpr,
    TIER_SHIFT: tl.constexpr, LEVEL_STEPS: tl.constexpr, BOUNDS: tl.constexpr = False,
    PDL_WAIT: tl.constexpr = False,
):  # fmt: skip
    """Pass 2 in a warp or two per query group, from the tile maxima down: the level comes from
    the ~200 tile maxima (not ~3,000 bucket maxima), only candidate tiles' bucket maxima are
    read, and every reduction stays inside the warp. Lists live in the rows they were read
    from: the candidate tiles in the row of tile maxima, the kept buckets in the candidate
    tiles' own (already read) stretches of the row of bucket maxima, so any number fits."""
    if PDL_WAIT:  # every input but the means comes from the previous launches
        gdc_wait()
    batch_head, row_id, q_base, q, k_base, lowest, end = _group_program(
        pq_ptr, km_ptr, span_ptr, stride_qb, stride_qh, stride_qg, stride_qd, stride_kb, stride_kh,
        num_kv_heads, num_groups, HEAD_DIM, D_PAD,
    )  # fmt: skip
    valid_buckets = (end + BUCKET - 1) // BUCKET

    # The level: TOP_K tile maxima are distinct blocks' scores. With fewer finite tiles the
    # level is -inf (every bucket kept: at most TOP_K - 1 tiles to score).
    tile = tl.arange(0, TILES_PAD)
    tile_row = tmax_ptr + row_id * num_tiles
    tmax = tl.load(tile_row + tile, mask=tile * TILE_BUCKETS < valid_buckets, other=float("-inf"))
    finite = tmax > float("-inf")
    low = _level(tmax, finite, LEVEL_STEPS, TOP_K)
    eps = _score_error(q, norms_ptr, batch_head, num_norms, error_bound, NORMS_PAD, BOUNDS)
    enough = tl.sum(finite.to(tl.int32), 0) >= TOP_K
    threshold = tl.where(enough, low - 2.0 * eps, float("-inf"))

    # Candidate tiles, compacted into the row of tile maxima (read above).
    candidate = finite & (tmax >= threshold)
    num_candidates = tl.sum(candidate.to(tl.int32), 0)
    tile_list = tile_list_ptr + row_id * num_tiles
    tl.debug_barrier()
    tl.store(tile_list + tl.cumsum(candidate.to(tl.int32), 0) - 1, tile, mask=candidate)
    tl.debug_barrier()

    # Their buckets above the threshold, TILE_STEP tiles at a time. List entry i lives in
    # candidate tile i // TILE_BUCKETS's own stretch, read in this or an earlier step.
    bucket_row = bmax_ptr + row_id * num_buckets
    bucket_list = bucket_list_ptr + row_id * num_buckets
    lane = tl.arange(0, TILE_STEP * TILE_BUCKETS)
    count = 0
    for first in range(0, num_candidates, TILE_STEP):
        entry = first + lane // TILE_BUCKETS
        chosen = tl.load(tile_list + entry, mask=entry < num_candidates, other=0)
        bucket = chosen * TILE_BUCKETS + lane % TILE_BUCKETS
        ok = (entry < num_candidates) & (bucket < valid_buckets)
        bmax = tl.load(bucket_row + bucket, mask=ok, other=float("-inf"))
        keep = ok & (bmax > float("-inf")) & (bmax >= threshold)
        slot = count + tl.cumsum(keep.to(tl.int32), 0) - 1
        home = tl.load(tile_list + slot // TILE_BUCKETS, mask=keep, other=0)
        tl.debug_barrier()  # this step's maxima are read before the list overwrites them
        tl.store(bucket_list + home * TILE_BUCKETS + slot % TILE_BUCKETS, bucket, mask=keep)
        count += tl.sum(keep.to(tl.int32), 0)
    tl.debug_barrier()

    # Exact scores of the kept buckets' blocks, merged into the running top-k.
    lane = tl.arange(0, CHUNK_BUCKETS * BUCKET)
    best = tl.zeros([K_PAD], tl.int64)
    for first in range(0, count, CHUNK_BUCKETS):
        entry = first + lane // BUCKET
        listed = entry < count
        home = tl.load(tile_list + entry // TILE_BUCKETS, mask=listed, other=0)
        chosen = tl.load(bucket_list + home * TILE_BUCKETS + entry % TILE_BUCKETS, mask=listed, other=0)
        block = chosen * BUCKET + lane % BUCKET
        ok = listed & (block < end) & (block >= lowest)
        best = _merge_exact(
            best, block, ok, q_base, k_base, stride_qd, stride_kj, stride_kd, scale,
            D_CHUNK, HEAD_DIM, D_PAD, K_PAD, INDEX_BITS, TIER_SHIFT,
        )  # fmt: skip
    _store_top(best, idx_ptr, num_ptr, row_id, K_PAD, TOP_K, INDEX_BITS)


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
# only leave the sums.
_ERROR_BOUND = {"tf32": 2.5e-3, "ieee": 1.0e-4}
# Pass 1 on bfloat16 block means (``approx_keys``) with the queries rounded to bfloat16: the
# rounding's share of the error comes from the data (``_score_error``; a worst-case constant
# would be 2 * 2**-8 + 2**-16 per unit of |q| * max|k|, round to nearest keeping 8 significant
# bits), and this per unit of |q| * (max|k| + max|k_attn - k|) covers both passes' float32 sums.
_SUMS_ERROR_BOUND = 5e-4
# Pass 2 holds a row's bucket maxima in registers, and pass 1 writes them: at most this many
# per row (at most 59 MiB of maxima for the authors' 3,744 groups). Measured on an H200 at
# 369,720 / 1,872,000 tokens: 4,096 (buckets of 4 / 16 blocks) beat 2,048 (8 / 32 blocks).
_MAX_BUCKETS = 4096
# Pass 2 scores this many blocks per step (128 beat 256 and 512 on the H200); top_k above it
# goes to the one-pass kernel.
_CHUNK_LANES = 128
# Under Triton's CPU interpreter (tests), where a test's few candidates fit in fewer lanes and
# each of tl.topk's bitonic stages costs a round of interpreted calls: 128 lanes were half of
# a small GatedCache rollout's time.
_INTERPRETER_CHUNK_LANES = 32
# Rows of more than this many buckets use the warp refine pass, shorter ones the block refine
# pass in 2 warps (H200, 2026-12-01, both passes: block 0.072 vs warp 0.113 ms at 273 buckets,
# 0.113 vs 0.099 at 819, 0.218 vs 0.178 at 3,081; between 273 and 819 is not measured). The
# block pass on longer rows (``refine="block"``) runs 4 warps.
_WARP_REFINE_BUCKETS = 512
# Pass 1's launch: 64-row tiles in 4 warps (one warpgroup), about this many programs per SM.
# H200, 2026-12-02, both passes (raw: benchmarks/results/2026-12-02-h200-selection-bounds.json):
# 0.143 ms at 369,720 tokens vs 0.151 for 128 rows in 8 warps at 3 per SM (the former choice: one
# such program fits an SM), 0.095 vs 0.098 at 93,600, 0.078 vs 0.077 at 28,080, 0.477 vs 0.515 at
# 1,872,000; 12 per SM was within 1% at 60 s and slower at 60 frames, 4 and 6 slower at 60 s.
_PASS_1_ROWS, _PASS_1_WARPS, _PASS_1_PER_SM = 64, 4, 8


def default_bucket(num_slots: int) -> int:
    """Blocks per bucket: small (4) so that pass 2 scores few blocks exactly, larger only when
    a row's bucket maxima would exceed ``_MAX_BUCKETS`` (4 up to 491,520 tokens of 30-token
    blocks, 16 at 1,872,000)."""
    return max(4, triton.next_power_of_2(math.ceil(num_slots / _MAX_BUCKETS)))


def _strides(pooled_q: torch.Tensor, k_means: torch.Tensor) -> dict:
    return dict(
        stride_qb=pooled_q.stride(0), stride_qh=pooled_q.stride(1),
        stride_qg=pooled_q.stride(2), stride_qd=pooled_q.stride(3),
        stride_kb=k_means.stride(0), stride_kh=k_means.stride(1),
        stride_kj=k_means.stride(2), stride_kd=k_means.stride(3),
    )  # fmt: skip


def stream_topk(
    pooled_q: torch.Tensor,
    k_means: torch.Tensor,
    span: torch.Tensor,
    *,
    top_k: int,
    scale: float,
    rows: int = 64,
    block_n: int = 64,
    precision: str | None = None,
    num_warps: int = 4,
    per_sm: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-pass kernel: ``(block_idx [B, Hkv, G, top_k] int32, num_blocks [B, Hkv, G]
    int32)``, best first, ``-1`` padded; the splits' sets are merged by ``torch.topk``."""
    span = as_span(span)
    batch, kv_heads, groups, head_dim = pooled_q.shape
    num_slots = k_means.shape[2]
    device = pooled_q.device
    if precision is None:
        precision = "tf32x3" if pooled_q.is_cuda else "ieee"
    k_pad = triton.next_power_of_2(top_k)
    splits, per_split = plan(groups, num_slots, batch * kv_heads, device, rows, block_n, per_sm)
    keys = torch.empty((batch, kv_heads, splits, groups, k_pad), dtype=torch.int64, device=device)
    if keys.numel():
        _stream_topk_kernel[(math.ceil(groups / rows), batch * kv_heads, splits)](
            pq_ptr=pooled_q, km_ptr=k_means, span_ptr=span, keys_ptr=keys, **_strides(pooled_q, k_means),
            num_kv_heads=kv_heads, num_groups=groups, blocks_per_split=per_split, scale=scale,
            ROWS=rows, BLOCK_N=block_n, HEAD_DIM=head_dim, D_PAD=max(16, triton.next_power_of_2(head_dim)),
            K_PAD=k_pad, TOP_K=top_k, INDEX_BITS=_INDEX_BITS, TIER_SHIFT=_TIER_SHIFT, PRECISION=precision,
            num_warps=num_warps,
        )  # fmt: skip
    keys = keys.permute(0, 1, 3, 2, 4).flatten(-2)
    if keys.shape[-1] != k_pad:  # merge the splits' sets
        keys = torch.topk(keys, k_pad, dim=-1, sorted=True).values
    return decode_keys(keys, top_k)


def bucket_maxima(
    pooled_q: torch.Tensor,
    k_means: torch.Tensor,
    span: torch.Tensor,
    *,
    bucket: int,
    rows: int,
    block_n: int,
    precision: str,
    num_warps: int,
    per_sm: int,
    num_stages: int | None = None,
    tile_maxima: bool = False,
    bounds: torch.Tensor | None = None,
    pdl: bool = False,
    pdl_trigger: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Pass 1: ``(bmax [B * Hkv * G, buckets] float32, norms [B * Hkv, 2, programs per head]
    float32, counts [B * Hkv * G] int32, tmax [B * Hkv * G, tiles] float32 or None)``: unscaled
    approximate scores' maximum per bucket of ``bucket`` blocks (buckets past the span's end
    hold junk, blocks before its start count as -inf), each program's largest squared norm of
    the scored block means (``norms[:, 0]``; of
    ``bounds[..., 0]`` when ``bounds`` are given, and ``norms[:, 1]`` their ``[..., 1]``, else
    0), zeroed candidate counters, and with ``tile_maxima`` each ``block_n`` tile's maximum.
    ``pdl``: launched to overlap the previous kernel's tail (``omnimem.kernels.pdl``);
    ``pdl_trigger``: let the next kernel start as soon as every program of this one has."""
    span = as_span(span)
    batch, kv_heads, groups, head_dim = pooled_q.shape
    num_slots = k_means.shape[2]
    device = pooled_q.device
    splits, per_split = plan(groups, num_slots, batch * kv_heads, device, rows, block_n, per_sm)
    tiles = max(1, math.ceil(num_slots / block_n))
    num_buckets = tiles * (block_n // bucket)  # whole tiles: pass 1 stores every bucket of a tile
    bmax = torch.empty((batch * kv_heads * groups, num_buckets), dtype=torch.float32, device=device)
    norms = torch.empty(
        (batch * kv_heads, 2, splits * math.ceil(groups / rows)), dtype=torch.float32, device=device
    )
    if bounds is not None and (bounds.stride(-1), bounds.stride(-2)) != (1, 2):
        bounds = bounds.contiguous()
    counts = torch.empty(batch * kv_heads * groups, dtype=torch.int32, device=device)
    tmax = (
        torch.empty((batch * kv_heads * groups, tiles), dtype=torch.float32, device=device)
        if tile_maxima
        else None
    )
    _bucket_max_kernel[(math.ceil(groups / rows), batch * kv_heads, splits)](
        pq_ptr=pooled_q, km_ptr=k_means, span_ptr=span, bmax_ptr=bmax, norms_ptr=norms, counts_ptr=counts,
        tmax_ptr=bmax if tmax is None else tmax, bounds_ptr=norms if bounds is None else bounds,
        stride_bb=0 if bounds is None else bounds.stride(0),
        stride_bh=0 if bounds is None else bounds.stride(1),
        BOUNDS=bounds is not None, **_strides(pooled_q, k_means),
        num_kv_heads=kv_heads, num_groups=groups, num_buckets=num_buckets, blocks_per_split=per_split,
        num_tiles=tiles, ROWS=rows, BLOCK_N=block_n, BUCKET=bucket, HEAD_DIM=head_dim,
        D_PAD=max(16, triton.next_power_of_2(head_dim)), PRECISION=precision, TILE_MAXIMA=tile_maxima,
        PDL_WAIT=pdl, PDL_TRIGGER=pdl_trigger, num_warps=num_warps,
        **({} if num_stages is None else {"num_stages": num_stages}),
        **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip
    return bmax, norms, counts, tmax


def two_pass_topk(
    pooled_q: torch.Tensor,
    k_means: torch.Tensor,
    span: torch.Tensor,
    *,
    top_k: int,
    scale: float,
    rows: int = _PASS_1_ROWS,
    block_n: int = 64,
    precision: str | None = None,
    num_warps: int = _PASS_1_WARPS,
    per_sm: int = _PASS_1_PER_SM,
    error_bound: float | None = None,
    bucket: int | None = None,
    chunk_lanes: int | None = None,
    refine_warps: int | None = None,
    level_steps: int = 8,
    d_chunk: int | None = None,
    refine: str | None = None,
    approx_keys: torch.Tensor | None = None,
    key_bounds: torch.Tensor | None = None,
    num_stages: int | None = None,
    pdl: bool = False,
    pdl_trigger: bool = False,
    refine_maxnreg: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate bucket maxima, then exact scores of the few buckets that may hold a top-k
    block: ``(block_idx [B, Hkv, G, top_k] int32, num_blocks [B, Hkv, G] int32)``, exact
    whatever the data (near-ties only make pass 2 score more blocks).

    ``approx_keys``: ``k_means`` in bfloat16 (a cache's ``k_attn``), for pass 1 on half the
    bytes at the bfloat16 tensor-core rate (CUDA only: Triton's interpreter computes bfloat16
    dots wrongly), with ``key_bounds`` ``[B, Hkv, NB, 2]`` (``omnimem.pooling.key_bounds``:
    each block's ``|k_means|**2`` and ``|approx_keys - k_means|**2``), from which the error
    bound is computed; ``error_bound`` then covers only the float32 sums. ``refine``:
    ``"block"`` (``_refine_kernel``, one program
    per group over every bucket maximum: 2 warps, 4 past ``_WARP_REFINE_BUCKETS`` buckets) or
    ``"warp"`` (``_refine_warp_kernel``, 2 warps per group from pass 1's tile maxima down); by
    default ``"warp"`` past ``_WARP_REFINE_BUCKETS`` buckets per row. ``pdl``: both passes are
    launched to overlap their predecessor's tail (``omnimem.kernels.pdl``; CUDA, sm_90+);
    ``pdl_trigger``: pass 1 lets pass 2 start once all its programs have; ``refine_maxnreg``:
    a register cap for the warp refine pass."""
    span = as_span(span)
    batch, kv_heads, groups, head_dim = pooled_q.shape
    num_slots = k_means.shape[2]
    device = pooled_q.device
    if precision is None:
        precision = "tf32" if pooled_q.is_cuda else "ieee"
    if approx_keys is not None:
        if (
            approx_keys.dtype != torch.bfloat16
            or approx_keys.shape != k_means.shape
            or not approx_keys.is_cuda
        ):
            raise ValueError(
                f"approx_keys must be a CUDA bfloat16 tensor of k_means' shape {tuple(k_means.shape)}, "
                f"got {approx_keys.dtype} {tuple(approx_keys.shape)} on {approx_keys.device}"
            )
        want = (*k_means.shape[:3], 2)
        if (
            not isinstance(key_bounds, torch.Tensor)
            or tuple(key_bounds.shape) != want
            or key_bounds.dtype != torch.float32
            or key_bounds.device != approx_keys.device
        ):
            raise ValueError(
                f"approx_keys needs key_bounds, a float32 {list(want)} tensor on its device "
                f"(omnimem.pooling.key_bounds), got {getattr(key_bounds, 'shape', key_bounds)}"
            )
        default_bound = _SUMS_ERROR_BOUND
    elif key_bounds is not None:
        raise ValueError("key_bounds go with approx_keys (the first pass's bfloat16 keys), got none")
    else:
        default_bound = _ERROR_BOUND[precision]
    error_bound = default_bound if error_bound is None else error_bound
    bucket = default_bucket(num_slots) if bucket is None else bucket
    block_n = max(block_n, bucket)
    k_pad = max(2, triton.next_power_of_2(top_k))  # tl.topk needs two lanes
    if chunk_lanes is None:  # the CPU interpreter pays per bitonic stage, not per lane
        chunk_lanes = _CHUNK_LANES if pooled_q.is_cuda else _INTERPRETER_CHUNK_LANES
    lanes = max(chunk_lanes, k_pad, bucket)
    d_pad = max(16, triton.next_power_of_2(head_dim))
    block_idx = torch.empty((batch, kv_heads, groups, top_k), dtype=torch.int32, device=device)
    num_blocks = torch.empty((batch, kv_heads, groups), dtype=torch.int32, device=device)
    if block_idx.numel() == 0:
        return block_idx, num_blocks
    if d_chunk is None:  # registers bound the GPU's step; the CPU interpreter pays per step
        d_chunk = 16 if pooled_q.is_cuda else d_pad
    if refine is None:  # the warp pass wins once a row's maxima outgrow one warp's registers
        refine = "warp" if math.ceil(num_slots / bucket) > _WARP_REFINE_BUCKETS else "block"
    if refine not in ("block", "warp"):
        raise ValueError(f"refine must be 'block' or 'warp', got {refine!r}")
    warp = refine == "warp"
    bmax, norms, counts, tmax = bucket_maxima(
        pooled_q, k_means if approx_keys is None else approx_keys, span, bucket=bucket, rows=rows,
        block_n=block_n, precision=precision, num_warps=num_warps, per_sm=per_sm, num_stages=num_stages,
        tile_maxima=warp, bounds=key_bounds, pdl=pdl, pdl_trigger=pdl_trigger,
    )  # fmt: skip
    bounded = key_bounds is not None
    launch = {"launch_pdl": True} if pdl else {}
    if warp:
        num_buckets, num_norms = bmax.shape[1], norms.shape[2]
        _refine_warp_kernel[(groups, batch * kv_heads)](
            pq_ptr=pooled_q, km_ptr=k_means, span_ptr=span, bmax_ptr=bmax, tmax_ptr=tmax, norms_ptr=norms,
            bucket_list_ptr=bmax.view(torch.int32), tile_list_ptr=tmax.view(torch.int32), idx_ptr=block_idx,
            num_ptr=num_blocks, **_strides(pooled_q, k_means),
            num_kv_heads=kv_heads, num_groups=groups, num_buckets=num_buckets, num_tiles=tmax.shape[1],
            num_norms=num_norms, scale=scale, error_bound=error_bound,
            TILES_PAD=triton.next_power_of_2(tmax.shape[1]), NORMS_PAD=triton.next_power_of_2(num_norms),
            BUCKET=bucket, TILE_BUCKETS=block_n // bucket, TILE_STEP=max(1, 128 // (block_n // bucket)),
            CHUNK_BUCKETS=lanes // bucket, D_CHUNK=min(d_pad, d_chunk), HEAD_DIM=head_dim, D_PAD=d_pad,
            K_PAD=k_pad, TOP_K=top_k, INDEX_BITS=_INDEX_BITS, TIER_SHIFT=_TIER_SHIFT,
            LEVEL_STEPS=level_steps, BOUNDS=bounded, PDL_WAIT=pdl, num_warps=refine_warps or 2, **launch,
            **({} if refine_maxnreg is None else {"maxnreg": refine_maxnreg}),
        )  # fmt: skip
        return block_idx, num_blocks
    if refine_warps is None:
        refine_warps = 2 if math.ceil(num_slots / bucket) <= _WARP_REFINE_BUCKETS else 4
    num_buckets, num_norms = bmax.shape[1], norms.shape[2]
    _refine_kernel[(groups, batch * kv_heads)](
        pq_ptr=pooled_q, km_ptr=k_means, span_ptr=span, bmax_ptr=bmax, norms_ptr=norms, counts_ptr=counts,
        list_ptr=bmax.view(torch.int32), idx_ptr=block_idx, num_ptr=num_blocks,
        **_strides(pooled_q, k_means),
        num_kv_heads=kv_heads, num_groups=groups, num_buckets=num_buckets, num_norms=num_norms,
        scale=scale, error_bound=error_bound, BUCKETS_PAD=triton.next_power_of_2(num_buckets),
        NORMS_PAD=triton.next_power_of_2(num_norms), BUCKET=bucket, CHUNK_BUCKETS=lanes // bucket,
        D_CHUNK=min(d_pad, d_chunk), HEAD_DIM=head_dim, D_PAD=d_pad,
        K_PAD=k_pad, TOP_K=top_k, INDEX_BITS=_INDEX_BITS, TIER_SHIFT=_TIER_SHIFT,
        LEVEL_STEPS=level_steps, BOUNDS=bounded, PDL_WAIT=pdl, num_warps=refine_warps, **launch,
    )  # fmt: skip
    return block_idx, num_blocks


def decode_keys(keys: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block_idx int32, num_blocks int32)`` from packed keys, best first (0: none)."""
    keys = keys[..., :top_k]
    index_mask = (1 << _INDEX_BITS) - 1
    block = torch.where(keys > 0, index_mask - (keys & index_mask), -1).int()
    return block, (keys > 0).sum(-1, dtype=torch.int32)


@functools.cache
def _log_one_pass(top_k: int) -> None:
    logging.getLogger("omnimem").info(
        "gated selection: top_k=%d is above the two-pass kernels' %d-block steps; "
        "running the one-pass kernel (slower at long histories)",
        top_k,
        _CHUNK_LANES,
    )


def group_topk(
    pooled_q: torch.Tensor,
    k_means: torch.Tensor,
    span: torch.Tensor,
    *,
    top_k: int,
    scale: float,
    one_pass: bool | None = None,
    **options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block_idx [B, Hkv, G, top_k] int32, num_blocks [B, Hkv, G] int32)``, as
    ``select_groups_torch``: the same keys, up to the float32 rounding order of the scores.

    ``pooled_q [B, Hkv, G, D]`` and ``k_means [B, Hkv, NB, D]`` are float32; ``span`` is a
    ``[2]`` integer tensor (candidates are the blocks ``[start, end)``; ``candidate_span``) or
    a 0-d ``end`` (``[0, end)``). The two-pass kernels unless
    ``top_k`` exceeds their step (or ``one_pass=True``); ``options`` go to the chosen launcher
    (``approx_keys``, ``key_bounds`` and ``pdl`` only to the two-pass one, which alone uses
    them).
    """
    if one_pass is None:
        one_pass = top_k > _CHUNK_LANES
    if one_pass:
        options.pop("approx_keys", None)
        options.pop("key_bounds", None)
        options.pop("pdl", None)
    else:
        return two_pass_topk(pooled_q, k_means, span, top_k=top_k, scale=scale, **options)
    if top_k > _CHUNK_LANES:
        _log_one_pass(top_k)
    return stream_topk(pooled_q, k_means, span, top_k=top_k, scale=scale, **options)
