"""Kernel-level profile of selection and BlockMask planning at wan-1.3b 60 s (GPU).

Usage: ``python benchmarks/profile_planning.py [--history 369720] [--cached-sums]``; prints the
CUDA kernels of one ``select_blocks`` and one ``build_block_mask`` call, most expensive first
(``--cached-sums``: only ``select_blocks`` from the block sums a cache keeps).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from omnimem import OmniMemConfig, select_blocks
from omnimem.backends import flex as flex_backend
from omnimem.kernels.block_sums import block_sums


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--history", type=int, default=369720)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--cached-sums", action="store_true")
    args = parser.parse_args()
    chunk, heads = 4680, args.heads
    q = torch.randn(1, heads, chunk, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, heads, args.history + chunk, 128, device="cuda", dtype=torch.bfloat16)
    config = OmniMemConfig(top_k=32, sink_tokens=1560, local_tokens=chunk)

    sums = block_sums(k, torch.tensor(args.history, device="cuda"), config.block_size)

    def plan():
        if args.cached_sums:
            return select_blocks(q, k, history_len=args.history, config=config, key_block_sums=sums)
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
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=70))


if __name__ == "__main__":
    main()
