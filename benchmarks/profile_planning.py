"""Kernel-level profile of selection and BlockMask planning at wan-1.3b 60 s (GPU).

Usage: ``python benchmarks/profile_planning.py [--history 369720]``; prints the CUDA kernels
of one ``select_blocks`` and one ``build_block_mask`` call, most expensive first.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from omnimem import OmniMemConfig, select_blocks
from omnimem.backends import flex as flex_backend


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--history", type=int, default=369720)
    parser.add_argument("--heads", type=int, default=12)
    args = parser.parse_args()
    chunk, heads = 4680, args.heads
    q = torch.randn(1, heads, chunk, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, heads, args.history + chunk, 128, device="cuda", dtype=torch.bfloat16)
    config = OmniMemConfig(top_k=32, sink_tokens=1560, local_tokens=chunk)

    def plan():
        sel = select_blocks(q, k, history_len=args.history, config=config)
        return flex_backend.build_block_mask(
            sel, num_q_heads=heads, q_len=chunk, kv_len=k.shape[2], chunk_len=chunk, compiled=True
        )

    for _ in range(3):
        plan()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            plan()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=70))


if __name__ == "__main__":
    main()
