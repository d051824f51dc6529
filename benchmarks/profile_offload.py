"""Kernel-level profile of one offloaded ``attend`` at wan-1.3b shapes (GPU).

Usage: ``python benchmarks/profile_offload.py [--history 369720]``; prints the CUDA kernels of
a steady-state offloaded call (all blocks staged from the previous call), most expensive first,
and the CPU time of the call.
"""

from __future__ import annotations

import argparse

import torch
from offload_gpu import CHUNK, FRAME, Rollout, fill, make_caches
from torch.profiler import ProfilerActivity, profile

from omnimem import OmniMemConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--history", type=int, default=369720)
    parser.add_argument("--heads", type=int, default=12)
    args = parser.parse_args()
    config = OmniMemConfig(block_size=128, top_k=32, sink_tokens=FRAME, local_tokens=CHUNK, backend="triton")
    rollout = Rollout(args.heads, seed=0)
    for offload in (False, True):
        caches = make_caches(1, args.history + CHUNK, config, args.heads, offload=offload)
        fill(caches, args.history, rollout)
        q, k, v = rollout.rand(), rollout.rand(), rollout.rand()
        for _ in range(3):
            caches[0].attend(q, k, v)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                caches[0].attend(q, k, v)
            torch.cuda.synchronize()
        print(f"offload={offload}: 5 calls")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
