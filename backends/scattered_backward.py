"""Backward of per-head scattered-block attention: the two Triton kernels and their launcher.

Serves both scattered forwards: the ``triton`` backend of ``sparse_attention``
(``triton_attention``/``gluon_attention``: per-group block tables of history blocks, then the
contiguous current chunk that every query attends) and the selected branch of
``gated_attention`` (``selected_attention``: per-group tables over the whole sequence, no
chunk part). Reference: autograd through ``gather`` / ``gated_branches.selected_attention_gather``.

FlashAttention-2's backward over block tables, with the forward's log-sum-exp (no second
softmax pass) and ``delta = rowsum(dO * O)``:

- ``dq``: one program per (query group, row tile, batch x query head) walks the group's table
  like the forward and accumulates ``dS @ K`` in registers.
- ``dk``/``dv``: one program per (history key tile, KV head) accumulates ``P^T @ dO`` and
  ``dS^T @ Q`` over every (query head, group) that attends it, then writes its tile once: no
  atomics, nothing but the gradients is written, in the inputs' dtype. Which groups attend a
  block is the table inverted by one sort of its ``(block, group)`` pairs (static shape, no host
  sync): programs are launched per pair, and only the first pair of each block's run works.
  Chunk key tiles (``sparse_attention``) are attended by every query: one program each.

Measured on an H200 (benchmarks/backward_gpu.py ``--variants``): dQ accumulated with float32
atomics inside the dK/dV kernel (five matrix products per tile instead of seven, FA3's way)
was slower at every tile shape tried (5.0-8.0 ms against 4.05 at Wan-1.3B 60 s): the atomics
cost more than the recomputed products.

Keys no query attends get a zero gradient and are never read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

from omnimem.backends.quantized_tiles import store_arguments, store_block_tiles
from omnimem.store.blocks import QuantizedBlocks

LOG2E = 1.4426950408889634


@triton.jit
def _load_rows(base, rows, row_ok, dims, stride_l, stride_d, HEAD_DIM: tl.constexpr):
    return tl.load(
        base + rows[:, None].to(tl.int64) * stride_l + dims[None, :] * stride_d,
        mask=row_ok[:, None] & (dims[None, :] < HEAD_DIM),
        other=0.0,
    )


@triton.jit
def _probabilities(q, k, lse2, token_ok, qk_scale, PRECISION: tl.constexpr):
    """Softmax probabilities of ``q`` against keys ``k`` from the forward's base-2 LSE."""
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.exp2(scores - lse2[:, None])
    return tl.where(token_ok[None, :], p, 0.0)


@triton.jit
def _dq_step(q, do, lse2, delta, dq, k, v, token_ok, qk_scale, k_mult, v_mult,
             PRECISION: tl.constexpr, SCALED: tl.constexpr):  # fmt: skip
    """``dq += dS @ K`` over one key tile. ``SCALED`` (an fp8 store's tile): the keys' and
    values' block scales ``k_mult``/``v_mult`` multiply the scores and ``dO V^T``, and ``dS``
    before ``@ K``, as the forward applies them."""
    if SCALED:
        p = _probabilities(q, k, lse2, token_ok, qk_scale * k_mult, PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION) * v_mult
        ds = p * (dp - delta[:, None]) * k_mult
    else:
        p = _probabilities(q, k, lse2, token_ok, qk_scale, PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)


