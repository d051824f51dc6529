"""Per-chunk attention time and memory of an AR rollout as history grows (GPU; one device call).

One Wan2.1-1.3B-shaped attention layer (12 heads x 128, bf16, chunks of 4680 tokens = 3 latent
frames; the model's 30 layers are scaled down to one: per-layer numbers, multiply by 30 for a
forward) drives an ``OmniMemCache`` through history lengths from 10 s to 5 min of video. At each
point it times one denoising-step ``attend`` (selection from the cache's block sums + the
attention backend: ``triton``, what ``auto`` picks here, and ``flex``) against dense cuDNN
attention over the whole history in the same buffer, and records the peak GPU memory each
allocates beyond the cache. ``graph ms``: the triton step replayed from a CUDA graph (the step
without host overhead; the cache's static shapes make it capturable).

    python benchmarks/rollout_gpu.py [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json

import torch
import torch.nn.functional as F
import triton
from attention_gpu import graph_ms
from torch.nn.attention import SDPBackend, sdpa_kernel

from omnimem import OmniMemCache, OmniMemConfig, use_backend

FRAME = 1560
CHUNK = 3 * FRAME
SECONDS = {10: 24, 30: 72, 60: 237, 120: 480, 300: 1200}  # seconds of video -> history latent frames


def dense_attention(q, k, v):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def measure(fn, *args) -> tuple[float, float]:
    """(median ms, peak MiB allocated beyond what was allocated before the call)."""
    fn(*args)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(*args)
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    return triton.testing.do_bench(lambda: fn(*args), warmup=50, rep=300, return_mode="median"), extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    heads, dim = args.heads, 128
    capacity = max(SECONDS.values()) * FRAME
    config = OmniMemConfig(block_size=128, top_k=32, sink_tokens=FRAME, local_tokens=CHUNK)
    cache = OmniMemCache(
        capacity,
        max_chunk_tokens=CHUNK,
        batch=1,
        num_kv_heads=heads,
        head_dim=dim,
        config=config,
        dtype=torch.bfloat16,
        device=device,
        layout="blhd",
    )
    cache_mib = (cache._k_storage.nbytes * 2 + cache.key_block_sums.nbytes) / 2**20
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(length: int) -> torch.Tensor:
        return torch.randn(1, heads, length, dim, device=device, dtype=torch.bfloat16, generator=gen)

    env = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        cache_mib=round(cache_mib),
    )
    print(json.dumps(env))
    rows = []
    for seconds, frames in SECONDS.items():
        target = frames * FRAME
        while cache.history_len < target:  # commit chunks (the last one partial) up to the point
            step = min(CHUNK, target - cache.history_len)
            cache.commit(rand(step), rand(step))
        q, k_chunk, v_chunk = rand(CHUNK), rand(CHUNK), rand(CHUNK)
        cache.attend(q, k_chunk, v_chunk)  # compiles on the first point only (static shapes)
        torch.cuda.synchronize()
        end = cache.history_len + CHUNK

        row = dict(seconds=seconds, history=cache.history_len)
        for backend in ("triton", "flex"):
            with use_backend(backend):
                row[f"{backend}_ms"], row[f"{backend}_extra_mib"] = measure(cache.attend, q, k_chunk, v_chunk)
                if backend == "triton":
                    row["triton_graph_ms"] = graph_ms(functools.partial(cache.attend, q, k_chunk, v_chunk))
        row["dense_ms"], row["dense_extra_mib"] = measure(
            dense_attention, q, cache.k[:, :, :end], cache.v[:, :, :end]
        )
        print(json.dumps(row), flush=True)
        rows.append(row)
    base_ms = rows[0]["triton_ms"]
    output_mib = q.nbytes / 2**20
    print(
        f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}; one layer, "
        f"cache {cache_mib:.0f} MiB (capacity {capacity} tokens), output {output_mib:.1f} MiB"
    )
    print(
        "| video | history tokens | triton attend ms | vs 10 s | triton graph ms | flex attend ms | "
        "dense cuDNN ms | triton extra MiB | flex extra MiB | dense extra MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['seconds']} s | {r['history']:,} | {r['triton_ms']:.3f} | "
            f"{r['triton_ms'] / base_ms:.2f}x | "
            f"{r['triton_graph_ms']:.3f} | {r['flex_ms']:.3f} | {r['dense_ms']:.2f} | "
            f"{r['triton_extra_mib']:.1f} | {r['flex_extra_mib']:.1f} | {r['dense_extra_mib']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(env=env, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
