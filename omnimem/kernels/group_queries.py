"""The gated selection's per-call inputs in one launch (reference: ``omnimem.gated.selection``'s
``group_queries`` and ``candidate_span``).

One program per (batch x KV head, ``groups_per_program`` query groups) averages each group's
queries of each query head of that KV head and sums the means (the GQA sum); ``ROUND`` rounds
each mean to the queries' dtype first (``pool_precision="input"``). The first program also
writes the candidates' span (``[start, end)`` are the candidate blocks) from the sequence length on
the device, so a selection makes no host sync and no chain of scalar torch ops.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from omnimem.gated.selection import CandidateRule, candidate_span
from omnimem.kernels.pdl import gdc_launch_dependents


@triton.jit
def _round_through(x, dtype: tl.constexpr):
    """float32 ``x`` rounded to nearest (even) through ``dtype``. bfloat16 by bits: Triton's
    interpreter truncates that cast, the GPU rounds it, and both must agree with torch."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x == x, bits.to(tl.float32, bitcast=True), x)  # NaN stays NaN
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def _rows(base, first, stop, stride_l, stride_d, cols, col_ok, ROWS: tl.constexpr):
    """Rows ``[first, first + ROWS)`` before ``stop`` as float32 (0 elsewhere)."""
    token = first + tl.arange(0, ROWS)
    ptrs = base + token.to(tl.int64)[:, None] * stride_l + cols[None, :] * stride_d
    return tl.load(ptrs, mask=(token < stop)[:, None] & col_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _group_queries_kernel(
    q_ptr, seq_ptr, out_ptr, span_ptr,
    stride_b, stride_h, stride_l, stride_d,
    num_kv_heads, q_len, group_size, num_groups, window_tokens, sink_end,
    HEADS_PER_KV: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    ROUND: tl.constexpr, BLOCK_SIZE: tl.constexpr, TOP_K: tl.constexpr, MODE: tl.constexpr,
    EX_WINDOW: tl.constexpr = 0, EX_SINK: tl.constexpr = 0, PROGRESSIVE: tl.constexpr = True,
    GROUPS: tl.constexpr = 1, ONE_TILE: tl.constexpr = False, PDL_TRIGGER: tl.constexpr = False,
):  # fmt: skip
    if PDL_TRIGGER:  # the selection's first pass may start (it waits for this kernel's writes)
        gdc_launch_dependents()
    batch_head = tl.program_id(1)
    batch = batch_head // num_kv_heads
    kv_head = batch_head % num_kv_heads
    cols = tl.arange(0, D_PAD)
    col_ok = cols < HEAD_DIM
    # GROUPS groups per program, unrolled: their loads are in flight together.
    for i in tl.static_range(GROUPS):
        group = tl.program_id(0) * GROUPS + i
        start = group * group_size
        stop = tl.minimum(start + group_size, q_len)
        total = tl.zeros([D_PAD], tl.float32)
        for r in tl.static_range(HEADS_PER_KV):
            head = kv_head * HEADS_PER_KV + r
            base = q_ptr + batch.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h
            if ONE_TILE:  # a group fits one tile of rows: no loop
                acc = _rows(base, start, stop, stride_l, stride_d, cols, col_ok, ROWS)
            else:
                acc = tl.zeros([ROWS, D_PAD], tl.float32)
                for row0 in range(start, stop, ROWS):
                    acc += _rows(base, row0, stop, stride_l, stride_d, cols, col_ok, ROWS)
            mean = tl.div_rn(tl.sum(acc, 0), tl.maximum(stop - start, 1).to(tl.float32))
            if ROUND:
                mean = _round_through(mean, q_ptr.dtype.element_ty)
            total += mean
        out = out_ptr + (batch_head.to(tl.int64) * num_groups + group) * HEAD_DIM + cols
        tl.store(out, total, mask=col_ok & (group + tl.zeros_like(cols) < num_groups))

    group = tl.program_id(0)
    if (group == 0) & (batch_head == 0):
        seq_len = tl.load(seq_ptr).to(tl.int64)
        valid = (seq_len + BLOCK_SIZE - 1) // BLOCK_SIZE
        span_start = valid * 0
        end = valid
        if MODE == "awe":  # the blocks entirely before the window, once there are top_k of them
            before = tl.maximum(seq_len - window_tokens, 0) // BLOCK_SIZE
            end = tl.where(before >= TOP_K, before, end)
        if MODE == "chunks":  # the authors' exclusion, in chunks of q_len tokens
            chunk = (seq_len - q_len) // q_len
            if EX_WINDOW > 0:
                first_excluded = tl.maximum(chunk - EX_WINDOW + 1, 0)
                end = tl.minimum((first_excluded * q_len + BLOCK_SIZE - 1) // BLOCK_SIZE, valid)
            if PROGRESSIVE:
                applies = chunk >= EX_SINK + EX_WINDOW
                span_start = tl.where(applies, sink_end, span_start)
                end = tl.where(applies, end, valid)
            else:
                span_start += sink_end
        tl.store(span_ptr, span_start)
        tl.store(span_ptr + 1, end)


def group_queries_and_span(
    q: torch.Tensor,
    seq_len: torch.Tensor,
    *,
    query_group_size: int,
    num_kv_heads: int,
    precision: str,
    rule: CandidateRule,
    rows: int = 16,
    num_warps: int = 2,
    groups_per_program: int = 2,
    pdl_trigger: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pooled_q [B, Hkv, G, D] float32, span [2] int64)``: each group's mean query summed
    over a KV head's query heads (``G = ceil(Lq / query_group_size)``), and the candidate
    blocks ``[start, end)`` of ``rule`` for ``seq_len`` (a 0-d integer tensor on ``q``'s
    device), as ``candidate_span``.

    ``groups_per_program``: 2 measured fastest on an H200 (12.8 vs 14.0 us at the authors'
    shapes; 4: 14.6, 8: 19.4); the result does not depend on it. ``pdl_trigger``: the next
    kernel, launched with ``launch_pdl`` (``omnimem.kernels.pdl``), may start at once (it
    waits for this one's writes)."""
    batch, q_heads, q_len, head_dim = q.shape
    num_groups = math.ceil(q_len / query_group_size)
    pooled = torch.empty(batch, num_kv_heads, num_groups, head_dim, device=q.device, dtype=torch.float32)
    if pooled.numel() == 0:  # nothing to select for: no program would write the span
        return pooled, candidate_span(seq_len.to(torch.int64), q_len, rule)
    span = torch.empty(2, device=q.device, dtype=torch.int64)
    rows = min(rows, triton.next_power_of_2(query_group_size))
    _group_queries_kernel[(math.ceil(num_groups / groups_per_program), batch * num_kv_heads)](
        q_ptr=q, seq_ptr=seq_len, out_ptr=pooled, span_ptr=span,
        stride_b=q.stride(0), stride_h=q.stride(1), stride_l=q.stride(2), stride_d=q.stride(3),
        num_kv_heads=num_kv_heads, q_len=q_len, group_size=query_group_size, num_groups=num_groups,
        window_tokens=rule.window_tokens, sink_end=rule.sink_end(q_len),
        HEADS_PER_KV=q_heads // num_kv_heads, ROWS=rows, HEAD_DIM=head_dim,
        D_PAD=triton.next_power_of_2(head_dim), ROUND=precision == "input", BLOCK_SIZE=rule.block_size,
        TOP_K=rule.top_k, MODE=rule.mode, EX_WINDOW=rule.exclude_window_chunks,
        EX_SINK=rule.exclude_sink_chunks, PROGRESSIVE=rule.progressive_exclude, GROUPS=groups_per_program,
        ONE_TILE=query_group_size <= rows, PDL_TRIGGER=pdl_trigger, num_warps=num_warps,
    )  # fmt: skip
    return pooled, span
