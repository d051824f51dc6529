"""Per-head scattered-block attention: the Triton kernel and its launcher (reference: ``dense``).

One program computes one 128-query (``BLOCK_M``) tile of one query head. It walks that tile's
row of the block table, loading each selected history block straight from the KV cache through
strides (no gathered copy), then the contiguous current chunk; online softmax in float32 with
``exp2``. Rows of a tile that belong to query groups not attending a block are masked from a
dense per-group table, so per-query-group selection is exact.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _attend_tile(
    q, k_base, v_base, tokens, pair_valid, col_valid, dims, dim_valid,
    stride_kl, stride_kd, stride_vl, stride_vd, qk_scale, m_i, l_i, acc,
):  # fmt: skip
    """One online-softmax step over the keys ``tokens`` (masked by ``pair_valid`` [M, N])."""
    load_mask = col_valid[:, None] & dim_valid[None, :]
    k = tl.load(
        k_base + tokens[:, None].to(tl.int64) * stride_kl + dims[None, :] * stride_kd,
        mask=load_mask,
        other=0.0,
    )
    v = tl.load(
        v_base + tokens[:, None].to(tl.int64) * stride_vl + dims[None, :] * stride_vd,
        mask=load_mask,
        other=0.0,
    )
    scores = tl.where(pair_valid, tl.dot(q, tl.trans(k)).to(tl.float32) * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    # Rows with nothing attended so far keep m = -inf; shift by 0 there to avoid inf - inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(scores - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
    return m_new, l_i, acc


@triton.jit
def _scattered_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    tile_block_idx_ptr, tile_num_blocks_ptr, block_attended_ptr, history_len_ptr,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    num_q_heads, heads_per_kv, q_len, chunk_len, num_q_tiles, table_width, num_groups, num_blocks,
    query_group_size, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HAS_GROUPS: tl.constexpr, WRITE_LSE: tl.constexpr,
):  # fmt: skip
    q_tile = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // num_q_heads
    head = batch_head % num_q_heads
    kv_head = head // heads_per_kv
    history_len = tl.load(history_len_ptr)

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
    dim_valid = dims < HEAD_DIM

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    table_row = (batch * (num_q_heads // heads_per_kv) + kv_head) * num_q_tiles + q_tile
    num_tile_blocks = tl.load(tile_num_blocks_ptr + table_row)
    groups = tl.minimum(rows // query_group_size, num_groups - 1)
    attended_row = (
        block_attended_ptr
        + ((batch * (num_q_heads // heads_per_kv) + kv_head) * num_groups + groups).to(tl.int64) * num_blocks
    )

    # History: the tile's selected blocks, each read in place from the cache.
    for slot in range(0, num_tile_blocks):
        block = tl.load(tile_block_idx_ptr + table_row.to(tl.int64) * table_width + slot)
        if HAS_GROUPS:  # noqa: SIM108 (a constexpr branch, resolved at compile time)
            rows_attend = tl.load(attended_row + block, mask=row_valid, other=0) != 0
        else:
            rows_attend = row_valid
        for sub in tl.static_range(0, BLOCK_SIZE, BLOCK_N):
            offs = sub + tl.arange(0, BLOCK_N)
            tokens = block * BLOCK_SIZE + offs
            col_valid = (offs < BLOCK_SIZE) & (tokens < history_len)
            m_i, l_i, acc = _attend_tile(
                q, k_base, v_base, tokens, rows_attend[:, None] & col_valid[None, :], col_valid,
                dims, dim_valid, stride_kl, stride_kd, stride_vl, stride_vd, qk_scale, m_i, l_i, acc,
            )  # fmt: skip

    # The current chunk: contiguous tokens [history_len, history_len + chunk_len).
    for start in range(0, chunk_len, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        tokens = history_len + offs
        col_valid = offs < chunk_len
        m_i, l_i, acc = _attend_tile(
            # Every row, padding rows too, attends the chunk: rows stay finite (no 0/0).
            q, k_base, v_base, tokens, (rows >= 0)[:, None] & col_valid[None, :], col_valid,
            dims, dim_valid, stride_kl, stride_kd, stride_vl, stride_vd, qk_scale, m_i, l_i, acc,
        )  # fmt: skip

    out = acc / l_i[:, None]
    out_base = out_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    tl.store(
        out_base + rows[:, None].to(tl.int64) * stride_ol + dims[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & dim_valid[None, :],
    )
    if WRITE_LSE:
        # Natural-log LSE from base-2 running max and sum.
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
        tl.store(lse_ptr + batch_head.to(tl.int64) * q_len + rows, lse, mask=row_valid)


def scattered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    tile_block_idx: torch.Tensor,
    tile_num_blocks: torch.Tensor,
    block_attended: torch.Tensor | None,
    history_len: torch.Tensor,
    chunk_len: int,
    block_size: int,
    query_group_size: int,
    scale: float,
    return_lse: bool,
    block_m: int = 128,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the kernel. ``tile_block_idx [B, Hkv, ceil(Lq / block_m), W]`` int32 (ascending,
    ``tile_num_blocks`` valid), ``block_attended [B, Hkv, G, NB]`` (uint8/bool; ``None`` when the
    chunk is one query group), ``history_len`` a 0-d int64 tensor on the device."""
    batch, num_q_heads, q_len, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(batch, num_q_heads, q_len, device=q.device, dtype=torch.float32) if return_lse else out
    # tl.dot needs every tile dim >= 16 on GPUs: small blocks are loaded as masked 16-token tiles.
    block_n = max(16, min(triton.next_power_of_2(block_size), 64))
    num_q_tiles = math.ceil(q_len / block_m)
    has_groups = block_attended is not None
    attended = block_attended.to(torch.uint8) if has_groups else tile_num_blocks  # unused when no groups
    _scattered_attention_kernel[(num_q_tiles, batch * num_q_heads)](
        q, k, v, out, lse,
        tile_block_idx, tile_num_blocks, attended, history_len,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        num_q_heads, num_q_heads // k.shape[1], q_len, chunk_len, num_q_tiles, tile_block_idx.shape[-1],
        block_attended.shape[2] if has_groups else 1, block_attended.shape[3] if has_groups else 1,
        query_group_size, scale * 1.4426950408889634,
        HEAD_DIM=head_dim, BLOCK_D=max(triton.next_power_of_2(head_dim), 16), BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_SIZE=block_size, HAS_GROUPS=has_groups, WRITE_LSE=return_lse,
        num_warps=8 if block_m >= 128 else 4, num_stages=3,
    )  # fmt: skip
    return out, (lse if return_lse else None)
