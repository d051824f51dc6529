"""Host time per call of the gated layer's window branch and of the whole layer, with the dense
branches on the Hopper kernel and on SDPA (GPU).

Each function is called 20 times back to back after a warm-up, without synchronising: the GPU
queue absorbs them, so the wall time per call is the host's (Python, argument binding, the
launches). Shapes of docs/gated.md (12 heads of 128, bf16, 4,680 queries, a 14,040-key window)
at 18 and 237 frames of history. Run from the repository root:

    PYTHONPATH=. python benchmarks/dense_host_time_gpu.py
"""

from __future__ import annotations

import time

import torch

from omnimem import gated_attention, pool_kv
from omnimem.backends import gated_branches
from omnimem.backends.gated_branches import window_attention

HEADS, HEAD_DIM, CHUNK, FRAME_TOKENS = 12, 128, 4680, 1560


def host_us(fn, calls: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return host


def measure(frames: int) -> None:
    history = frames * FRAME_TOKENS
    seq = history + CHUNK
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(length: int) -> torch.Tensor:
        x = torch.randn(1, length, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
        return x.transpose(1, 2)

    q, k, v = randn(CHUNK), randn(seq), randn(seq)
    gates = torch.rand(1, HEADS, CHUNK, 3, device="cuda")
    pooled = pool_kv(k, v, seq_len=seq, block_size=30)

    def window():
        return window_attention(q, k, v, seq, window_tokens=14040, scale=HEAD_DIM**-0.5)

    def layer():
        return gated_attention(q, k, v, gates, history_len=history, pooled=pooled, backend="triton")

    for hopper in (True, False):
        gated_branches.HOPPER_DENSE = hopper
        times = f"window {host_us(window):.0f}, layer {host_us(layer):.0f}"
        print(f"{frames}f hopper={hopper}: host us per call: {times}", flush=True)
    gated_branches.HOPPER_DENSE = True


def main() -> None:
    for frames in (18, 237):
        measure(frames)


if __name__ == "__main__":
    main()