@triton.jit
def _dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    table_ptr, count_ptr, limit_ptr,
    kq_ptr, vq_ptr, k_scale_ptr, v_scale_ptr, k_min_ptr, v_min_ptr, live_first,
    stride_qkb, stride_qkh, stride_qkl,
    stride_ksb, stride_ksh, stride_ksn, stride_vsb, stride_vsh, stride_vsn,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_gb, stride_gh, stride_gl, stride_gd,
    num_q_heads, heads_per_kv, num_kv_heads, q_len, num_groups, group_size, block_size, chunk_len,
    table_width, scale, qk_scale,
    tiles_per_group,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUBS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_CHUNK: tl.constexpr, PRECISION: tl.constexpr,
    QUANTIZED: tl.constexpr = False, INT4: tl.constexpr = False,
):  # fmt: skip
    group_tile = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // num_q_heads
    head = batch_head % num_q_heads
    kv_head = head // heads_per_kv
    group = group_tile // tiles_per_group
    rows = group * group_size + (group_tile % tiles_per_group) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < tl.minimum((group + 1) * group_size, q_len)
    dims = tl.arange(0, BLOCK_D)

    q_base = q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    do_base = do_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    q = _load_rows(q_base, rows, row_ok, dims, stride_ql, stride_qd, HEAD_DIM)
    do = _load_rows(do_base, rows, row_ok, dims, stride_ol, stride_od, HEAD_DIM)
    row_stat = batch_head.to(tl.int64) * q_len + rows
    # Rows that attended nothing (lse = -inf) have p = 0 everywhere: +inf makes exp2 give 0.
    lse = tl.load(lse_ptr + row_stat, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(delta_ptr + row_stat, mask=row_ok, other=0.0)
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    row_entry = (batch * num_kv_heads + kv_head) * num_groups + group
    count = tl.load(count_ptr + row_entry)
    limit = tl.load(limit_ptr).to(tl.int32)  # blocks' tokens at or past it are never read

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs = tl.arange(0, BLOCK_N)
    one = tl.full([], 1.0, tl.float32)
    # With QUANTIZED, blocks before live_first are a store's (decoded in registers, as the
    # forward reads them) and k/v hold the tokens from live_first's first on.
    k_offset = live_first * block_size
    if QUANTIZED:
        kq = kq_ptr + batch.to(tl.int64) * stride_qkb + kv_head.to(tl.int64) * stride_qkh
        vq = vq_ptr + batch.to(tl.int64) * stride_qkb + kv_head.to(tl.int64) * stride_qkh
        k_scales = batch.to(tl.int64) * stride_ksb + kv_head.to(tl.int64) * stride_ksh
        v_scales = batch.to(tl.int64) * stride_vsb + kv_head.to(tl.int64) * stride_vsh
    for it in range(0, count * SUBS):
        block = tl.load(table_ptr + row_entry.to(tl.int64) * table_width + it // SUBS)
        in_block = (it % SUBS) * BLOCK_N + offs
        tokens = block * block_size + in_block
        token_ok = (in_block < block_size) & (tokens < limit)
        if QUANTIZED:
            if block < live_first:
                k, k_mult, v, v_mult = store_block_tiles(
                    kq, vq, k_scale_ptr, v_scale_ptr, k_min_ptr, v_min_ptr, k_scales, v_scales, block,
                    block * block_size + (it % SUBS) * BLOCK_N, block_size, stride_qkl, stride_ksn,
                    stride_vsn, k_ptr.dtype.element_ty, BLOCK_N, BLOCK_D, HEAD_DIM, INT4,
                )  # fmt: skip
                dq = _dq_step(q, do, lse2, delta, dq, k, v, token_ok, qk_scale, k_mult, v_mult, PRECISION,
                              not INT4)  # fmt: skip
            else:
                k = _load_rows(k_base, tokens - k_offset, token_ok, dims, stride_kl, stride_kd, HEAD_DIM)
                v = _load_rows(v_base, tokens - k_offset, token_ok, dims, stride_vl, stride_vd, HEAD_DIM)
                dq = _dq_step(q, do, lse2, delta, dq, k, v, token_ok, qk_scale, one, one, PRECISION, False)
        else:
            k = _load_rows(k_base, tokens, token_ok, dims, stride_kl, stride_kd, HEAD_DIM)
            v = _load_rows(v_base, tokens, token_ok, dims, stride_vl, stride_vd, HEAD_DIM)
            dq = _dq_step(q, do, lse2, delta, dq, k, v, token_ok, qk_scale, one, one, PRECISION, False)
    if HAS_CHUNK:  # the current chunk [limit, limit + chunk_len): every query attends it
        for it in range(0, tl.cdiv(chunk_len, BLOCK_N)):
            tokens = limit + it * BLOCK_N + offs
            token_ok = tokens < limit + chunk_len
            k = _load_rows(k_base, tokens - k_offset, token_ok, dims, stride_kl, stride_kd, HEAD_DIM)
            v = _load_rows(v_base, tokens - k_offset, token_ok, dims, stride_vl, stride_vd, HEAD_DIM)
            dq = _dq_step(q, do, lse2, delta, dq, k, v, token_ok, qk_scale, one, one, PRECISION, False)
    dq_base = dq_ptr + batch.to(tl.int64) * stride_gb + head.to(tl.int64) * stride_gh
    tl.store(
        dq_base + rows[:, None].to(tl.int64) * stride_gl + dims[None, :] * stride_gd,
        (dq * scale).to(dq_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (dims[None, :] < HEAD_DIM),
    )


@triton.jit
def _dkv_rows(
    k, v, token_ok, dk, dv, q_base, do_base, lse_ptr, delta_ptr, row_stat0, rows, row_ok, dims,
    stride_ql, stride_qd, stride_ol, stride_od, qk_scale,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``dV += P^T dO`` and ``dK += dS^T Q`` (unscaled) over one tile of query rows."""
    q = _load_rows(q_base, rows, row_ok, dims, stride_ql, stride_qd, HEAD_DIM)
    do = _load_rows(do_base, rows, row_ok, dims, stride_ol, stride_od, HEAD_DIM)
    lse = tl.load(lse_ptr + row_stat0 + rows, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(delta_ptr + row_stat0 + rows, mask=row_ok, other=0.0)
    p = _probabilities(q, k, lse2, token_ok, qk_scale, PRECISION)
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    pair_key_ptr, pair_group_ptr, limit_ptr,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_dkb, stride_dkh, stride_dkl, stride_dkd,
    stride_dvb, stride_dvh, stride_dvl, stride_dvd,
    num_q_heads, heads_per_kv, num_kv_heads, q_len, group_size, block_size, chunk_len,
    num_pairs, num_slots, chunk_tiles, tiles_per_group, scale, qk_scale, grad_from, k_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUBS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr = False,
):  # fmt: skip
    # Programs [0, num_pairs * SUBS): key tile (pair, sub) of a history block; the first pair
    # of each block's run works, the others find nothing to do. Then one program per chunk key
    # tile of each (batch, KV head).
    program = tl.program_id(0)
    limit = tl.load(limit_ptr).to(tl.int32)
    offs = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    is_chunk = program >= num_pairs * SUBS
    pair = tl.minimum(program // SUBS, num_pairs - 1)
    key = tl.load(pair_key_ptr + pair)
    previous = tl.load(pair_key_ptr + tl.maximum(pair - 1, 0))
    leads = (program < num_pairs * SUBS) & (key >= 0) & ((pair == 0) | (previous != key))
    # Blocks wholly before grad_from need no gradient (a cache's constant history).
    leads = leads & ((tl.maximum(key, 0) % num_slots + 1) * block_size > grad_from)
    chunk_tile = tl.maximum(program - num_pairs * SUBS, 0)
    batch_kv = tl.where(is_chunk, chunk_tile // chunk_tiles, tl.maximum(key, 0) // num_slots).to(tl.int32)
    block = (tl.maximum(key, 0) % num_slots).to(tl.int32)
    in_block = (program % SUBS) * BLOCK_N + offs
    block_tokens = block * block_size + in_block
    chunk_tokens = limit + (chunk_tile % chunk_tiles) * BLOCK_N + offs
    tokens = tl.where(is_chunk, chunk_tokens, block_tokens)
    # `leads` is False for chunk programs. (`!= 0`: the interpreter makes a scalar-and-vector
    # `&` an int8 vector, which tl.load refuses as a mask.)
    token_ok = (
        (is_chunk & (chunk_tokens < limit + chunk_len))
        | (leads & (in_block < block_size) & (block_tokens < limit))
    ) != 0
    batch = batch_kv // num_kv_heads
    kv_head = batch_kv % num_kv_heads
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    # k/v hold the tokens from k_offset on (a quantized store keeps the ones before: never
    # read here, their blocks lie wholly before grad_from >= k_offset).
    k = _load_rows(k_base, tokens - k_offset, token_ok, dims, stride_kl, stride_kd, HEAD_DIM)
    v = _load_rows(v_base, tokens - k_offset, token_ok, dims, stride_vl, stride_vd, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_tiles = tl.where(is_chunk, tl.cdiv(q_len, BLOCK_M), 0)
    for sub_head in range(0, heads_per_kv):
        head = kv_head * heads_per_kv + sub_head
        q_base = q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        do_base = do_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
        row_stat0 = (batch * num_q_heads + head).to(tl.int64) * q_len
        for tile in range(0, q_tiles):  # a chunk tile: every query row
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            dk, dv = _dkv_rows(k, v, token_ok, dk, dv, q_base, do_base, lse_ptr, delta_ptr, row_stat0,
                               rows, rows < q_len, dims, stride_ql, stride_qd, stride_ol, stride_od,
                               qk_scale, HEAD_DIM, PRECISION)  # fmt: skip
        # A history block: every group of the pairs in its run, starting here.
        j = pair
        go = leads
        while go:
            group = tl.load(pair_group_ptr + j)
            for tile in range(0, tiles_per_group):
                rows = group * group_size + tile * BLOCK_M + tl.arange(0, BLOCK_M)
                row_ok = rows < tl.minimum((group + 1) * group_size, q_len)
                dk, dv = _dkv_rows(k, v, token_ok, dk, dv, q_base, do_base, lse_ptr, delta_ptr, row_stat0,
                                   rows, row_ok, dims, stride_ql, stride_qd, stride_ol, stride_od,
                                   qk_scale, HEAD_DIM, PRECISION)  # fmt: skip
            j += 1
            go = (j < num_pairs) & (tl.load(pair_key_ptr + tl.minimum(j, num_pairs - 1)) == key)
    # dk/dv hold the keys from grad_from on.
    store_mask = token_ok[:, None] & (dims[None, :] < HEAD_DIM) & (tokens >= grad_from)[:, None]
    tokens = tokens - grad_from
    dk_base = dk_ptr + batch.to(tl.int64) * stride_dkb + kv_head.to(tl.int64) * stride_dkh
    dv_base = dv_ptr + batch.to(tl.int64) * stride_dvb + kv_head.to(tl.int64) * stride_dvh
    dk_ptrs = dk_base + tokens[:, None].to(tl.int64) * stride_dkl + dims[None, :] * stride_dkd
    dv_ptrs = dv_base + tokens[:, None].to(tl.int64) * stride_dvl + dims[None, :] * stride_dvd
    dk = dk * scale
    if ACCUMULATE:  # onto gradients from other branches (one program per token: no race)
        dk += tl.load(dk_ptrs, mask=store_mask, other=0.0).to(tl.float32)
        dv += tl.load(dv_ptrs, mask=store_mask, other=0.0).to(tl.float32)
    tl.store(dk_ptrs, dk.to(dk_ptr.dtype.element_ty), mask=store_mask)
    tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=store_mask)


def block_pairs(block_idx: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The table inverted: ``(keys, groups)``, each ``[max(1, B * Hkv * G * W)]``, sorted by
    ``key = (batch * Hkv + kv_head) * num_slots + block``, unused slots last as ``-1``;
    ``groups`` holds each pair's query group."""
    batch, kv_heads, groups, width = block_idx.shape
    bh = torch.arange(batch * kv_heads, device=block_idx.device, dtype=torch.int64)
    bh = bh.view(batch, kv_heads, 1, 1)
    keys = torch.where(block_idx >= 0, bh * num_slots + block_idx.long(), torch.iinfo(torch.int64).max)
    if keys.numel() == 0:  # the kernel reads one slot
        return torch.full((1,), -1, device=block_idx.device, dtype=torch.int64), torch.zeros(
            1, device=block_idx.device, dtype=torch.int32
        )
    keys, order = keys.flatten().sort(stable=True)
    group_of = torch.arange(groups, device=block_idx.device, dtype=torch.int32).view(1, 1, groups, 1)
    group_of = group_of.expand(batch, kv_heads, groups, width).flatten()[order]
    return torch.where(keys == torch.iinfo(torch.int64).max, -1, keys), group_of.contiguous()


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One kernel's launch shape: ``block_m`` query rows by ``block_n`` keys per step."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def default_tiles(
    group_size: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tiles, Tiles]:
    """``(dq, dkv)`` tiles, the fastest measured on an H200 (``backward_gpu.py --variants``):
    rows no wider than a group and keys no wider than a block (tensor-core minimum 16); at Wan
    shapes dQ takes 128 x 64 on 8 warps and dK/dV 64 x 64 on 4 (its two float32 ``[block_n,
    D]`` accumulators live in registers: 128-key tiles spilled, 2x slower). 4-byte inputs
    halve the tiles (shared memory)."""
    if device.type != "cuda":  # the interpreter: small tiles, one warp
        rows = min(32, max(16, triton.next_power_of_2(group_size)))
        keys = min(32, max(16, triton.next_power_of_2(block_size)))
        return Tiles(rows, keys, 1, 1), Tiles(rows, keys, 1, 1)
    wide = dtype == torch.float32

    def fit(n: int, cap: int) -> int:
        return min(cap // (2 if wide else 1), max(16, triton.next_power_of_2(n)))

    if group_size <= 16:
        # Groups of a few queries (the gated layer's 15): tiny tiles, latency-bound; two warps
        # and no software pipelining measured fastest (benchmarks/backward_gpu.py --variants).
        tiles = Tiles(16, fit(block_size, 64), num_warps=2, num_stages=1)
        return tiles, tiles
    dq = Tiles(fit(group_size, 128), fit(block_size, 64), num_warps=8, num_stages=3 if not wide else 2)
    dkv = Tiles(fit(group_size, 64), fit(block_size, 64), num_warps=4, num_stages=2)
    return dq, dkv


def scattered_attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    block_idx: torch.Tensor,
    num_blocks: torch.Tensor,
    limit: torch.Tensor,
    block_size: int,
    query_group_size: int,
    chunk_len: int,
    scale: float,
    grad_lse: torch.Tensor | None = None,
    dq_tiles: Tiles | None = None,
    dkv_tiles: Tiles | None = None,
    dk_init: torch.Tensor | None = None,
    dv_init: torch.Tensor | None = None,
    grad_from: int = 0,
    store: QuantizedBlocks | None = None,
    live_first: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of scattered attention, in the inputs' dtypes and shapes.

    ``block_idx [B, Hkv, G, W]`` int32 (the first ``num_blocks [B, Hkv, G]`` entries of a row
    are distinct blocks, any order; the rest ``-1``): group ``g`` (queries ``[g *
    query_group_size, ...)``) attends the tokens ``[j * block_size, (j + 1) * block_size)`` of
    each block ``j`` of its row that lie before ``limit`` (a 0-d integer tensor), then, when
    ``chunk_len > 0``, the chunk ``[limit, limit + chunk_len)``. ``lse [B, Hq, Lq]`` float32
    natural-log LSE of the forward (``-inf`` for rows that attended nothing); ``grad_lse`` its
    gradient, if any. Allocates the three gradients (``dk``/``dv`` zero where nothing attends)
    and ``[B, Hq, Lq]`` float32 for ``delta``, plus the sorted pairs (``12 B`` per table entry).
    ``dq_tiles``/``dkv_tiles`` default to ``default_tiles`` (benchmarks/backward_gpu.py
    ``--variants`` measures others). ``grad_from``: only keys ``[grad_from, Lkv)`` get a
    gradient (the rest are constants: a cache's history), so ``dk``/``dv`` are ``[B, Hkv, Lkv -
    grad_from, D]``. ``dk_init``/``dv_init``: those gradients from other uses of the keys and
    values (that shape, k's dtype; both or neither): this backward adds into them in place and
    returns them, instead of allocating and zero-filling its own. ``store`` (a quantized history,
    ``omnimem.store.blocks.QuantizedBlocks``, as ``selected_attention`` reads it): blocks before
    ``live_first`` are the store's, decoded in registers by the ``dq`` kernel (constants: they
    get no gradient, so ``grad_from >= live_first * block_size``), and ``k``/``v`` hold the
    tokens from ``live_first * block_size`` on (``dk``/``dv``: ``[B, Hkv, live_first *
    block_size + Lkv - grad_from, D]``).
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads = k.shape[1]
    groups = block_idx.shape[2]
    default_dq, default_dkv = default_tiles(query_group_size, block_size, q.dtype, q.device)
    dq_tiles, dkv_tiles = dq_tiles or default_dq, dkv_tiles or default_dkv
    block_d = max(16, triton.next_power_of_2(head_dim))
    precision = "ieee" if q.dtype == torch.float32 or q.device.type != "cuda" else "tf32"
    delta = (grad_out.float() * out.float()).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.float()  # dL/dS = P * (dP - delta + dLSE)
    block_idx, num_blocks = block_idx.contiguous(), num_blocks.contiguous()  # indexed as dense rows
    dq = torch.empty_like(q)
    accumulate = dk_init is not None
    if accumulate != (dv_init is not None):
        raise ValueError("dk_init and dv_init go together: pass both or neither")
    if store is None and live_first:
        raise ValueError(f"live_first ({live_first}) counts a quantized store's blocks: pass store")
    k_offset = live_first * block_size  # k/v's first token
    if not k_offset <= grad_from <= k_offset + k.shape[2]:
        raise ValueError(f"grad_from must lie in [{k_offset}, {k_offset + k.shape[2]}], got {grad_from}")
    if accumulate:
        grad_shape = (*k.shape[:2], k_offset + k.shape[2] - grad_from, k.shape[3])
        for name, init, x in (("dk_init", dk_init, k), ("dv_init", dv_init, v)):
            if init.shape != grad_shape or init.dtype != x.dtype or init.device != x.device:
                raise ValueError(f"{name} must match {grad_shape} {x.dtype} on {x.device}")
        dk, dv, side = dk_init, dv_init, None
    elif grad_from:
        raise ValueError("grad_from needs dk_init and dv_init")
    else:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        # dK/dV are zero where nothing attends: 2.3 GB of writes at 60 s of Wan-1.3B history.
        # On a GPU the fill runs on a side stream beside the compute-bound dQ kernel (which
        # never touches them); the dK/dV kernel waits for it.
        side = _side_stream(q.device) if q.is_cuda else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(q.device))
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            dk.zero_()
            dv.zero_()
    lse = lse.float().contiguous()
    common = dict(
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_ql=q.stride(2), stride_qd=q.stride(3),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kl=k.stride(2), stride_kd=k.stride(3),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vl=v.stride(2), stride_vd=v.stride(3),
        stride_ob=grad_out.stride(0), stride_oh=grad_out.stride(1),
        stride_ol=grad_out.stride(2), stride_od=grad_out.stride(3),
        num_q_heads=q_heads, heads_per_kv=q_heads // kv_heads, num_kv_heads=kv_heads, q_len=q_len,
        group_size=query_group_size, block_size=block_size, chunk_len=chunk_len,
        scale=scale, qk_scale=scale * LOG2E, HEAD_DIM=head_dim, BLOCK_D=block_d, PRECISION=precision,
    )  # fmt: skip

    def shape(tiles: Tiles) -> dict:
        return dict(
            tiles_per_group=math.ceil(query_group_size / tiles.block_m),
            BLOCK_M=tiles.block_m,
            BLOCK_N=tiles.block_n,
            SUBS=math.ceil(block_size / tiles.block_n),
            num_warps=tiles.num_warps,
            num_stages=tiles.num_stages,
        )

    if q_len and q_heads and batch:
        _dq_kernel[(groups * math.ceil(query_group_size / dq_tiles.block_m), batch * q_heads)](
            q_ptr=q, k_ptr=k, v_ptr=v, do_ptr=grad_out, lse_ptr=lse, delta_ptr=delta, dq_ptr=dq,
            table_ptr=block_idx, count_ptr=num_blocks, limit_ptr=limit,
            **store_arguments(store, k, live_first),
            stride_gb=dq.stride(0), stride_gh=dq.stride(1), stride_gl=dq.stride(2), stride_gd=dq.stride(3),
            num_groups=groups, table_width=block_idx.shape[3], HAS_CHUNK=chunk_len > 0,
            **shape(dq_tiles), **common,
        )  # fmt: skip
        num_slots = max(1, math.ceil((k_offset + k.shape[2]) / block_size))
        keys, pair_groups = block_pairs(block_idx, num_slots)
        if side is not None:
            torch.cuda.current_stream(q.device).wait_stream(side)
        chunk_tiles = math.ceil(chunk_len / dkv_tiles.block_n)
        subs = math.ceil(block_size / dkv_tiles.block_n)
        _dkv_kernel[(keys.numel() * subs + batch * kv_heads * chunk_tiles,)](
            q_ptr=q, k_ptr=k, v_ptr=v, do_ptr=grad_out, lse_ptr=lse, delta_ptr=delta, dk_ptr=dk, dv_ptr=dv,
            pair_key_ptr=keys, pair_group_ptr=pair_groups, limit_ptr=limit,
            stride_dkb=dk.stride(0), stride_dkh=dk.stride(1),
            stride_dkl=dk.stride(2), stride_dkd=dk.stride(3),
            stride_dvb=dv.stride(0), stride_dvh=dv.stride(1),
            stride_dvl=dv.stride(2), stride_dvd=dv.stride(3),
            num_pairs=keys.numel(), num_slots=num_slots, chunk_tiles=max(chunk_tiles, 1),
            grad_from=grad_from, k_offset=k_offset, ACCUMULATE=accumulate, **shape(dkv_tiles), **common,
        )  # fmt: skip
    elif side is not None:
        torch.cuda.current_stream(q.device).wait_stream(side)
    return dq, dk, dv


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)
