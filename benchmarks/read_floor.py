"""The floor under any selection: one kernel that only reads what selection must read.

Selection from cached block sums reads the chunk's queries (to pool them) and every block sum
of the history, then writes a few KiB of tables. ``read_inputs`` reads the same two tensors
once, in one launch, at full occupancy, and writes one float per program: timed like selection,
the gap between the two is what ranking and tables cost beyond the bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _read_inputs_kernel(
    queries_ptr, num_query_elements, sums_ptr, num_sum_elements, out_ptr,
    QUERY_TILE: tl.constexpr, SUM_TILE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    query_tiles = tl.cdiv(num_query_elements, QUERY_TILE)
    if pid < query_tiles:
        query_offset = pid.to(tl.int64) * QUERY_TILE + tl.arange(0, QUERY_TILE)
        loaded = tl.load(queries_ptr + query_offset, mask=query_offset < num_query_elements, other=0.0)
        total = tl.sum(loaded.to(tl.float32), 0)
    else:
        sum_offset = (pid - query_tiles).to(tl.int64) * SUM_TILE + tl.arange(0, SUM_TILE)
        total = tl.sum(tl.load(sums_ptr + sum_offset, mask=sum_offset < num_sum_elements, other=0.0), 0)
    tl.store(out_ptr + pid, total)


def read_inputs(
    queries: torch.Tensor, block_sums: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Read contiguous ``queries`` (16-bit) and ``block_sums`` (float32) once; one float out per
    32 KiB read (``out``: preallocated, for CUDA-graph capture)."""
    if not (queries.is_contiguous() and block_sums.is_contiguous()):
        raise ValueError("read_inputs: queries and block_sums must be contiguous")
    query_tile, sum_tile = 16384, 8192  # 32 KiB per program either way
    grid = triton.cdiv(queries.numel(), query_tile) + triton.cdiv(block_sums.numel(), sum_tile)
    if out is None:
        out = torch.empty(grid, device=queries.device, dtype=torch.float32)
    _read_inputs_kernel[(grid,)](
        queries, queries.numel(), block_sums, block_sums.numel(), out,
        QUERY_TILE=query_tile, SUM_TILE=sum_tile, num_warps=8,
    )  # fmt: skip
    return out
