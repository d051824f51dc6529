"""Scattered-block attention over a quantized history, read in place: the Triton kernel, its
launcher and its plain-torch twin (``quantized_attention_reference``).

The history's whole blocks live in a ``QuantizedBlocks`` store (``omnimem.store``: fp8 e4m3
with a scale per block and head, or int4 codes with KIVI's scales); the history's partial last
block and the current chunk are native rows of a small *tail* buffer. A query tile walks its
row of the block table like ``triton_attention``'s kernel does, but a selected whole block is
read as its quantized bytes and dequantized in registers; no native copy of the history or of
the selection's blocks is ever made.

- fp8: the block's codes convert exactly to the compute dtype; the block's key scale multiplies
  the scores and its value scale the block's ``p @ v`` (one scalar each), so the tensor-core
  products see exact operands.
- int4: codes (two per byte) times a per-channel (keys) or per-token (values) scale plus a
  minimum, in float32, rounded once to the compute dtype.

Every tile is masked (blocks of any size, query groups): simpler than ``triton_attention``'s
kernel, without its split last wave or hand pipelining.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from omnimem.store.blocks import QuantizedBlocks
from omnimem.store.formats import QuantizedKV, dequantize


@triton.jit
def _native_tile(base, start, limit, stride_l, stride_d, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 HEAD_DIM: tl.constexpr):  # fmt: skip
    """Rows ``[start, start + BLOCK_N)`` of a native buffer in float32; rows ``>= limit`` read 0."""
    tokens = start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    mask = (tokens[:, None] < limit) & (dims[None, :] < HEAD_DIM)
    ptrs = base + tokens[:, None].to(tl.int64) * stride_l + dims[None, :] * stride_d
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _codes_tile(base, start, limit, stride_l, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                HEAD_DIM: tl.constexpr, INT4: tl.constexpr):  # fmt: skip
    """Codes of rows ``[start, start + BLOCK_N)`` of a quantized buffer, in float32: fp8 values
    (unscaled) or int4 codes 0..15; rows ``>= limit`` read 0."""
    tokens = start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    mask = (tokens[:, None] < limit) & (dims[None, :] < HEAD_DIM)
    row = base + tokens[:, None].to(tl.int64) * stride_l
    if INT4:
        # Two channels a byte, the even one in the low nibble; each byte is read twice (L1).
        raw = tl.load(row + dims[None, :] // 2, mask=mask, other=0)
        return ((raw >> ((dims[None, :] % 2) * 4).to(tl.uint8)) & 0xF).to(tl.float32)
    raw = tl.load(row + dims[None, :], mask=mask, other=0)
    return raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)


@triton.jit
def _quantized_attention_kernel(
    q_ptr, out_ptr, lse_ptr, tail_k_ptr, tail_v_ptr,
    kq_ptr, vq_ptr, k_scale_ptr, v_scale_ptr, k_min_ptr, v_min_ptr,
    block_idx_ptr, num_blocks_ptr, block_attended_ptr,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_tkb, stride_tkh, stride_tkl, stride_tkd,
    stride_tvb, stride_tvh, stride_tvl, stride_tvd,
    stride_qkb, stride_qkh, stride_qkl,
    stride_ksb, stride_ksh, stride_ksn,
    stride_vsb, stride_vsh, stride_vsn,
    num_q_heads, heads_per_kv, q_len, history_len, chunk_len, whole_blocks,
    table_tiles, table_width, num_groups, num_hist_blocks, query_group_size, qk_scale, num_q_tiles,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, INT4: tl.constexpr, HAS_GROUPS: tl.constexpr, WRITE_LSE: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    batch_head = tile // num_q_tiles
    q_tile = tile % num_q_tiles
    batch = batch_head // num_q_heads
    head = batch_head % num_q_heads
    kv_head = head // heads_per_kv
    num_kv_heads = num_q_heads // heads_per_kv
    SUBS: tl.constexpr = (BLOCK_SIZE + BLOCK_N - 1) // BLOCK_N
    dtype = q_ptr.dtype.element_ty

    rows = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_valid = rows < q_len
    q = tl.load(
        q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        + rows[:, None].to(tl.int64) * stride_ql + dims[None, :] * stride_qd,
        mask=row_valid[:, None] & (dims[None, :] < HEAD_DIM), other=0.0,
    )  # fmt: skip
    tail_k = tail_k_ptr + batch.to(tl.int64) * stride_tkb + kv_head.to(tl.int64) * stride_tkh
    tail_v = tail_v_ptr + batch.to(tl.int64) * stride_tvb + kv_head.to(tl.int64) * stride_tvh
    kq = kq_ptr + batch.to(tl.int64) * stride_qkb + kv_head.to(tl.int64) * stride_qkh
    vq = vq_ptr + batch.to(tl.int64) * stride_qkb + kv_head.to(tl.int64) * stride_qkh
    k_scales = batch.to(tl.int64) * stride_ksb + kv_head.to(tl.int64) * stride_ksh
    v_scales = batch.to(tl.int64) * stride_vsb + kv_head.to(tl.int64) * stride_vsh
    table_row = (batch * num_kv_heads + kv_head) * table_tiles + q_tile % table_tiles
    num_tile_blocks = tl.load(num_blocks_ptr + table_row)
    table_ptr = block_idx_ptr + table_row.to(tl.int64) * table_width
    groups = tl.minimum(rows // query_group_size, num_groups - 1)
    attended_row = (
        block_attended_ptr
        + ((batch * num_kv_heads + kv_head) * num_groups + groups).to(tl.int64) * num_hist_blocks
    )
    whole_len = whole_blocks * BLOCK_SIZE

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    num_iters = num_tile_blocks * SUBS + tl.cdiv(chunk_len, BLOCK_N)
    for it in range(0, num_iters):
        k_mult = tl.full([], 1.0, tl.float32)  # fp8: the block's scales, applied to whole products
        v_mult = tl.full([], 1.0, tl.float32)
        if it < num_tile_blocks * SUBS:  # a history block's sub-tile
            block = tl.load(table_ptr + it // SUBS).to(tl.int32)
            if HAS_GROUPS:
                rows_attend = tl.load(attended_row + block, mask=row_valid, other=0) != 0
            else:
                rows_attend = row_valid
            start = block * BLOCK_SIZE + (it % SUBS) * BLOCK_N
            limit = tl.minimum(block * BLOCK_SIZE + BLOCK_SIZE, history_len)
            if block < whole_blocks:  # quantized, read in place
                k = _codes_tile(kq, start, limit, stride_qkl, BLOCK_N, BLOCK_D, HEAD_DIM, INT4)
                v = _codes_tile(vq, start, limit, stride_qkl, BLOCK_N, BLOCK_D, HEAD_DIM, INT4)
                if INT4:
                    # Keys: scale and minimum per (block, channel); values: per token.
                    channel = k_scales + block.to(tl.int64) * stride_ksn + dims
                    k_scale = tl.load(k_scale_ptr + channel, mask=dims < HEAD_DIM, other=0.0).to(tl.float32)
                    k_low = tl.load(k_min_ptr + channel, mask=dims < HEAD_DIM, other=0.0).to(tl.float32)
                    k = k * k_scale[None, :] + k_low[None, :]
                    tokens = start + tl.arange(0, BLOCK_N)
                    token = v_scales + tokens.to(tl.int64) * stride_vsn
                    v_scale = tl.load(v_scale_ptr + token, mask=tokens < limit, other=0.0).to(tl.float32)
                    v_low = tl.load(v_min_ptr + token, mask=tokens < limit, other=0.0).to(tl.float32)
                    v = v * v_scale[:, None] + v_low[:, None]
                    v = tl.where((dims < HEAD_DIM)[None, :], v, 0.0)
                else:
                    k_mult = tl.load(k_scale_ptr + k_scales + block.to(tl.int64) * stride_ksn).to(tl.float32)
                    v_mult = tl.load(v_scale_ptr + v_scales + block.to(tl.int64) * stride_vsn).to(tl.float32)
            else:  # the history's partial last block: native, at the tail's start
                k = _native_tile(tail_k, start - whole_len, limit - whole_len, stride_tkl, stride_tkd,
                                 BLOCK_N, BLOCK_D, HEAD_DIM)  # fmt: skip
                v = _native_tile(tail_v, start - whole_len, limit - whole_len, stride_tvl, stride_tvd,
                                 BLOCK_N, BLOCK_D, HEAD_DIM)  # fmt: skip
        else:  # the chunk, after the partial block in the tail; every row attends it
            start = history_len - whole_len + (it - num_tile_blocks * SUBS) * BLOCK_N
            limit = history_len - whole_len + chunk_len
            rows_attend = rows >= 0
            k = _native_tile(tail_k, start, limit, stride_tkl, stride_tkd, BLOCK_N, BLOCK_D, HEAD_DIM)
            v = _native_tile(tail_v, start, limit, stride_tvl, stride_tvd, BLOCK_N, BLOCK_D, HEAD_DIM)
        token_ok = (start + tl.arange(0, BLOCK_N)) < limit
        scores = tl.dot(q, tl.trans(k.to(dtype)), input_precision=PRECISION) * (qk_scale * k_mult)
        scores = tl.where(rows_attend[:, None] & token_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing attended yet
        p = tl.exp2(scores - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(dtype), v.to(dtype), input_precision=PRECISION) * v_mult
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
        + rows[:, None].to(tl.int64) * stride_ol + dims[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & (dims[None, :] < HEAD_DIM),
    )  # fmt: skip
    if WRITE_LSE:
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
        tl.store(lse_ptr + batch_head.to(tl.int64) * q_len + rows, lse, mask=row_valid)


def quantized_attention(
    q: torch.Tensor,
    store: QuantizedBlocks,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    *,
    block_idx: torch.Tensor,
    num_blocks: torch.Tensor,
    block_attended: torch.Tensor | None,
    history_len: int,
    chunk_len: int,
    query_group_size: int,
    scale: float,
    return_lse: bool,
    block_m: int = 64,
    block_n: int | None = None,
    num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the kernel.

    ``q [B, Hq, Lq, D]``; the history's whole blocks ``[0, history_len // block_size)`` in
    ``store``; ``tail_k``/``tail_v [B, Hkv, T, D]`` (any strides): the history's partial last
    block, then the ``chunk_len`` chunk tokens. ``block_idx [B, Hkv, T, W]`` ascending history
    block indices per query tile (``T = ceil(Lq / block_m)``) or one row for all (``T = 1``),
    ``num_blocks [B, Hkv, T]`` valid; ``block_attended [B, Hkv, G, NB]`` per query group
    (``None``: one group). See ``omnimem.backends.triton.tile_tables``.
    """
    batch, num_q_heads, q_len, head_dim = q.shape
    bs = store.block_size
    out = torch.empty_like(q)
    lse = torch.empty(batch, num_q_heads, q_len, device=q.device, dtype=torch.float32) if return_lse else out
    num_q_tiles = math.ceil(q_len / block_m)
    num_tiles = batch * num_q_heads * num_q_tiles
    if num_tiles == 0:
        return out, (lse if return_lse else None)
    if block_n is None:
        block_n = max(16, min(triton.next_power_of_2(bs), 64))
    block_d = max(triton.next_power_of_2(head_dim), 16)
    int4 = store.kv_format == "int4"
    k_min = store.k_min if int4 else store.k_scale  # unused by fp8
    v_min = store.v_min if int4 else store.v_scale
    has_groups = block_attended is not None
    attended = block_attended.to(torch.uint8) if has_groups else num_blocks  # unused when no groups
    kq, vq = store.k.view(torch.uint8), store.v.view(torch.uint8)
    _quantized_attention_kernel[(num_tiles,)](
        q, out, lse, tail_k, tail_v,
        kq, vq, store.k_scale, store.v_scale, k_min, v_min,
        block_idx, num_blocks, attended,
        *q.stride(), *out.stride(), *tail_k.stride(), *tail_v.stride(),
        *kq.stride()[:3], *store.k_scale.stride()[:3], *store.v_scale.stride()[:3],
        num_q_heads, num_q_heads // tail_k.shape[1], q_len, history_len, chunk_len, history_len // bs,
        block_idx.shape[2], block_idx.shape[3],
        block_attended.shape[2] if has_groups else 1, block_attended.shape[3] if has_groups else 1,
        query_group_size, scale * 1.4426950408889634, num_q_tiles,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=bs,
        INT4=int4, HAS_GROUPS=has_groups, WRITE_LSE=return_lse,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
    )  # fmt: skip
    return out, (lse if return_lse else None)


