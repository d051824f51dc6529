"""Mean query of every (batch, query head, query group) in one kernel (reference:
``selection.pooled_queries``).

One program sums one ``ROWS * STEPS``-token slice of a group into a float32 partial, with whole
tiles per load: a program has nothing else to do, so the bytes it keeps in flight decide the
bandwidth. The last program of a group to finish (an atomic ticket) adds the group's partials
in a fixed order and divides by the group's length: deterministic, and one launch.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _pooled_queries_kernel(
    q_ptr, partials_ptr, pooled_ptr, ticket_ptr, stride_b, stride_h, stride_l, stride_d,
    num_heads, q_len, group_size, num_splits,
    ROWS: tl.constexpr, STEPS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
):  # fmt: skip
    batch_head = tl.program_id(0)
    group_split = tl.program_id(1)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    group = group_split // num_splits
    split = group_split % num_splits
    start = group * group_size + split * (ROWS * STEPS)
    end = tl.minimum((group + 1) * group_size, q_len)
    cols = tl.arange(0, D_PAD)
    col_ok = cols < HEAD_DIM
    base = q_ptr + batch.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h
    acc = tl.zeros([ROWS, D_PAD], dtype=tl.float32)
    for step in tl.static_range(STEPS):
        token = start + step * ROWS + tl.arange(0, ROWS)
        ptrs = base + token.to(tl.int64)[:, None] * stride_l + cols[None, :] * stride_d
        acc += tl.load(ptrs, mask=(token[:, None] < end) & col_ok[None, :], other=0.0).to(tl.float32)
    num_groups = tl.num_programs(1) // num_splits
    head_group = batch_head.to(tl.int64) * num_groups + group
    tl.store(partials_ptr + (head_group * num_splits + split) * HEAD_DIM + cols, tl.sum(acc, 0), mask=col_ok)

    tl.debug_barrier()  # every thread's stores before the release (CUTLASS's pattern)
    if tl.atomic_add(ticket_ptr + head_group, 1, sem="acq_rel") == num_splits - 1:
        s = tl.arange(0, SPLITS_PAD)
        parts = partials_ptr + head_group * num_splits * HEAD_DIM + s[:, None] * HEAD_DIM + cols[None, :]
        total = tl.sum(
            tl.load(parts, mask=(s[:, None] < num_splits) & col_ok[None, :], cache_modifier=".cg"), 0
        )
        group_len = (end - group * group_size).to(tl.float32)
        tl.store(pooled_ptr + head_group * HEAD_DIM + cols, tl.div_rn(total, group_len), mask=col_ok)


def pooled_queries(
    q: torch.Tensor,
    query_group_size: int,
    *,
    tickets: torch.Tensor | None = None,
    rows: int = 32,
    steps: int = 4,
    num_warps: int = 4,
) -> torch.Tensor:
    """``[B, Hq, Lq, D]`` (any strides, any float dtype) -> ``[B, Hq, G, D]`` float32 mean query
    of each group of ``query_group_size`` tokens (``G = ceil(Lq / query_group_size)``; the last
    group may be shorter).

    ``tickets``: ``B * Hq * G`` zeroed int32 (allocated here if not given); ``rows * steps``
    tokens per program, ``rows`` per load (32 x 4 measured best on an H100)."""
    batch, num_heads, q_len, head_dim = q.shape
    num_groups = math.ceil(q_len / query_group_size)
    rows = min(rows, triton.next_power_of_2(query_group_size))
    num_splits = math.ceil(query_group_size / (rows * steps))
    partials = torch.empty(
        batch * num_heads * num_groups * num_splits, head_dim, device=q.device, dtype=torch.float32
    )
    pooled = torch.empty(batch, num_heads, num_groups, head_dim, device=q.device, dtype=torch.float32)
    if tickets is None:
        tickets = torch.zeros(batch * num_heads * num_groups, device=q.device, dtype=torch.int32)
    _pooled_queries_kernel[(batch * num_heads, num_groups * num_splits)](
        q, partials, pooled, tickets, *q.stride(), num_heads, q_len, query_group_size, num_splits,
        ROWS=rows, STEPS=steps, SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim,
        D_PAD=triton.next_power_of_2(head_dim), num_warps=num_warps,
    )  # fmt: skip
    return pooled
