"""Where the host time of one eager ``cached_attention`` step goes (GPU; Python profile).

Usage: ``python benchmarks/host_overhead_gpu.py [--heads 20 6] [--history 369720]``. Per head
count: host microseconds per call when the GPU keeps up (wall time of calls with no
synchronisation), GPU milliseconds per call, and the Python functions with the most own time
(cProfile) over the calls: what a step costs before the first kernel reaches the GPU.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from omnimem import OmniMemCache, OmniMemConfig, cached_attention

CHUNK, DIM = 4680, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, nargs="+", default=[20, 6])
    parser.add_argument("--history", type=int, default=237 * 1560)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--top", type=int, default=22)
    args = parser.parse_args()
    config = OmniMemConfig(block_size=128, top_k=32, sink_tokens=1560, local_tokens=CHUNK, backend="triton")
    for heads in args.heads:
        cache = OmniMemCache(
            args.history, max_chunk_tokens=CHUNK, batch=1, num_kv_heads=heads, head_dim=DIM, config=config,
            dtype=torch.bfloat16, device="cuda", layout="blhd",
        )  # fmt: skip
        cache.k.normal_()
        cache.v.normal_()
        cache._refresh_block_sums(0, args.history)
        cache.history_len = args.history
        q, k, v = (torch.randn(1, CHUNK, heads, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for _ in range(10):
            cached_attention(q, k, v, cache)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.calls):
            cached_attention(q, k, v, cache)
        host = (time.perf_counter() - start) / args.calls
        torch.cuda.synchronize()
        gpu = (time.perf_counter() - start) / args.calls
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.calls):
            cached_attention(q, k, v, cache)
        profiler.disable()
        torch.cuda.synchronize()
        print(f"\n== {heads} KV heads: host {1e6 * host:.0f} us per call, wall with GPU {1e3 * gpu:.3f} ms")
        stats = pstats.Stats(profiler).sort_stats("tottime")
        stats.print_stats(args.top)
        del cache


if __name__ == "__main__":
    main()