def dequantized_history(
    store: QuantizedBlocks,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    *,
    history_len: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values the kernel reads, as one native ``[B, Hkv, L, D]`` pair in ``dtype``:
    the store's whole blocks dequantized, then the tail (the reference path: it materializes)."""
    whole = history_len // store.block_size * store.block_size
    out = []
    for role, data, scale, minimum, tail in (
        ("key", store.k, store.k_scale, store.k_min, tail_k),
        ("value", store.v, store.v_scale, store.v_min, tail_v),
    ):
        blocks = whole // store.block_size
        if store.kv_format == "int4" and role == "value":
            scale, minimum = scale[:, :, :whole], minimum[:, :, :whole]
        else:
            scale = scale[:, :, :blocks]
            minimum = None if minimum is None else minimum[:, :, :blocks]
        q = QuantizedKV(
            store.kv_format, role, store.block_size, store.head_dim, data[:, :, :whole], scale, minimum
        )
        out.append(torch.cat([dequantize(q, dtype), tail.to(dtype)], dim=2))
    return out[0], out[1]


def quantized_attention_reference(
    q: torch.Tensor,
    store: QuantizedBlocks,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    selection,
    *,
    history_len: int,
    chunk_len: int,
    scale: float,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The kernel's plain-torch twin: ``dequantized_history`` (in ``q``'s dtype, float64 for a
    float64 reference), then the dense backend with ``selection`` (history block numbering)."""
    from omnimem.backends import dense
    from omnimem.config import OmniMemConfig

    length = history_len % store.block_size + chunk_len
    k, v = dequantized_history(store, tail_k[:, :, :length], tail_v[:, :, :length], history_len=history_len,
                               dtype=q.dtype)  # fmt: skip
    out, lse = dense.forward(q, k, v, selection, chunk_len=chunk_len, scale=scale, return_lse=True,
                             config=OmniMemConfig())  # fmt: skip
    return (out, lse) if return_lse else out
