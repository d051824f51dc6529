"""Per-head scattered-block attention: the Triton kernel and its launcher (reference: ``dense``).

A query tile (``BLOCK_M`` queries of one head) walks that head's row of the block table, reading
each selected history block straight from the KV cache (no gathered copy), then the contiguous
current chunk; online softmax in float32 with ``exp2``.

- One program per tile, except in the last, partly filled wave: its tiles are cut into equal
  ranges of key tiles, one program each, merged through the output buffer itself (444 tiles
  on 132 SMs at wan-1.3b shapes would leave 2/3 of the SMs idle through a fourth wave; split
  in two, the wave takes half the time; measured 7% faster). A persistent stream-K loop
  balances better on paper, but its loop nest pushed the kernel past 255 registers (spills)
  and ran every tile 10% slower.
- Whole history tiles run software-pipelined by hand: the next tile's scores are issued
  before this tile's softmax (another 2%).
- Loads go through TMA tensor descriptors over the 4-D ``[B, H, L, D]`` view of the cache when
  the strides allow (Hopper's copy engine; either cache layout is just other strides), else
  through pointer arithmetic with the same strides.
- Masks cost ALU time in the inner loop, so only tiles that need one evaluate it: the history
  block that holds the last history token (the table is ascending, so it is the last slot) and
  the chunk's last tile. Every other tile is whole by construction. With several query groups
  (or block sizes that tiles do not divide) every tile is masked: rows of a tile belong to
  groups that may not attend a block, read from a dense per-group table.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from omnimem.backends.quantized_tiles import decoded_tile
from omnimem.store.blocks import QuantizedBlocks


@triton.jit
def _load_tile(
    base, desc, batch, head, start, limit, stride_l, stride_d,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    USE_TMA: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Keys or values ``[start, start + BLOCK_N)`` of one head; tokens ``>= limit`` read as 0."""
    if USE_TMA:
        # The copy engine zero-fills past the buffer; tokens past `limit` inside it are finite
        # (chunk or preallocated space) and masked out of the scores.
        return desc.load([batch, head, start, 0]).reshape(BLOCK_N, BLOCK_D)
    tokens = start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    ptrs = base + tokens[:, None].to(tl.int64) * stride_l + dims[None, :] * stride_d
    if MASKED or HEAD_DIM != BLOCK_D:
        return tl.load(ptrs, mask=(tokens[:, None] < limit) & (dims[None, :] < HEAD_DIM), other=0.0)
    return tl.load(ptrs)


