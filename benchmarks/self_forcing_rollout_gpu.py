"""One chunk of a Self-Forcing-shaped model at growing history: dense, truncation, omnimem (GPU).

A 30-layer Wan2.1-1.3B-shaped model (``wan_block.WanBlock.wan_1_3b()``: dim 1536, 12 heads,
FFN 8960, 512 text tokens; random bf16 weights) runs one chunk the way Self-Forcing's pipeline
does: 4 denoising passes and the clean pass, each a full forward at the chunk's start position
(chunks of 3 latent frames, 4,680 tokens). Self-attention, per layer:

- ``dense``: SDPA over the whole history plus the chunk;
- ``truncation``: SDPA over the last 32,760 tokens (their default window, ``local_attn_size=-1``);
- ``omnimem``: ``OmniMemCache.attend_at`` (what ``patch_causal_wan`` calls), preset
  ``wan2.1-1.3b`` (top_k 32, sink 1 frame, local 1 chunk), resident;
- ``omnimem offloaded``: the same with ``offload=True`` (history in pinned host memory), at the
  longest history only.

The history is random keys/values (selection is data-dependent, the work is not). Times per
chunk are medians over ``--reps`` chunks (CUDA events), with peak GPU memory.

With ``--kv-format fp8|int4`` only the quantized, offloaded omnimem cache runs (issue 36's
scale bar: 960 frames, 4 minutes, which bf16 cannot hold): its history is written chunk by
chunk through ``commit`` (quantized as a real rollout writes it), then one chunk is timed; the
table gives its time, peak GPU memory and the host bytes of the quantized history.

    python benchmarks/self_forcing_rollout_gpu.py [--frames 237 60 18] [--json out.json]
    python benchmarks/self_forcing_rollout_gpu.py --kv-format int4 --frames 960
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from omnimem import OmniMemCache, OmniMemConfig
from omnimem.gated.wan import wan_rope_freqs
from omnimem.positions import RelativeTime, wan_time_table

sys.path.insert(0, str(Path(__file__).parent))
from wan_block import WanBlock, rope_tables

FRAME, CHUNK, LAYERS, TEXT, WINDOW = 1560, 3 * 1560, 30, 512, 32760


def per_chunk_ms(run, reps: int, warm_up: bool = True) -> float:
    if warm_up:
        run()  # kernels compiled, caches touched
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            run()
            times.append(1e3 * (time.perf_counter() - begin))
    return statistics.median(times)


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def quantized_offloaded(args, blocks, frames: int, capacity: int, kwargs: dict, device, dtype) -> None:
    """One chunk at ``frames`` of history with every layer's cache offloaded in ``kv_format``
    (``--kernel gluon`` / ``triton``: on Hopper that kernel reads it, whatever ``auto`` would
    choose)."""
    if args.kernel != "auto":
        from omnimem.backends import quantized_attention

        chosen = {args.kv_format} if args.kernel == "gluon" else set()
        quantized_attention.GLUON_FORMATS = frozenset(chosen)
    begin = time.perf_counter()
    caches = OmniMemCache.for_layers(LAYERS, capacity, offload=True, kv_format=args.kv_format, **kwargs)
    allocated = time.perf_counter() - begin
    heads, head_dim = kwargs["num_kv_heads"], kwargs["head_dim"]
    gen = torch.Generator(device=device).manual_seed(1)
    begin = time.perf_counter()
    for cache in caches:  # the history as a rollout writes it: one commit per chunk
        for _ in range(0, frames * FRAME, CHUNK):
            k, v = (
                torch.randn(1, heads, CHUNK, head_dim, device=device, dtype=dtype, generator=gen)
                for _ in "kv"
            )
            cache.commit(k, v)
    if device.type == "cuda":
        torch.cuda.synchronize()
    written = time.perf_counter() - begin
    history = caches[0].history_len
    x = torch.randn(1, CHUNK, heads * head_dim, device=device, dtype=dtype, generator=gen)
    e = 0.1 * torch.randn(1, 6, x.shape[-1], device=device, dtype=dtype, generator=gen)
    context = torch.randn(1, TEXT, x.shape[-1], device=device, dtype=dtype, generator=gen)
    rope = rope_tables(torch.arange(history, history + CHUNK, device=device), head_dim)

    def chunk() -> None:
        with torch.no_grad():
            for _ in range(5):  # 4 denoising passes + the clean pass, all at `history`
                out = x
                for layer, block in enumerate(blocks):
                    attention = lambda q, k, v, c=caches[layer]: c.attend_at(  # noqa: E731
                        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), start=history
                    ).transpose(1, 2)
                    out = block(out, e, context, rope, attention)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ms = per_chunk_ms(chunk, args.reps)
    if args.profile:  # where a chunk's time goes: GPU kernels, and the host's share
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            chunk()
            if device.type == "cuda":
                torch.cuda.synchronize()
        for key in ("cuda_time_total", "cpu_time_total")[device.type != "cuda" :]:
            print(prof.key_averages().table(sort_by=key, row_limit=15), flush=True)
    stats = caches[0].offload_stats
    row = dict(
        kv_format=args.kv_format, kernel=args.kernel, frames=history // FRAME, history=history, ms=ms,
        peak_gib=peak_gib(),
        host_gib=sum(c._offload.store.nbytes for c in caches) / 2**30, allocate_s=allocated, write_s=written,
        layer0_hit_rate=stats.hit_rate, layer0_fetched_mib=stats.fetched_bytes / 2**20,
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
        triton=triton.__version__, date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    )  # fmt: skip
    print(json.dumps(row), flush=True)
    print(
        f"omnimem offloaded, {args.kv_format}, {row['frames']} frames ({history} tokens): {ms:.0f} ms/chunk, "
        f"{row['peak_gib']:.1f} GiB peak GPU memory, {row['host_gib']:.1f} GiB host (quantized history)"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(row, fh, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[237, 60, 18], help="history, latent frames")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-offload", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on CPU: checks the script runs")
    parser.add_argument("--kv-format", default=None, help="fp8 or int4: the quantized offloaded cache alone")
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", action="store_true", help="with --kv-format: profile one chunk")
    parser.add_argument(
        "--kernel",
        choices=("auto", "gluon", "triton"),
        default="auto",
        help="with --kv-format: which Hopper kernel reads it (triton: the Triton-language one)",
    )
    parser.add_argument(
        "--relative-only", action="store_true", help="omnimem with absolute and relative positions only"
    )
    args = parser.parse_args()
    global FRAME, CHUNK, LAYERS, TEXT, WINDOW
    torch.manual_seed(0)
    if args.smoke:
        FRAME, CHUNK, LAYERS, TEXT, WINDOW = 12, 36, 2, 8, 48
        device, dtype, args.frames, args.reps = torch.device("cpu"), torch.float32, [10, 4], 1
        blocks = [WanBlock(32, 2, 64) for _ in range(LAYERS)]
        config = OmniMemConfig(block_size=4, top_k=2, sink_tokens=FRAME, local_tokens=CHUNK, backend="gather")
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        blocks = [WanBlock.wan_1_3b().to(device, dtype) for _ in range(LAYERS)]
        config = OmniMemConfig.preset("wan2.1-1.3b")
    heads, head_dim = blocks[0].heads, blocks[0].head_dim
    frames = sorted(args.frames, reverse=True)
    capacity = (frames[0] + 3) * FRAME
    kwargs = dict(
        max_chunk_tokens=CHUNK, batch=1, num_kv_heads=heads, head_dim=head_dim, config=config,
        dtype=dtype, device=device, layout="blhd",
    )  # fmt: skip
    if args.kv_format:
        quantized_offloaded(args, blocks, frames[0], capacity, kwargs, device, dtype)
        return
    caches = OmniMemCache.for_layers(LAYERS, capacity, **kwargs)
    gen = torch.Generator(device=device).manual_seed(1)
    for cache in caches:  # random history, block sums as commits leave them
        for begin in range(0, frames[0] * FRAME, 1 << 17):
            stop = min(frames[0] * FRAME, begin + (1 << 17))
            cache.k[:, :, begin:stop].normal_(generator=gen)
            cache.v[:, :, begin:stop].normal_(generator=gen)
        cache._refresh_block_sums(0, frames[0] * FRAME)
        cache.history_len = frames[0] * FRAME
    x = torch.randn(1, CHUNK, blocks[0].heads * head_dim, device=device, dtype=dtype, generator=gen)
    e = 0.1 * torch.randn(1, 6, x.shape[-1], device=device, dtype=dtype, generator=gen)
    context = torch.randn(1, TEXT, x.shape[-1], device=device, dtype=dtype, generator=gen)

    def chunk(attention_for_layer, start: int) -> None:
        rope = rope_tables(torch.arange(start, start + CHUNK, device=device), head_dim)
        with torch.no_grad():
            for _ in range(5):  # 4 denoising passes + the clean pass, all at `start`
                out = x
                for layer, block in enumerate(blocks):
                    out = block(out, e, context, rope, attention_for_layer(layer, start))

    def omnimem(layer, start):
        cache = caches[layer]
        return lambda q, k, v: cache.attend_at(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), start=start
        ).transpose(1, 2)

    def sdpa(window: int | None, sink: int = 0):
        def attention_for_layer(layer, start):
            cache = caches[layer]

            def attention(q, k, v):  # write the chunk at `start`, attend [0, sink) + [first, start + L)
                end = start + q.shape[1]
                cache.k[:, :, start:end] = k.transpose(1, 2)
                cache.v[:, :, start:end] = v.transpose(1, 2)
                first = 0 if window is None else max(0, end - window)
                keys, values = cache.k[:, :, first:end], cache.v[:, :, first:end]
                if sink and first > sink:  # LongLive's sink + window: the copy it attends
                    keys = torch.cat([cache.k[:, :, :sink], keys], dim=2)
                    values = torch.cat([cache.v[:, :, :sink], values], dim=2)
                out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values)
                return out.transpose(1, 2)

            return attention

        return attention_for_layer

    time = RelativeTime(wan_time_table(wan_rope_freqs(head_dim, positions=1024)), FRAME).to(device)

    def relative(layer, start):  # omnimem with positions="relative" (omnimem.positions)
        def attention(q, k, v):
            caches[layer].positions = time
            try:
                return omnimem(layer, start)(q, k, v)
            finally:
                caches[layer].positions = None

        return attention

    methods = {"dense": sdpa(None), "truncation (32,760 tokens)": sdpa(WINDOW), "omnimem": omnimem,
               "omnimem, relative positions": relative,
               # LongLive's defaults: a 3-frame sink and a 12-frame window, copied per call
               "sink + window (LongLive, 3 + 12 frames)": sdpa(12 * FRAME, sink=3 * FRAME)}  # fmt: skip
    if args.relative_only:
        methods = {name: methods[name] for name in ("omnimem", "omnimem, relative positions")}
    rows = []
    for history_frames in frames:
        history = history_frames * FRAME
        for cache in caches:
            cache.rewind(history)
        row = dict(frames=history_frames, history=history)
        for name, method in methods.items():
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            row[name] = per_chunk_ms(lambda m=method, s=history: chunk(m, s), args.reps)
            row[f"{name} peak GiB"] = peak_gib()
            for cache in caches:  # dense/truncation wrote their chunk past the history: forget it
                cache.rewind(history)
        print(json.dumps(row), flush=True)
        rows.append(row)
    offloaded = None
    if not args.no_offload:
        history = frames[0] * FRAME
        states = [dict(k=c.k[:, :, :history].clone(), v=c.v[:, :, :history].clone()) for c in caches[:1]]
        del caches[:]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        try:
            caches.extend(OmniMemCache.for_layers(LAYERS, capacity, offload=True, **kwargs))
        except ValueError as err:  # not enough host memory: say so and stop here
            print(f"offloaded caches skipped: {err}")
        else:
            for cache in caches:  # one random history for every layer (selection differs per q)
                cache.load_state_dict(dict(k=states[0]["k"], v=states[0]["v"], history_len=history))
            del states
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            ms = per_chunk_ms(lambda: chunk(omnimem, history), args.reps)
            offloaded = dict(frames=frames[0], history=history, ms=ms, peak_gib=peak_gib())
            print(json.dumps(dict(offloaded=offloaded)), flush=True)
    env = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        triton=triton.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    )
    print(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    print("ms per chunk (4 denoising passes + clean pass, 30 layers); peak GiB")
    for r in rows if args.relative_only else ():
        ms = r["omnimem, relative positions"]
        print(
            f"{r['frames']} frames: omnimem {r['omnimem']:.0f} ms, "
            f"relative {ms:.0f} ms ({ms / r['omnimem']:.2f}x)"
        )
    if not args.relative_only:
        print(
            "| history frames | dense | truncation (32,760) | omnimem | omnimem / truncation "
            "| peak GiB omnimem |"
        )
        print("|---|---|---|---|---|---|")
        for r in rows:
            truncation = r["truncation (32,760 tokens)"]
            cells = (r["frames"], f"{r['dense']:.0f}", f"{truncation:.0f}", f"{r['omnimem']:.0f}")
            print(
                "| "
                + " | ".join(map(str, cells))
                + f" | {r['omnimem'] / truncation:.2f}x | {r['omnimem peak GiB']:.1f} |"
            )
        for r in rows:
            longlive = r["sink + window (LongLive, 3 + 12 frames)"]
            ratio = r["omnimem"] / longlive
            print(
                f"{r['frames']} frames: LongLive's sink + window {longlive:.0f} ms; omnimem / it {ratio:.2f}x"
            )
            ms = r["omnimem, relative positions"]
            print(
                f"{r['frames']} frames: omnimem with relative positions {ms:.0f} ms "
                f"({ms / r['omnimem']:.2f}x)"
            )
    if offloaded:
        print(
            f"omnimem offloaded at {offloaded['frames']} frames: {offloaded['ms']:.0f} ms per chunk, "
            f"{offloaded['peak_gib']:.1f} GiB peak GPU memory"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(env=env, rows=rows, offloaded=offloaded), fh, indent=1)


if __name__ == "__main__":
    main()
