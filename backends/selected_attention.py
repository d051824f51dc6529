"""The gated layer's selected branch: each query group attends its own blocks, read in place
(per-head scattered access; reference: ``gated_branches.selected_attention_gather``).

One program per (query group, row tile of the group, batch x query head): ``BLOCK_M`` rows
(15 queries of a group in a 16-row tile by default) walk the group's ``num_blocks`` table
entries; each block's ``block_size`` keys are read straight from the KV buffer in
``BLOCK_N``-token tiles (masked at the block's and the sequence's end) and folded into an
online softmax in float32 with ``exp2``. Programs of one head are launched next to each other,
so neighbouring groups, which tend to select the same blocks, find them in L2. No buffer is
allocated but the output; with ``combine`` the epilogue also forms the gated sum
``g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa`` (one pass over the other branches' outputs).
A group with no blocks yields 0.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from omnimem.backends.quantized_tiles import store_arguments, store_block_tiles
from omnimem.backends.scattered_backward import _load_rows
from omnimem.store.blocks import QuantizedBlocks

# An fp8 store's blocks multiplied in fp16 (``HALF_PRODUCTS``; bf16 calls on a GPU): e4m3 codes
# become fp16 by one conversion a pair (through float32 to bf16 it is four), the queries fp16 times
# a power of two a row, the probabilities fp16; exact operands, so the output is the bf16 path's
# but for the order of float32 sums. Not yet run on a GPU: off until measured (docs/memory.md).
FP8_HALF_PRODUCTS = False


@triton.jit
def _half_queries(q):
    """``q`` (bf16 rows) as fp16 times a power of two a row, and the inverse powers: the row's
    largest magnitude lands in ``[2**14, 2**16)``, where fp16 holds every bf16 value exactly
    (elements under ``2**-28`` of it lose bits)."""
    x = q.to(tl.float32)
    amax = tl.max(tl.abs(x), 1)
    up = tl.exp2(14.0 - tl.floor(tl.log2(tl.where(amax > 0, amax, 1.0))))
    return (x * up[:, None]).to(tl.float16), 1.0 / up


@triton.jit
def _online_softmax(scores, token_ok, m_i, l_i):
    """One key tile's masked base-2 scores folded into the running max and sum: ``(p, alpha,
    m_new, l_i)``; a tile whose keys are all masked leaves ``m = -inf`` and shifts by 0."""
    scores = tl.where(token_ok[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(scores - m_shift[:, None])
    alpha = tl.exp2(m_i - m_shift)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _selected_attention_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, count_ptr, seq_len_ptr, out_ptr, lse_ptr,
    cmp_ptr, swa_ptr, gate_ptr,
    kq_ptr, vq_ptr, k_scale_ptr, v_scale_ptr, k_min_ptr, v_min_ptr, live_first,
    stride_qkb, stride_qkh, stride_qkl,
    stride_ksb, stride_ksh, stride_ksn, stride_vsb, stride_vsh, stride_vsn,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_cb, stride_ch, stride_cl, stride_cd,
    stride_sb, stride_sh, stride_sl, stride_sd,
    stride_gb, stride_gh, stride_gl, stride_gc,
    num_q_heads, heads_per_kv, num_kv_heads, q_len, num_groups, group_size, block_size, qk_scale,
    TOP_K: tl.constexpr, TILES_PER_GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SUBS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    COMBINE: tl.constexpr, WRITE_LSE: tl.constexpr, PRECISION: tl.constexpr,
    QUANTIZED: tl.constexpr, INT4: tl.constexpr, HALF_PRODUCTS: tl.constexpr = False,
):  # fmt: skip
    group_tile = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // num_q_heads
    head = batch_head % num_q_heads
    kv_head = head // heads_per_kv
    group = group_tile // TILES_PER_GROUP
    row0 = group * group_size + (group_tile % TILES_PER_GROUP) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < tl.minimum((group + 1) * group_size, q_len)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    io_mask = row_ok[:, None] & dim_ok[None, :]

    q_base = q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    q = tl.load(q_base + rows[:, None] * stride_ql + dims[None, :] * stride_qd, mask=io_mask, other=0.0)
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    row_entry = (batch * num_kv_heads + kv_head) * num_groups + group
    count = tl.load(count_ptr + row_entry)
    seq_len = tl.load(seq_len_ptr).to(tl.int32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs = tl.arange(0, BLOCK_N)
    if QUANTIZED:  # blocks before live_first: a quantized store; k/v hold tokens from live_first's
        kq = kq_ptr + batch.to(tl.int64) * stride_qkb + kv_head.to(tl.int64) * stride_qkh
        vq = vq_ptr + batch.to(tl.int64) * stride_qkb + kv_head.to(tl.int64) * stride_qkh
        k_scales = batch.to(tl.int64) * stride_ksb + kv_head.to(tl.int64) * stride_ksh
        v_scales = batch.to(tl.int64) * stride_vsb + kv_head.to(tl.int64) * stride_vsh
    if HALF_PRODUCTS:
        # Two walks over the table (any order): the store's fp8 blocks in fp16, then the live
        # blocks as they are (each walk's tiles of one type for the compiler).
        q16, down = _half_queries(q)
        table = table_ptr + row_entry.to(tl.int64) * TOP_K
        for it in range(0, count * SUBS):
            block = tl.load(table + it // SUBS)
            if block < live_first:
                in_block = (it % SUBS) * BLOCK_N + offs
                token = block * block_size + in_block
                token_ok = (in_block < block_size) & (token < seq_len)
                # fp16 tiles: the codes by one conversion a pair (``fp8_codes``), and the block's scales
                k16, k_mult, v16, v_mult = store_block_tiles(
                    kq, vq, k_scale_ptr, v_scale_ptr, k_min_ptr, v_min_ptr, k_scales, v_scales, block,
                    block * block_size + (it % SUBS) * BLOCK_N, block_size, stride_qkl, stride_ksn,
                    stride_vsn, tl.float16, BLOCK_N, BLOCK_D, HEAD_DIM, False,
                )  # fmt: skip
                scores = tl.dot(q16, tl.trans(k16)) * (down * (qk_scale * k_mult))[:, None]
                p, alpha, m_i, l_i = _online_softmax(scores, token_ok, m_i, l_i)
                acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v16) * v_mult
        for it in range(0, count * SUBS):
            block = tl.load(table + it // SUBS)
            if block >= live_first:
                in_block = (it % SUBS) * BLOCK_N + offs
                token = block * block_size + in_block
                token_ok = (in_block < block_size) & (token < seq_len)
                live = token - live_first * block_size
                k = _load_rows(k_base, live, token_ok, dims, stride_kl, stride_kd, HEAD_DIM)
                v = _load_rows(v_base, live, token_ok, dims, stride_vl, stride_vd, HEAD_DIM)
                scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
                p, alpha, m_i, l_i = _online_softmax(scores, token_ok, m_i, l_i)
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    else:
        for it in range(0, count * SUBS):
            block = tl.load(table_ptr + row_entry.to(tl.int64) * TOP_K + it // SUBS)
            in_block = (it % SUBS) * BLOCK_N + offs
            token = block * block_size + in_block
            token_ok = (in_block < block_size) & (token < seq_len)
            load_mask = token_ok[:, None] & dim_ok[None, :]
            if QUANTIZED:
                k_mult = tl.full([], 1.0, tl.float32)
                v_mult = tl.full([], 1.0, tl.float32)
                if block < live_first:
                    k, k_mult, v, v_mult = store_block_tiles(
                        kq, vq, k_scale_ptr, v_scale_ptr, k_min_ptr, v_min_ptr, k_scales, v_scales, block,
                        block * block_size + (it % SUBS) * BLOCK_N, block_size, stride_qkl, stride_ksn,
                        stride_vsn, k_ptr.dtype.element_ty, BLOCK_N, BLOCK_D, HEAD_DIM, INT4,
                    )  # fmt: skip
                else:
                    live = token - live_first * block_size
                    k = _load_rows(k_base, live, token_ok, dims, stride_kl, stride_kd, HEAD_DIM)
                    v = _load_rows(v_base, live, token_ok, dims, stride_vl, stride_vd, HEAD_DIM)
                scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (qk_scale * k_mult)
            else:
                k = tl.load(k_base + token.to(tl.int64)[:, None] * stride_kl + dims[None, :] * stride_kd,
                            mask=load_mask, other=0.0)  # fmt: skip
                v = tl.load(v_base + token.to(tl.int64)[:, None] * stride_vl + dims[None, :] * stride_vd,
                            mask=load_mask, other=0.0)  # fmt: skip
                scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p, alpha, m_new, l_i = _online_softmax(scores, token_ok, m_i, l_i)
            if QUANTIZED:  # fp8: the block's value scale on its probabilities (exact operands otherwise)
                acc = tl.dot((p * v_mult).to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
            else:
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
            m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # no blocks: 0
    if WRITE_LSE:  # natural log; -inf for a group with no blocks
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
        tl.store(lse_ptr + batch_head.to(tl.int64) * q_len + rows, lse, mask=row_ok)
    if COMBINE:
        gate_base = (
            gate_ptr + batch.to(tl.int64) * stride_gb + head.to(tl.int64) * stride_gh + rows * stride_gl
        )
        g_cmp = tl.load(gate_base, mask=row_ok, other=0.0).to(tl.float32)
        g_slc = tl.load(gate_base + stride_gc, mask=row_ok, other=0.0).to(tl.float32)
        g_swa = tl.load(gate_base + 2 * stride_gc, mask=row_ok, other=0.0).to(tl.float32)
        cmp_base = cmp_ptr + batch.to(tl.int64) * stride_cb + head.to(tl.int64) * stride_ch
        swa_base = swa_ptr + batch.to(tl.int64) * stride_sb + head.to(tl.int64) * stride_sh
        o_cmp = tl.load(
            cmp_base + rows[:, None] * stride_cl + dims[None, :] * stride_cd, mask=io_mask, other=0.0
        )
        o_swa = tl.load(
            swa_base + rows[:, None] * stride_sl + dims[None, :] * stride_sd, mask=io_mask, other=0.0
        )
        out = (
            g_slc[:, None] * out
            + g_cmp[:, None] * o_cmp.to(tl.float32)
            + g_swa[:, None] * o_swa.to(tl.float32)
        )
    o_base = out_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    tl.store(o_base + rows[:, None] * stride_ol + dims[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=io_mask)  # fmt: skip


def tile_sizes(group_size: int, block_size: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, tiles per group, BLOCK_N, key tiles per block)``: 16-row tiles for groups
    of up to 16 queries, 32-key tiles for blocks of up to 32 tokens (tensor-core minimums)."""
    block_m = min(128, max(16, triton.next_power_of_2(group_size)))
    block_n = min(64, max(16, triton.next_power_of_2(block_size)))
    return block_m, math.ceil(group_size / block_m), block_n, math.ceil(block_size / block_n)