@triton.jit
def _rotate_keys(k, start, rot_row, cos_ptr, sin_ptr, frame_tokens, num_frames, dtype: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PAIRS: tl.constexpr):  # fmt: skip
    """Keys ``k [BLOCK_N, BLOCK_D]`` of tokens ``[start, start + BLOCK_N)`` (the cache's
    numbering) with their first ``PAIRS`` channel pairs rotated in time by their frame's
    relative position (``rot_row``: this (batch, KV head)'s position of every frame; ``cos``,
    ``sin``: ``[positions, PAIRS]`` float32), in float32, rounded once to ``dtype``: what
    ``omnimem.positions.RelativeTime.rotate`` does to a copy. Tokens past the last frame (never
    attended: masked) read the last frame's position."""
    frames = tl.minimum((start + tl.arange(0, BLOCK_N)) // frame_tokens, num_frames - 1)
    pos = tl.load(rot_row + frames).to(tl.int64)
    HALF: tl.constexpr = BLOCK_D // 2
    pairs = tl.arange(0, HALF)
    turn = pos[:, None] * PAIRS + pairs[None, :]
    rotated = pairs[None, :] < PAIRS
    cos = tl.load(cos_ptr + turn, mask=rotated, other=1.0)
    sin = tl.load(sin_ptr + turn, mask=rotated, other=0.0)
    re, im = tl.split(tl.reshape(k.to(tl.float32), (BLOCK_N, HALF, 2)))
    return tl.reshape(tl.join(re * cos - im * sin, re * sin + im * cos), (BLOCK_N, BLOCK_D)).to(dtype)


@triton.jit
def _softmax_update(scores, v, v_mult, m_i, l_i, acc, MASKED: tl.constexpr, PRECISION: tl.constexpr,
                    SCALED: tl.constexpr):  # fmt: skip
    """One online-softmax update of ``(m_i, l_i, acc)`` with scaled scores and values ``v``
    (``SCALED``: an fp8 block's values, whose scale ``v_mult`` multiplies the probabilities)."""
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    # Masked rows with nothing attended so far keep m = -inf: shift by 0 there (no inf - inf).
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new) if MASKED else m_new
    p = tl.exp2(scores - m_shift[:, None])
    alpha = tl.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    weights = p * v_mult if SCALED else p
    # Rescaled accumulator fed to the dot: the MMA accumulates in place (no second tile).
    acc = tl.dot(weights.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _softmax_step(q, k, v, k_mult, v_mult, valid, qk_scale, m_i, l_i, acc, MASKED: tl.constexpr,
                  PRECISION: tl.constexpr, SCALED: tl.constexpr):  # fmt: skip
    """Scores of ``q`` against keys ``k`` (``valid`` ones when masked), then the update."""
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (qk_scale * k_mult if SCALED else qk_scale)
    if MASKED:
        scores = tl.where(valid, scores, float("-inf"))
    return _softmax_update(scores, v, v_mult, m_i, l_i, acc, MASKED, PRECISION, SCALED)


@triton.jit
def _history_tile(
    base, desc, batch, kv_head, block, start, limit, stride_l, stride_d,
    codes, scale_ptr, min_ptr, scales, stride_cl, stride_sn, whole_blocks, native_from, dtype: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr,
    MASKED: tl.constexpr, QUANT: tl.constexpr, IS_KEY: tl.constexpr, WHOLE: tl.constexpr,
    rot_row, cos_ptr, sin_ptr, frame_tokens, num_frames, PAIRS: tl.constexpr,
):  # fmt: skip
    """Keys or values ``[start, start + BLOCK_N)`` of block ``block`` (tokens ``>= limit`` read
    as 0 when ``MASKED``) and the factor of their scores or probabilities. Native caches
    (``QUANT == 0``) read ``base``; a quantized history (1: fp8, 2: int4) reads its whole blocks'
    codes (``quantized_tiles``) and the rest, the partial last block and the chunk, from
    ``base`` at ``token - native_from``. ``WHOLE``: the block is known to be whole. ``PAIRS``:
    keys are rotated in time (``_rotate_keys``; 0: not)."""
    if QUANT == 0:
        tile = _load_tile(base, desc, batch, kv_head, start, limit, stride_l, stride_d,
                          BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA, MASKED)  # fmt: skip
        mult = tl.full([], 1.0, tl.float32)
    elif WHOLE:
        tile, mult = decoded_tile(codes, scale_ptr, min_ptr, scales, block, start, limit, stride_cl,
                                  stride_sn, dtype, BLOCK_N, BLOCK_D, HEAD_DIM, QUANT == 2, MASKED,
                                  IS_KEY)  # fmt: skip
    else:
        if block < whole_blocks:
            tile, mult = decoded_tile(codes, scale_ptr, min_ptr, scales, block, start, limit, stride_cl,
                                      stride_sn, dtype, BLOCK_N, BLOCK_D, HEAD_DIM, QUANT == 2, True,
                                      IS_KEY)  # fmt: skip
        else:
            tile = _load_tile(base, desc, batch, kv_head, start - native_from, limit - native_from, stride_l,
                              stride_d, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA, True).to(dtype)  # fmt: skip
            mult = tl.full([], 1.0, tl.float32)
    if IS_KEY and PAIRS > 0:
        tile = _rotate_keys(tile, start, rot_row, cos_ptr, sin_ptr, frame_tokens, num_frames, dtype,
                            BLOCK_N, BLOCK_D, PAIRS)  # fmt: skip
    return tile, mult


@triton.jit
def _masked_tile_step(
    q, k_base, v_base, k_desc, v_desc, batch, kv_head, block, start, limit, rows_attend, qk_scale,
    m_i, l_i, acc, stride_kl, stride_kd, stride_vl, stride_vd,
    kq, vq, k_scale_ptr, v_scale_ptr, k_min_ptr, v_min_ptr, k_scales, v_scales,
    stride_cl, stride_ksn, stride_vsn, whole_blocks, native_from,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr,
    PRECISION: tl.constexpr, QUANT: tl.constexpr,
    rot_row, cos_ptr, sin_ptr, frame_tokens, num_frames, PAIRS: tl.constexpr,
):  # fmt: skip
    """The update with keys ``[start, start + BLOCK_N)`` of block ``block`` (the chunk: any
    block ``>= whole_blocks``): tokens ``>= limit`` and rows not in ``rows_attend`` masked out."""
    k, k_mult = _history_tile(
        k_base, k_desc, batch, kv_head, block, start, limit, stride_kl, stride_kd,
        kq, k_scale_ptr, k_min_ptr, k_scales, stride_cl, stride_ksn, whole_blocks, native_from, q.dtype,
        BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA, True, QUANT, True, False,
        rot_row, cos_ptr, sin_ptr, frame_tokens, num_frames, PAIRS,
    )  # fmt: skip
    v, v_mult = _history_tile(
        v_base, v_desc, batch, kv_head, block, start, limit, stride_vl, stride_vd,
        vq, v_scale_ptr, v_min_ptr, v_scales, stride_cl, stride_vsn, whole_blocks, native_from, q.dtype,
        BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA, True, QUANT, False, False,
        rot_row, cos_ptr, sin_ptr, frame_tokens, num_frames, PAIRS,
    )  # fmt: skip
    token_ok = (start + tl.arange(0, BLOCK_N)) < limit
    if USE_TMA:
        # The copy engine reads whole tiles: values past `limit` (another block, perhaps a
        # corrupted one) would reach the output through 0 * NaN. Zero them.
        v = tl.where(token_ok[:, None], v, 0.0)
    valid = rows_attend[:, None] & token_ok[None, :]
    return _softmax_step(q, k, v, k_mult, v_mult, valid, qk_scale, m_i, l_i, acc, True, PRECISION, QUANT == 1)


@triton.jit
def _attend_range(
    q, k_base, v_base, k_desc, v_desc, batch, kv_head, rows, row_valid,
    table_ptr, num_tile_blocks, attended_row, history_len, chunk_len, it_begin, it_end,
    stride_kl, stride_kd, stride_vl, stride_vd, qk_scale,
    kq, vq, k_scale_ptr, v_scale_ptr, k_min_ptr, v_min_ptr, k_scales, v_scales,
    stride_cl, stride_ksn, stride_vsn,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HAS_GROUPS: tl.constexpr, ALL_MASKED: tl.constexpr,
    USE_TMA: tl.constexpr, PRECISION: tl.constexpr, QUANT: tl.constexpr,
    rot_row, cos_ptr, sin_ptr, frame_tokens, num_frames, PAIRS: tl.constexpr,
):  # fmt: skip
    """Online softmax of one query tile over its key tiles ``[it_begin, it_end)``: the
    selected history blocks first (``SUBS`` key tiles each, in table order), then the chunk.
    With a quantized history (``QUANT``), ``k_base``/``v_base`` hold the tokens from the first
    partial block on (the partial block, then the chunk)."""
    SUBS: tl.constexpr = (BLOCK_SIZE + BLOCK_N - 1) // BLOCK_N
    SCALED: tl.constexpr = QUANT == 1
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hist_iters = num_tile_blocks * SUBS
    whole_blocks = history_len // BLOCK_SIZE
    native_from = whole_blocks * BLOCK_SIZE if QUANT else 0

    if ALL_MASKED:
        for it in range(it_begin, tl.minimum(it_end, hist_iters)):
            block = tl.load(table_ptr + it // SUBS).to(tl.int32)
            if HAS_GROUPS:
                rows_attend = tl.load(attended_row + block, mask=row_valid, other=0) != 0
            else:
                rows_attend = row_valid
            block_end = tl.minimum(block * BLOCK_SIZE + BLOCK_SIZE, history_len)
            start = block * BLOCK_SIZE + (it % SUBS) * BLOCK_N
            m_i, l_i, acc = _masked_tile_step(
                q, k_base, v_base, k_desc, v_desc, batch, kv_head, block, start, block_end, rows_attend,
                qk_scale, m_i, l_i, acc, stride_kl, stride_kd, stride_vl, stride_vd,
                kq, vq, k_scale_ptr, v_scale_ptr, k_min_ptr, v_min_ptr, k_scales, v_scales,
                stride_cl, stride_ksn, stride_vsn, whole_blocks, native_from,
                BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA, PRECISION, QUANT,
                rot_row, cos_ptr, sin_ptr, frame_tokens, num_frames, PAIRS,
            )  # fmt: skip
    else:
        # Whole blocks: no masks. Only the last slot may hold the partial block: masked below.
        whole_iters = hist_iters - SUBS
        hist_stop = tl.minimum(it_end, whole_iters)
        if hist_stop > it_begin:
            # Software-pipelined by hand: the next tile's scores are issued before this tile's
            # softmax, so that the tensor cores have work while the softmax runs (FA3's
            # intra-warpgroup overlap): 2% faster. The same for the chunk's tiles, in one loop
            # with the history, measured 5% slower (scalar selects of the addresses).
            block = tl.load(table_ptr + it_begin // SUBS).to(tl.int32)
            start = block * BLOCK_SIZE + (it_begin % SUBS) * BLOCK_N
            k, k_mult = _history_tile(
                k_base, k_desc, batch, kv_head, block, start, history_len, stride_kl, stride_kd,
                kq, k_scale_ptr, k_min_ptr, k_scales, stride_cl, stride_ksn, whole_blocks, native_from,
                q.dtype, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA, False, QUANT, True, True,
                rot_row, cos_ptr, sin_ptr, frame_tokens, num_frames, PAIRS,
            )  # fmt: skip
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (
                qk_scale * k_mult if SCALED else qk_scale
            )
            for it in tl.range(it_begin, hist_stop - 1):
                block_next = tl.load(table_ptr + (it + 1) // SUBS).to(tl.int32)
                start_next = block_next * BLOCK_SIZE + ((it + 1) % SUBS) * BLOCK_N
                k, k_mult = _history_tile(
                    k_base, k_desc, batch, kv_head, block_next, start_next, history_len, stride_kl, stride_kd,
                    kq, k_scale_ptr, k_min_ptr, k_scales, stride_cl, stride_ksn, whole_blocks, native_from,
                    q.dtype, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA, False, QUANT, True, True,
                    rot_row, cos_ptr, sin_ptr, frame_tokens, num_frames, PAIRS,
                )  # fmt: skip
                v, v_mult = _history_tile(
                    v_base, v_desc, batch, kv_head, block, start, history_len, stride_vl, stride_vd,
                    vq, v_scale_ptr, v_min_ptr, v_scales, stride_cl, stride_vsn, whole_blocks, native_from,
                    q.dtype, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA, False, QUANT, False, True,
                    rot_row, cos_ptr, sin_ptr, frame_tokens, num_frames, PAIRS,
                )  # fmt: skip
                scores_next = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (
                    qk_scale * k_mult if SCALED else qk_scale
                )
                m_i, l_i, acc = _softmax_update(scores, v, v_mult, m_i, l_i, acc, False, PRECISION, SCALED)
                scores = scores_next
                start = start_next
                block = block_next
            v, v_mult = _history_tile(
                v_base, v_desc, batch, kv_head, block, start, history_len, stride_vl, stride_vd,
                vq, v_scale_ptr, v_min_ptr, v_scales, stride_cl, stride_vsn, whole_blocks, native_from,
                q.dtype, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA, False, QUANT, False, True,
                rot_row, cos_ptr, sin_ptr, frame_tokens, num_frames, PAIRS,
            )  # fmt: skip
            m_i, l_i, acc = _softmax_update(scores, v, v_mult, m_i, l_i, acc, False, PRECISION, SCALED)
        for sub in tl.static_range(SUBS):
            it = whole_iters + sub
            if (it >= it_begin) & (it < it_end) & (it >= 0):
                block = tl.load(table_ptr + it // SUBS).to(tl.int32)
                start = block * BLOCK_SIZE + (it % SUBS) * BLOCK_N
                m_i, l_i, acc = _masked_tile_step(
                    q, k_base, v_base, k_desc, v_desc, batch, kv_head, block, start, history_len, row_valid,
                    qk_scale, m_i, l_i, acc, stride_kl, stride_kd, stride_vl, stride_vd,
                    kq, vq, k_scale_ptr, v_scale_ptr, k_min_ptr, v_min_ptr, k_scales, v_scales,
                    stride_cl, stride_ksn, stride_vsn, whole_blocks, native_from,
                    BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA, PRECISION, QUANT,
                rot_row, cos_ptr, sin_ptr, frame_tokens, num_frames, PAIRS,
                )  # fmt: skip

    # The current chunk: contiguous tokens [history_len, history_len + chunk_len); every row,
    # padding rows too, attends it, so no row ends with an empty softmax (0/0).
    chunk_end = history_len + chunk_len
    whole_end = hist_iters + chunk_len // BLOCK_N
    one = tl.full([], 1.0, tl.float32)
    for it in tl.range(tl.maximum(it_begin, hist_iters), tl.minimum(it_end, whole_end)):
        start = history_len + (it - hist_iters) * BLOCK_N - native_from
        k = _load_tile(k_base, k_desc, batch, kv_head, start, chunk_end - native_from, stride_kl, stride_kd,
                       BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA, False)  # fmt: skip
        if PAIRS > 0:
            k = _rotate_keys(k, start + native_from, rot_row, cos_ptr, sin_ptr, frame_tokens, num_frames,
                             q.dtype, BLOCK_N, BLOCK_D, PAIRS)  # fmt: skip
        v = _load_tile(v_base, v_desc, batch, kv_head, start, chunk_end - native_from, stride_vl, stride_vd,
                       BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA, False)  # fmt: skip
        m_i, l_i, acc = _softmax_step(
            q, k, v, one, one, row_valid[:, None], qk_scale, m_i, l_i, acc, False, PRECISION, False
        )
    if (chunk_len % BLOCK_N != 0) & (it_begin <= whole_end) & (whole_end < it_end):
        start = history_len + (whole_end - hist_iters) * BLOCK_N
        m_i, l_i, acc = _masked_tile_step(
            q, k_base, v_base, k_desc, v_desc, batch, kv_head, whole_blocks, start, chunk_end, rows >= 0,
            qk_scale, m_i, l_i, acc, stride_kl, stride_kd, stride_vl, stride_vd,
            kq, vq, k_scale_ptr, v_scale_ptr, k_min_ptr, v_min_ptr, k_scales, v_scales,
            stride_cl, stride_ksn, stride_vsn, whole_blocks, native_from,
            BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA, PRECISION, QUANT,
                rot_row, cos_ptr, sin_ptr, frame_tokens, num_frames, PAIRS,
        )  # fmt: skip
    return m_i, l_i, acc


@triton.jit
def _scattered_attention_kernel(
    q_ptr, k_ptr, v_ptr, k_desc, v_desc, out_ptr, lse_ptr,
    block_idx_ptr, num_blocks_ptr, block_attended_ptr, history_len_ptr, sync_ptr, handoff_ptr,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    num_q_heads, heads_per_kv, q_len, chunk_len, table_tiles, table_width, num_groups, num_hist_blocks,
    query_group_size, qk_scale, num_q_tiles, num_whole_tiles, splits,
    kq_ptr, vq_ptr, k_scale_ptr, v_scale_ptr, k_min_ptr, v_min_ptr,
    stride_cb, stride_ch, stride_cl, stride_ksb, stride_ksh, stride_ksn, stride_vsb, stride_vsh, stride_vsn,
    rot_ptr, cos_ptr, sin_ptr, stride_rb, stride_rh, frame_tokens, num_frames,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HAS_GROUPS: tl.constexpr, USE_TMA: tl.constexpr,
    WRITE_LSE: tl.constexpr, PRECISION: tl.constexpr, QUANT: tl.constexpr = 0, PAIRS: tl.constexpr = 0,
):  # fmt: skip
    # Tiles are (batch, query head, query tile), query tile fastest. The first
    # `num_whole_tiles` programs run one whole tile each; the tiles of the last, partly filled
    # wave are cut into `splits` equal ranges of key tiles, one program each, so that the wave
    # fills the GPU. Part j of a split tile waits for part j - 1 (a flag), which leaves its
    # normalized partial output in `out` itself and (m, l) in `handoff`; part j merges.
    # Program ids come from a ticket in launch order: a program waits only on smaller ids, all
    # started by then, so the waits cannot deadlock even when programs are not co-resident.
    program = tl.atomic_add(sync_ptr, 1)
    num_kv_heads = num_q_heads // heads_per_kv
    history_len = tl.load(history_len_ptr).to(tl.int32)
    ALL_MASKED: tl.constexpr = HAS_GROUPS or (BLOCK_SIZE % BLOCK_N != 0)
    SUBS: tl.constexpr = (BLOCK_SIZE + BLOCK_N - 1) // BLOCK_N

    split_part = program - num_whole_tiles  # >= 0: which part of a split tile
    part = split_part % splits
    tile = tl.where(split_part < 0, program, num_whole_tiles + split_part // splits)
    batch_head = tile // num_q_tiles
    q_tile = tile % num_q_tiles
    batch = batch_head // num_q_heads
    head = batch_head % num_q_heads
    kv_head = head // heads_per_kv
    # One table row per (batch, KV head) when the chunk is one query group (table_tiles == 1);
    # per query tile (the union of the tile's groups) otherwise.
    table_row = (batch * num_kv_heads + kv_head) * table_tiles + q_tile % table_tiles
    num_tile_blocks = tl.load(num_blocks_ptr + table_row)
    table_ptr = block_idx_ptr + table_row.to(tl.int64) * table_width
    num_iters = num_tile_blocks * SUBS + tl.cdiv(chunk_len, BLOCK_N)
    it_begin = tl.where(split_part < 0, 0, part * num_iters // splits)
    it_end = tl.where(split_part < 0, num_iters, (part + 1) * num_iters // splits)

    rows = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_valid = rows < q_len
    q_base = q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    q = tl.load(
        q_base + rows[:, None].to(tl.int64) * stride_ql + dims[None, :] * stride_qd,
        mask=row_valid[:, None] & (dims[None, :] < HEAD_DIM),
        other=0.0,
    )
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    groups = tl.minimum(rows // query_group_size, num_groups - 1)
    attended_row = (
        block_attended_ptr
        + ((batch * num_kv_heads + kv_head) * num_groups + groups).to(tl.int64) * num_hist_blocks
    )
    # A quantized history's whole blocks (QUANT: 1 fp8, 2 int4): codes, and the offsets of this
    # (batch, KV head) into their scales and minima.
    kq = kq_ptr + batch.to(tl.int64) * stride_cb + kv_head.to(tl.int64) * stride_ch
    vq = vq_ptr + batch.to(tl.int64) * stride_cb + kv_head.to(tl.int64) * stride_ch
    k_scales = batch.to(tl.int64) * stride_ksb + kv_head.to(tl.int64) * stride_ksh
    v_scales = batch.to(tl.int64) * stride_vsb + kv_head.to(tl.int64) * stride_vsh
    m_i, l_i, acc = _attend_range(
        q, k_base, v_base, k_desc, v_desc, batch, kv_head, rows, row_valid,
        table_ptr, num_tile_blocks, attended_row, history_len, chunk_len, it_begin, it_end,
        stride_kl, stride_kd, stride_vl, stride_vd, qk_scale,
        kq, vq, k_scale_ptr, v_scale_ptr, k_min_ptr, v_min_ptr, k_scales, v_scales,
        stride_cl, stride_ksn, stride_vsn,
        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, BLOCK_SIZE, HAS_GROUPS, ALL_MASKED, USE_TMA, PRECISION, QUANT,
        rot_ptr + batch.to(tl.int64) * stride_rb + kv_head.to(tl.int64) * stride_rh, cos_ptr, sin_ptr,
        frame_tokens, num_frames, PAIRS,
    )  # fmt: skip

    out_ptrs = (
        out_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
        + rows[:, None].to(tl.int64) * stride_ol + dims[None, :] * stride_od
    )  # fmt: skip
    out_mask = row_valid[:, None] & (dims[None, :] < HEAD_DIM)
    if (split_part >= 0) & (part > 0):
        # Merge the partial result of the tile's earlier key tiles (program - 1).
        while tl.atomic_cas(sync_ptr + split_part, 1, 0) != 1:
            pass
        tl.debug_barrier()
        handoff = handoff_ptr + (split_part - 1).to(tl.int64) * 2 * BLOCK_M + tl.arange(0, BLOCK_M)
        prev_m = tl.load(handoff, cache_modifier=".cg")
        prev_l = tl.load(handoff + BLOCK_M, cache_modifier=".cg")
        prev_out = tl.load(out_ptrs, mask=out_mask, other=0.0, cache_modifier=".cg").to(tl.float32)
        m_new = tl.maximum(m_i, prev_m)
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        prev_weight = prev_l * tl.exp2(prev_m - m_shift)
        acc = acc * alpha[:, None] + prev_out * prev_weight[:, None]
        l_i = l_i * alpha + prev_weight
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    if (split_part >= 0) & (part < splits - 1):
        handoff = handoff_ptr + split_part.to(tl.int64) * 2 * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(handoff, m_i)
        tl.store(handoff + BLOCK_M, l_i)
        tl.debug_barrier()  # every thread's stores before the release (CUTLASS's pattern)
        tl.atomic_xchg(sync_ptr + 1 + split_part, 1, sem="release")
    elif WRITE_LSE:
        # Natural-log LSE from base-2 running max and sum.
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
        tl.store(lse_ptr + batch_head.to(tl.int64) * q_len + rows, lse, mask=row_valid)


def default_use_tma(device: torch.device) -> bool:
    """TMA loads where the copy engine exists (Hopper and newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_num_sms(device: torch.device) -> int:
    """Programs that run at once: the SM count (one program per SM fits: shared memory). Under
    the CPU interpreter a few, so that the tests run split tiles."""
    if device.type == "cuda":
        return _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def _tma_ok(t: torch.Tensor) -> bool:
    # The copy engine needs a unit last stride and 16-byte aligned base and strides.
    size = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all((s * size) % 16 == 0 for s in t.stride()[:-1])


class KeyRotation(NamedTuple):
    """Keys rotated in time inside the kernel (relative positions, ``omnimem.positions``):
    ``frame_pos [B, Hkv, F]`` integer position of every frame of the cache (token ``t`` is in
    frame ``t // frame_tokens``); ``cos``, ``sin [P, T]`` float32: the table's first ``T``
    pairs at each position."""

    frame_pos: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    frame_tokens: int


# A split tile is cut into at most this many parts: each cut costs a merge (a wait and a
# reload of the partial output) on the critical path.
MAX_SPLITS = 4


def scattered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_idx: torch.Tensor,
    num_blocks: torch.Tensor,
    block_attended: torch.Tensor | None,
    history_len: torch.Tensor,
    chunk_len: int,
    block_size: int,
    query_group_size: int,
    scale: float,
    return_lse: bool,
    block_m: int = 128,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    use_tma: bool | None = None,
    num_sms: int | None = None,
    store: QuantizedBlocks | None = None,
    rotation: KeyRotation | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the kernel.

    ``block_idx [B, Hkv, T, W]`` ascending block indices (``num_blocks [B, Hkv, T]`` valid),
    one row per query tile (``T = ceil(Lq / block_m)``) or one for all tiles (``T = 1``);
    ``block_attended [B, Hkv, G, NB]`` (bool/uint8; ``None`` when the chunk is one query group);
    ``history_len`` a 0-d integer tensor on the device. The ``B * H * T`` tiles run one per
    program; those of the last wave (``num_sms`` programs at once, default: the SM count) are
    split into up to ``MAX_SPLITS`` parts so that the wave fills the GPU (``num_sms=1``: no
    split). ``block_n``/``num_warps``/``num_stages``/``use_tma`` default to the tuned choices
    (benchmarks/backends_gpu.py measures the others). Besides its outputs a call allocates at
    most ``num_sms + 1`` int32 flags and ``num_sms x 2 x block_m`` float32 (132 KiB on an
    H100): split parts hand partial results over through ``out`` itself.

    With ``store`` (a quantized history, ``omnimem.store.blocks.QuantizedBlocks``), the
    history's whole blocks ``[0, history_len // block_size)`` are read from the store's bytes in
    place (``quantized_tiles``) and ``k``/``v`` hold the tokens from there on: the partial last
    block, then the chunk (``backends/quantized_attention.py`` launches it so).

    With ``rotation`` every key tile is rotated in time after its load (``_rotate_keys``: keys
    stored rotated in space only, ``q`` already rotated; no rotated copy of the history).
    """
    batch, num_q_heads, q_len, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(batch, num_q_heads, q_len, device=q.device, dtype=torch.float32) if return_lse else out
    num_q_tiles = math.ceil(q_len / block_m)
    num_tiles = batch * num_q_heads * num_q_tiles
    if num_tiles == 0:
        return out, (lse if return_lse else None)
    wide = q.element_size() >= 4
    if block_n is None:
        # tl.dot needs tile dims >= 16 on GPUs: smaller blocks are read as masked 16-token tiles.
        # 4-byte dtypes halve the tile so that K/V stages fit in shared memory.
        # Rotating native tiles in float32 (split/join) needs shared memory for its layout
        # changes: with 128-key bf16 tiles the kernel asked 256 KiB, past Hopper's 227 (H100,
        # 2026-12-07, even at two stages); 64-key tiles halve that. Decoded tiles fitted at 128.
        narrow = wide or (rotation is not None and store is None)
        block_n = max(16, min(triton.next_power_of_2(block_size), 64 if narrow else 128))
    block_d = max(triton.next_power_of_2(head_dim), 16)
    if use_tma is None:
        use_tma = default_use_tma(q.device)
    use_tma = use_tma and _tma_ok(k) and _tma_ok(v) and head_dim == block_d
    k_desc = v_desc = None
    if use_tma:
        k_desc = TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, block_n, block_d])
        v_desc = TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, block_n, block_d])
    has_groups = block_attended is not None
    attended = block_attended.to(torch.uint8) if has_groups else num_blocks  # unused when no groups
    if store is None:  # unused pointers and strides
        quantized = [k] * 6 + [0] * 9
    else:
        kq, vq = store.k.view(torch.uint8), store.v.view(torch.uint8)
        k_min = store.k_min if store.k_min is not None else store.k_scale  # fp8 has none: unused
        v_min = store.v_min if store.v_min is not None else store.v_scale
        quantized = [kq, vq, store.k_scale, store.v_scale, k_min, v_min, *kq.stride()[:3],
                     *store.k_scale.stride()[:3], *store.v_scale.stride()[:3]]  # fmt: skip
    if rotation is None:  # unused pointers
        rotated = [k, k, k, 0, 0, 1, 1]
        pairs = 0
    else:
        frame_pos, cos, sin, frame_tokens = rotation
        pairs = cos.shape[1]
        if (
            not 0 < 2 * pairs <= head_dim
            or frame_pos.stride(2) != 1
            or not (cos.is_contiguous() and sin.is_contiguous())
        ):
            raise ValueError(
                f"rotation: {pairs} temporal pairs for head_dim {head_dim}, frame positions with a unit "
                "frame stride and contiguous cos/sin tables expected"
            )
        rotated = [frame_pos, cos, sin, *frame_pos.stride()[:2], frame_tokens, frame_pos.shape[2]]
    if num_warps is None:
        num_warps = 8 if block_m >= 128 else 4
    if num_stages is None:
        num_stages = 2 if wide else 3
    sms = num_sms or default_num_sms(q.device)
    num_split_tiles = num_tiles % sms
    splits = min(MAX_SPLITS, sms // num_split_tiles) if num_split_tiles else 1
    if splits == 1:
        num_split_tiles = 0
    num_parts = num_split_tiles * splits
    sync = torch.zeros(num_parts + 1, device=q.device, dtype=torch.int32)  # ticket, then flags
    handoff = torch.empty(max(num_parts, 1), 2, block_m, device=q.device, dtype=torch.float32)
    _scattered_attention_kernel[(num_tiles - num_split_tiles + num_parts,)](
        q, k, v, k_desc, v_desc, out, lse,
        block_idx, num_blocks, attended, history_len, sync, handoff,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        num_q_heads, num_q_heads // k.shape[1], q_len, chunk_len, block_idx.shape[2], block_idx.shape[3],
        block_attended.shape[2] if has_groups else 1, block_attended.shape[3] if has_groups else 1,
        query_group_size, scale * 1.4426950408889634,
        num_q_tiles, num_tiles - num_split_tiles, splits, *quantized, *rotated,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=block_size,
        HAS_GROUPS=has_groups, USE_TMA=use_tma, WRITE_LSE=return_lse,
        QUANT=0 if store is None else {"fp8": 1, "int4": 2}[store.kv_format], PAIRS=pairs,
        # float32 inputs stay float32 (tensor cores would round them to TF32: ~1e-3 error).
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out, (lse if return_lse else None)
