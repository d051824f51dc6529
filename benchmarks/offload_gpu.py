"""Host-offloaded AR rollout: a history larger than the GPU, at resident speed (GPU; one device call).

Wan2.1-1.3B shapes: 12 KV heads x 128, bf16, chunks of 4680 tokens (3 latent frames), sink one
frame, local window one chunk, top_k 32, triton backend, ``S`` denoising steps per chunk whose
queries differ slightly (``q0 + 0.1 * noise``: successive denoising steps are strongly
correlated); keys and values are random.

1. **One layer at 60 s** (fits resident): a resident and an offloaded cache fed the same chunks;
   outputs are checked bit for bit, then for several fresh chunks each denoising step is timed
   (CUDA events) in both: the first step of a chunk fetches its new blocks from the host, later
   ones reuse them. The steady step is also timed with ``do_bench`` (median of many).
2. **The 30-layer model from 10 s to 90 s** of history (~100 GB of KV at 90 s: more than the
   GPU): all layers offloaded; at each checkpoint one chunk's denoising steps run through all
   layers (timed), then every layer commits. Reported: ms per step (all layers), host bytes per
   step, hit rate, peak GPU memory (which must stay flat), and one commit pass: its time on
   the compute stream and until its copies to the host have landed (they run on a side
   stream, overlapped with whatever the model does next). A resident 30-layer cache of the same
   capacity is tried first and its out-of-memory recorded.

    python benchmarks/offload_gpu.py [--layers 30] [--seconds 10,30,60,90] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton
from attention_gpu import environment

from omnimem import OmniMemCache, OmniMemConfig

FRAME = 1560
CHUNK = 3 * FRAME
FRAMES_PER_SECOND = 237 / 60  # latent frames per second of video (Wan2.1: 16 fps, 4x temporal)


def history_tokens(seconds: float) -> int:
    return round(seconds * FRAMES_PER_SECOND) * FRAME


class Rollout:
    """Random chunks and slightly varying queries, reproducible from a seed."""

    def __init__(self, heads: int, seed: int) -> None:
        self.heads = heads
        self.gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(self, length: int = CHUNK) -> torch.Tensor:
        x = torch.randn(1, length, self.heads, 128, device="cuda", dtype=torch.bfloat16, generator=self.gen)
        return x.transpose(1, 2)  # [B, H, L, D] view of Wan's [B, L, H, D]

    def steps(self, count: int) -> list[torch.Tensor]:
        base = self.rand()
        return [base + 0.1 * self.rand() for _ in range(count)]


def make_caches(layers: int, capacity: int, config: OmniMemConfig, heads: int, offload: bool):
    return OmniMemCache.for_layers(
        layers,
        capacity,
        max_chunk_tokens=CHUNK,
        batch=1,
        num_kv_heads=heads,
        head_dim=128,
        config=config,
        dtype=torch.bfloat16,
        device="cuda",
        layout="blhd",
        offload=offload,
    )


def fill(caches: list[OmniMemCache], target: int, rollout: Rollout) -> None:
    while caches[0].history_len < target:
        length = min(CHUNK, target - caches[0].history_len)
        k, v = rollout.rand(length), rollout.rand(length)
        for cache in caches:
            cache.commit(k, v)


def timed_steps(caches, queries, k_chunk, v_chunk) -> list[float]:
    """ms of each denoising step through all layers (CUDA events)."""
    times = []
    for q in queries:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for cache in caches:
            cache.attend(q, k_chunk, v_chunk)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def one_layer(config: OmniMemConfig, args) -> dict:
    history = history_tokens(60)
    resident = make_caches(1, history + CHUNK * args.chunks, config, args.heads, offload=False)
    offloaded = make_caches(1, history + CHUNK * args.chunks, config, args.heads, offload=True)
    rollout = Rollout(args.heads, seed=0)
    fill(resident + offloaded, history, rollout)
    queries, k_chunk, v_chunk = rollout.steps(args.steps), rollout.rand(), rollout.rand()
    identical = all(
        torch.equal(resident[0].attend(q, k_chunk, v_chunk), offloaded[0].attend(q, k_chunk, v_chunk))
        for q in queries
    )
    per_step = {"resident": [], "offloaded": []}
    before = offloaded[0].offload_stats
    for _ in range(args.chunks):  # a fresh chunk: commit, then its denoising steps
        fill(resident + offloaded, resident[0].history_len + CHUNK, rollout)
        queries, k_chunk, v_chunk = rollout.steps(args.steps), rollout.rand(), rollout.rand()
        for name, caches in (("resident", resident), ("offloaded", offloaded)):
            per_step[name].append(timed_steps(caches, queries, k_chunk, v_chunk))
    after = offloaded[0].offload_stats
    steady = {
        name: triton.testing.do_bench(
            lambda c=caches[0]: c.attend(queries[-1], k_chunk, v_chunk),
            warmup=50,
            rep=300,
            return_mode="median",
        )
        for name, caches in (("resident", resident), ("offloaded", offloaded))
    }
    calls = args.chunks * args.steps
    row = dict(history=resident[0].history_len, identical=identical, steady_ms=steady)
    for name, runs in per_step.items():
        row[f"{name}_first_ms"] = sum(r[0] for r in runs) / len(runs)
        row[f"{name}_later_ms"] = sum(sum(r[1:]) for r in runs) / (len(runs) * (args.steps - 1))
        row[f"{name}_mean_ms"] = sum(sum(r) for r in runs) / (len(runs) * args.steps)
    row["fetched_mib_per_step"] = (after.fetched_bytes - before.fetched_bytes) / calls / 2**20
    row["hit_rate"] = (after.hits - before.hits) / max(1, after.requested - before.requested)
    del resident, offloaded
    torch.cuda.empty_cache()
    return row


def model_rollout(config: OmniMemConfig, args) -> tuple[list[dict], str]:
    seconds = [float(s) for s in args.seconds.split(",")]
    capacity = history_tokens(max(seconds)) + CHUNK
    kv_gib = args.layers * 2 * capacity * args.heads * 128 * 2 / 2**30
    try:  # the resident cache of the same capacity, for the record
        caches = make_caches(args.layers, capacity, config, args.heads, offload=False)
        resident = f"resident fits ({kv_gib:.0f} GiB)"
        del caches
    except torch.OutOfMemoryError:
        resident = f"resident cache ({kv_gib:.0f} GiB of KV) out of GPU memory"
    torch.cuda.empty_cache()
    print(resident, flush=True)
    caches = make_caches(args.layers, capacity, config, args.heads, offload=True)
    rollout = Rollout(args.heads, seed=1)
    q, k_chunk, v_chunk = rollout.rand(), rollout.rand(), rollout.rand()
    for cache in caches:  # compile for these shapes, on an empty history (nothing staged)
        cache.attend(q, k_chunk, v_chunk)
    rows = []
    for point in seconds:
        fill(caches, history_tokens(point), rollout)
        queries, k_chunk, v_chunk = rollout.steps(args.steps), rollout.rand(), rollout.rand()
        before = [c.offload_stats for c in caches]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = timed_steps(caches, queries, k_chunk, v_chunk)
        after = [c.offload_stats for c in caches]
        fetched = sum(a.fetched_bytes - b.fetched_bytes for a, b in zip(after, before, strict=True))
        requested = sum(a.requested - b.requested for a, b in zip(after, before, strict=True))
        hits = sum(a.hits - b.hits for a, b in zip(after, before, strict=True))
        # One commit pass: the compute stream's share vs until the copies to the host landed.
        k_new, v_new = rollout.rand(), rollout.rand()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        began = time.perf_counter()
        start.record()
        for cache in caches:
            cache.commit(k_new, v_new)
        end.record()
        end.synchronize()
        torch.cuda.synchronize()
        landed_ms = (time.perf_counter() - began) * 1e3
        row = dict(
            commit_stream_ms=start.elapsed_time(end),
            commit_landed_ms=landed_ms,
            seconds=point,
            history=caches[0].history_len,
            history_kv_gib=args.layers * 2 * caches[0].history_len * args.heads * 128 * 2 / 2**30,
            first_step_ms=times[0],
            later_step_ms=sum(times[1:]) / max(1, len(times) - 1),
            fetched_mib_per_step=fetched / len(times) / 2**20,
            hit_rate=hits / max(1, requested),
            peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30,
        )
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows, resident


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--seconds", default="10,30,60,90")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per chunk")
    parser.add_argument("--chunks", type=int, default=8, help="fresh chunks timed in part 1")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    config = OmniMemConfig(block_size=128, top_k=32, sink_tokens=FRAME, local_tokens=CHUNK, backend="triton")
    env = environment()
    print(json.dumps(env), flush=True)
    layer = one_layer(config, args)
    print(json.dumps(layer), flush=True)
    rows, resident = model_rollout(config, args)
    print(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    print(f"one layer, 60 s ({layer['history']:,} tokens), bit-identical outputs: {layer['identical']}")
    print("| cache | first step ms | later steps ms | mean per step ms | steady (do_bench) ms |")
    print("|---|---|---|---|---|")
    for name in ("resident", "offloaded"):
        print(
            f"| {name} | {layer[f'{name}_first_ms']:.3f} | {layer[f'{name}_later_ms']:.3f} | "
            f"{layer[f'{name}_mean_ms']:.3f} | {layer['steady_ms'][name]:.3f} |"
        )
    ratio = layer["offloaded_mean_ms"] / layer["resident_mean_ms"]
    print(
        f"offloaded / resident per step: {ratio:.2f}x; host reads {layer['fetched_mib_per_step']:.1f} MiB "
        f"per step, hit rate {layer['hit_rate']:.1%}"
    )
    print(f"\n{args.layers} layers, offloaded; {resident}")
    columns = ["video", "history tokens", "KV GiB", "first step ms", "later steps ms"]
    columns += ["host MiB/step", "hit rate", "peak GPU GiB", "commit ms (compute stream)", "commit landed ms"]
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    for r in rows:
        cells = [f"{r['seconds']:g} s", f"{r['history']:,}", f"{r['history_kv_gib']:.1f}"]
        cells += [f"{r['first_step_ms']:.2f}", f"{r['later_step_ms']:.2f}"]
        cells += [f"{r['fetched_mib_per_step']:.1f}", f"{r['hit_rate']:.1%}", f"{r['peak_gpu_gib']:.2f}"]
        cells += [f"{r['commit_stream_ms']:.1f}", f"{r['commit_landed_ms']:.1f}"]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(env=env, layer=layer, rows=rows, resident=resident), fh, indent=1)


if __name__ == "__main__":
    main()