def selected_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_idx: torch.Tensor,
    num_blocks: torch.Tensor,
    seq_len: torch.Tensor,
    block_size: int,
    query_group_size: int,
    scale: float,
    combine: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    lse: torch.Tensor | None = None,
    num_warps: int = 2,
    num_stages: int = 3,
    store: QuantizedBlocks | None = None,
    live_first: int = 0,
) -> torch.Tensor:
    """``[B, Hq, Lq, D]`` in ``q.dtype``: the selected branch (or, with ``combine=(o_cmp,
    o_swa, gates)``, the gated sum of the three branches). ``lse``: a ``[B, Hq, Lq]`` float32
    buffer to receive the branch's natural-log log-sum-exp (``-inf`` where a group has no
    block), for the backward.

    ``block_idx [B, Hkv, G, top_k]`` int32 (its first ``num_blocks [B, Hkv, G]`` entries are
    read), ``seq_len`` a 0-d integer tensor: tokens at or past it are never read. Any strides.

    With ``store`` (a quantized history, ``omnimem.store.blocks.QuantizedBlocks``), blocks
    before ``live_first`` are read from the store's bytes in place (dequantized in registers,
    ``backends/quantized_tiles.py``) and ``k``/``v`` hold the tokens from block
    ``live_first`` on: token ``t`` of the sequence is row ``t - live_first * block_size``.
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads = k.shape[1]
    groups, top_k = block_idx.shape[2], block_idx.shape[3]
    block_m, tiles, block_n, subs = tile_sizes(query_group_size, block_size)
    out = torch.empty_like(q)
    cmp_out, swa_out, gates = combine if combine is not None else (out, out, out)
    interpreted = q.device.type != "cuda"
    precision = "ieee" if interpreted or q.dtype == torch.float32 else "tf32"
    _selected_attention_kernel[(groups * tiles, batch * q_heads)](
        q_ptr=q, k_ptr=k, v_ptr=v, table_ptr=block_idx, count_ptr=num_blocks, seq_len_ptr=seq_len,
        out_ptr=out, lse_ptr=out if lse is None else lse, cmp_ptr=cmp_out, swa_ptr=swa_out, gate_ptr=gates,
        **store_arguments(store, num_blocks, live_first),
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_ql=q.stride(2), stride_qd=q.stride(3),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kl=k.stride(2), stride_kd=k.stride(3),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vl=v.stride(2), stride_vd=v.stride(3),
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_ol=out.stride(2), stride_od=out.stride(3),
        stride_cb=cmp_out.stride(0), stride_ch=cmp_out.stride(1),
        stride_cl=cmp_out.stride(2), stride_cd=cmp_out.stride(3),
        stride_sb=swa_out.stride(0), stride_sh=swa_out.stride(1),
        stride_sl=swa_out.stride(2), stride_sd=swa_out.stride(3),
        stride_gb=gates.stride(0), stride_gh=gates.stride(1),
        stride_gl=gates.stride(2), stride_gc=gates.stride(3),
        num_q_heads=q_heads, heads_per_kv=q_heads // kv_heads, num_kv_heads=kv_heads, q_len=q_len,
        num_groups=groups, group_size=query_group_size, block_size=block_size,
        qk_scale=scale * math.log2(math.e),
        TOP_K=top_k, TILES_PER_GROUP=tiles, BLOCK_M=block_m, BLOCK_N=block_n, SUBS=subs,
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        COMBINE=combine is not None, WRITE_LSE=lse is not None, PRECISION=precision,
        HALF_PRODUCTS=half_products(store, q.dtype), num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def half_products(store: QuantizedBlocks | None, dtype: torch.dtype) -> bool:
    """Whether a call multiplies its store's blocks in fp16 (``FP8_HALF_PRODUCTS``): fp8 stores
    of bf16 calls (fp16 calls already do; fp16 holds every bf16 value only up to scaling)."""
    return FP8_HALF_PRODUCTS and store is not None and store.kv_format == "fp8" and dtype == torch.bfloat16


class SelectedAttention(torch.autograd.Function):
    """The selected branch, differentiable in q, k and v (the table is a constant): this
    kernel forward with its log-sum-exp kept, ``scattered_backward``'s kernels backward.

    ``SelectedAttention.apply(q, k, v, block_idx, num_blocks, seq_len, block_size,
    query_group_size, scale)``, arguments as for ``selected_attention``.
    """

    @staticmethod
    def forward(ctx, q, k, v, block_idx, num_blocks, seq_len, block_size, query_group_size, scale):
        lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
        out = selected_attention(
            q, k, v, block_idx=block_idx, num_blocks=num_blocks, seq_len=seq_len, block_size=block_size,
            query_group_size=query_group_size, scale=scale, lse=lse,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse, block_idx, num_blocks, seq_len)
        ctx.block_size, ctx.query_group_size, ctx.scale = block_size, query_group_size, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        from omnimem.backends.scattered_backward import scattered_attention_backward

        q, k, v, out, lse, block_idx, num_blocks, seq_len = ctx.saved_tensors
        dq, dk, dv = scattered_attention_backward(
            q, k, v, out, lse, grad_out,
            block_idx=block_idx, num_blocks=num_blocks, limit=seq_len, block_size=ctx.block_size,
            query_group_size=ctx.query_group_size, chunk_len=0, scale=ctx.scale,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None, None


def spread_block_gradients(
    grad_means: torch.Tensor | None, like: torch.Tensor, seq_len: int, block_size: int, start: int = 0
) -> torch.Tensor:
    """The gradient that block means ``[B, H, NB, D]`` of tokens ``[0, seq_len)`` pass to the
    tokens ``[start, start + L)`` (``like``'s ``[B, H, L, D]``): each of a block's ``n`` tokens
    gets ``grad / n`` (the last block may be partial); tokens at or past ``seq_len`` get 0. A
    new tensor of ``like``'s shape, dtype and strides."""
    out = torch.empty_like(like)
    end = max(start, min(start + like.shape[2], seq_len))
    out[:, :, end - start :].zero_()
    if end == start:
        return out
    if grad_means is None:
        out[:, :, : end - start].zero_()
        return out
    grad = grad_means.to(torch.promote_types(grad_means.dtype, torch.float32))
    bs = block_size

    def fill(lo: int, hi: int, block: int) -> None:  # tokens [lo, hi) of one block
        count = min(bs, seq_len - block * bs)
        out[:, :, lo - start : hi - start] = (grad[:, :, block] / count)[:, :, None]

    head = start // bs
    fill(start, min((head + 1) * bs, end), head)
    body_lo, body_hi = (head + 1) * bs, end // bs * bs
    if body_hi > body_lo:  # whole blocks: one broadcast copy
        body = out[:, :, body_lo - start : body_hi - start].unflatten(2, (-1, bs))
        body.copy_((grad[:, :, head + 1 : end // bs] / bs)[:, :, :, None].expand(body.shape))
    if end > max(body_lo, body_hi):  # a partial last block
        fill(max(body_lo, body_hi), end, end // bs)
    return out


class SelectedAttentionFanout(torch.autograd.Function):
    """The selected branch of the gated layer together with what the two dense branches take
    from the keys and values (block means, the window), so that one backward makes the whole
    ``dk`` and ``dv``: the means' gradient spread over their tokens (one write of each: a
    gradient every token gets anyway), the window's added in place, then the selected branch's
    dK/dV kernel adds its blocks in place. Autograd alone would zero-fill a full-length gradient
    per branch and sum them: several more passes over the whole history.

    ``SelectedAttentionFanout.apply(q, k, v, keys, values, k_means, v_means, block_idx,
    num_blocks, limit_t, limit, window_start, k_start, seq_len, block_size, query_group_size,
    scale)``: the attended keys are ``k`` (``[B, Hkv, L, D]``), or ``keys`` when given: a copy
    whose last ``L`` tokens hold ``k``'s values after constant ones (a cache's compact history;
    only ``k`` gets a gradient); the values likewise; ``limit`` (and ``limit_t``, the same as a
    0-d device tensor) ends the attended keys; ``k``'s tokens are the sequence's
    ``[k_start, k_start + L)`` of ``seq_len``, whose block means ``k_means``/``v_means``
    (precomputed, undifferentiated) are. Returns ``(o_slc, k_means', v_means', k_window,
    v_window)``: the selected branch's output (as ``selected_attention``), copies of the means
    and of the keys and values ``[window_start, limit)``, each differentiable back to ``k`` and
    ``v`` (not to the constant keys before them). ``store``, ``live_first`` (optional, last): a
    quantized history, as ``selected_attention`` reads it: blocks before ``live_first`` come from
    the store's bytes in forward and backward (constants), ``keys``/``values`` hold the tokens
    from block ``live_first`` on (the window among them).
    """

    @staticmethod
    def forward(
        ctx, q, k, v, keys, values, k_means, v_means, block_idx, num_blocks, limit_t, limit,
        window_start, k_start, seq_len, block_size, query_group_size, scale, store=None, live_first=0,
    ):  # fmt: skip
        keys = k if keys is None else keys
        values = v if values is None else values
        offset = live_first * block_size  # keys' first token
        if window_start < offset:
            raise ValueError(f"the window (from {window_start}) must lie in the native keys (from {offset})")
        lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
        out = selected_attention(
            q, keys, values, block_idx=block_idx, num_blocks=num_blocks, seq_len=limit_t,
            block_size=block_size, query_group_size=query_group_size, scale=scale, lse=lse, store=store,
            live_first=live_first,
        )  # fmt: skip
        ctx.save_for_backward(q, keys, values, out, lse, block_idx, num_blocks, limit_t)
        ctx.grad_from = offset + keys.shape[2] - k.shape[2]  # in the table's numbering
        ctx.store, ctx.live_first = store, live_first
        ctx.window_start, ctx.k_start, ctx.seq_len = window_start, k_start, seq_len
        ctx.block_size, ctx.query_group_size, ctx.scale = block_size, query_group_size, scale
        window = slice(window_start - offset, limit - offset)
        return out, k_means.clone(), v_means.clone(), keys[:, :, window].clone(), values[:, :, window].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_k_means, grad_v_means, grad_k_window, grad_v_window):
        from omnimem.backends.scattered_backward import scattered_attention_backward

        q, keys, values, out, lse, block_idx, num_blocks, limit_t = ctx.saved_tensors
        grad_from, bs = ctx.grad_from, ctx.block_size
        like = keys[:, :, grad_from - ctx.live_first * bs :]
        dk = spread_block_gradients(grad_k_means, like, ctx.seq_len, bs, start=ctx.k_start)
        dv = spread_block_gradients(grad_v_means, like, ctx.seq_len, bs, start=ctx.k_start)
        for grad, window_grad in ((dk, grad_k_window), (dv, grad_v_window)):
            if window_grad is not None:  # the window's part from grad_from on
                skip = max(0, grad_from - ctx.window_start)
                lo = ctx.window_start + skip - grad_from
                grad[:, :, lo : lo + window_grad.shape[2] - skip] += window_grad[:, :, skip:]
        dq = None
        if grad_out is not None:
            dq, dk, dv = scattered_attention_backward(
                q, keys, values, out, lse, grad_out,
                block_idx=block_idx, num_blocks=num_blocks, limit=limit_t, block_size=bs,
                query_group_size=ctx.query_group_size, chunk_len=0, scale=ctx.scale, dk_init=dk, dv_init=dv,
                grad_from=grad_from, store=ctx.store, live_first=ctx.live_first,
            )  # fmt: skip
        return dq, dk, dv, *([None] * 16)
