"""Each long-video codebase's own attention against omnimem's full range, one step at 60 s (GPU).

For every codebase omnimem serves (docs/integration.md), a model of its real shapes (random
bf16 weights, ``wan_block.WanBlock``; text encoder and VAE stubbed: random text tokens, no
decoding) runs one generation step the way that codebase's loop does, with 60 s of history
(random keys and values, block sums as commits leave them), twice per layer: with the
attention the codebase itself runs (SDPA over the tokens it keeps, built the way it builds them)
and with omnimem (``OmniMemCache.attend_at``, what ``patch_causal_wan`` calls; the
``wan2.1-1.3b`` preset: ``top_k`` 32 blocks of 128, a one-frame sink, a one-chunk window).

- **Self-Forcing** (and Krea's ``CausalInferencePipeline``): 3-frame chunks, 4 denoising passes
  + the clean pass; their attention: the last 32,760 tokens (21 frames) of the cache, a slice.
- **CausVid**: the same loop; their attention: dense over the whole cache.
- **LongLive** (Wan2.1-1.3B): the same loop; their attention: a copy of a 3-frame sink and a
  12-frame window with the chunk (their defaults).
- **LongLive-2.0** (Wan2.2-TI2V-5B: dim 3072, 24 heads, MLP 14336; 880 tokens a latent frame at
  704x1280, 6 latent frames a second): 8-frame chunks, 4 sampling steps + the clean pass; their
  attention: an 8-frame sink and a 32-frame window (``configs/inference.yaml``), a copy.
- **Rolling Forcing**: one step is a window of 5 blocks of 3 frames (one per denoising step)
  attended in one call, then its first block, clean, again at the same start
  (``updating_cache``); their attention: the anchor block, a working cache and the window,
  together 21 frames (``max_attention_size``), a copy each call.

Krea Realtime's streaming server is not here: it re-encodes a window at window-relative
positions every block, so it keeps no history to retrieve from (omnimem refuses it,
docs/integration.md).

    python benchmarks/codebases_gpu.py [--layers 10] [--reps 2] [--only NAME ...] [--json out.json]
    python benchmarks/codebases_gpu.py --smoke    # CPU: a tiny model, checks the script runs
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from omnimem import OmniMemCache, OmniMemConfig

sys.path.insert(0, str(Path(__file__).parent))
from self_forcing_rollout_gpu import peak_gib, per_chunk_ms
from wan_block import WanBlock, rope_tables


@dataclasses.dataclass(frozen=True)
class Codebase:
    """One codebase's step: model shape, chunk, passes, and the tokens its own attention keeps."""

    model: tuple[int, int, int]  # dim, heads, MLP width
    frame: int  # tokens a latent frame
    fps: int  # latent frames a second
    chunk_frames: int  # frames a call generates
    passes: int  # forwards a step (denoising passes + the clean pass)
    sink_frames: int = 0  # their kept first frames (0: none)
    window_frames: int | None = None  # their kept last frames, the chunk included (None: all)
    copy: bool = False  # they attend a copy (sink + window concatenated) instead of a slice
    update_frames: int = 0  # Rolling Forcing: the clean first block again, at the same start


WAN_1_3B, WAN_5B = (1536, 12, 8960), (3072, 24, 14336)
CODEBASES = {
    "Self-Forcing": Codebase(WAN_1_3B, 1560, 4, 3, 5, window_frames=21),
    "CausVid": Codebase(WAN_1_3B, 1560, 4, 3, 5),
    "LongLive": Codebase(WAN_1_3B, 1560, 4, 3, 5, sink_frames=3, window_frames=12, copy=True),
    "LongLive-2.0": Codebase(WAN_5B, 880, 6, 8, 5, sink_frames=8, window_frames=32, copy=True),
    "Rolling Forcing": Codebase(
        WAN_1_3B, 1560, 4, 15, 1, sink_frames=3, window_frames=18, copy=True, update_frames=3
    ),
}


def their_attention(cache: OmniMemCache, spec: Codebase, start: int):
    """SDPA over what the codebase keeps: ``[0, sink) + [end - window, end)`` of its cache (the
    chunk written at ``start`` first), as a slice or a fresh copy like theirs."""

    def attention(q, k, v):
        end = start + q.shape[1]
        cache.k[:, :, start:end], cache.v[:, :, start:end] = k.transpose(1, 2), v.transpose(1, 2)
        sink = spec.sink_frames * spec.frame
        first = 0 if spec.window_frames is None else max(0, end - spec.window_frames * spec.frame)
        if first <= sink:
            keys, values = cache.k[:, :, :end], cache.v[:, :, :end]
        elif spec.copy:
            keys = torch.cat([cache.k[:, :, :sink], cache.k[:, :, first:end]], dim=2)
            values = torch.cat([cache.v[:, :, :sink], cache.v[:, :, first:end]], dim=2)
        else:  # a slice of their rolling buffer (no sink)
            keys, values = cache.k[:, :, first:end], cache.v[:, :, first:end]
        return F.scaled_dot_product_attention(q.transpose(1, 2), keys, values).transpose(1, 2)

    return attention


def omnimem_attention(cache: OmniMemCache, start: int):
    return lambda q, k, v: cache.attend_at(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), start=start
    ).transpose(1, 2)


def measure(name: str, spec: Codebase, args, device, dtype) -> dict:
    """One step at 60 s of history, their attention then omnimem's, on ``args.layers`` layers."""
    if args.smoke:
        spec = dataclasses.replace(spec, model=(32, 2, 64), frame=6)
        blocks = [WanBlock(32, 2, 64) for _ in range(args.layers)]
        config = OmniMemConfig(block_size=4, top_k=2, sink_tokens=spec.frame, local_tokens=3 * spec.frame,
                               backend="gather")  # fmt: skip
        history_frames, text = 4 * spec.chunk_frames, 8
    else:
        blocks = [WanBlock(*spec.model).to(device, dtype) for _ in range(args.layers)]
        config = OmniMemConfig.preset("wan2.1-1.3b", sink_tokens=spec.frame, local_tokens=3 * spec.frame)
        history_frames = 60 * spec.fps // spec.chunk_frames * spec.chunk_frames  # whole chunks
        text = 512
    heads, head_dim = blocks[0].heads, blocks[0].head_dim
    chunk_tokens = spec.chunk_frames * spec.frame
    history = history_frames * spec.frame
    caches = OmniMemCache.for_layers(
        args.layers, history + chunk_tokens, max_chunk_tokens=chunk_tokens, batch=1, num_kv_heads=heads,
        head_dim=head_dim, config=config, dtype=dtype, device=device, layout="blhd",
    )  # fmt: skip
    gen = torch.Generator(device=device).manual_seed(1)
    for cache in caches:  # random history, block sums as commits leave them
        for begin in range(0, history, 1 << 17):
            stop = min(history, begin + (1 << 17))
            cache.k[:, :, begin:stop].normal_(generator=gen)
            cache.v[:, :, begin:stop].normal_(generator=gen)
        cache._refresh_block_sums(0, history)
        cache.history_len = history
    dim = blocks[0].heads * head_dim
    inputs = {
        n: torch.randn(1, n * spec.frame, dim, device=device, dtype=dtype, generator=gen)
        for n in {spec.chunk_frames, spec.update_frames} - {0}
    }
    e = 0.1 * torch.randn(1, 6, dim, device=device, dtype=dtype, generator=gen)
    context = torch.randn(1, text, dim, device=device, dtype=dtype, generator=gen)
    calls = [spec.chunk_frames] * spec.passes + ([spec.update_frames] if spec.update_frames else [])

    def step(attention_for) -> None:
        with torch.no_grad():
            for frames in calls:  # every forward of the step at the chunk's start
                x = inputs[frames]
                rope = rope_tables(torch.arange(history, history + x.shape[1], device=device), head_dim)
                for cache, block in zip(caches, blocks, strict=True):
                    x = block(x, e, context, rope, attention_for(cache, spec, history))

    row = dict(codebase=name, layers=args.layers, history_frames=history_frames, history=history,
               chunk_tokens=chunk_tokens, forwards=len(calls))  # fmt: skip
    sides = dict(theirs=their_attention, omnimem=lambda cache, _spec, start: omnimem_attention(cache, start))
    times: dict[str, list[float]] = {label: [] for label in sides}
    # Interleaved, theirs then omnimem each round (the first a warm-up), so that both sides see
    # the same clocks and allocator: one side timed after the other drifted by up to 35% on
    # 2026-12-07 (the same omnimem work 14.5 and 10.7 ms a layer in one run).
    for rep in range(args.reps + 1):
        for label, attention_for in sides.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            ms = per_chunk_ms(lambda a=attention_for: step(a), 1, warm_up=False)
            if rep:
                times[label].append(ms)
                row[f"{label}_peak_gib"] = peak_gib()
            for cache in caches:  # their writes past the history: forget them
                cache.rewind(history)
    for label, samples in times.items():
        row[f"{label}_ms"] = statistics.median(samples)
    row["omnimem_vs_theirs"] = row["omnimem_ms"] / row["theirs_ms"]
    caches.clear()  # free this codebase's history before the next one's
    blocks.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=list(CODEBASES), default=list(CODEBASES))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.smoke:
        device, dtype, args.layers, args.reps = torch.device("cpu"), torch.float32, 2, 1
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
    rows = []
    for name in args.only:
        row = measure(name, CODEBASES[name], args, device, dtype)
        print(json.dumps(row), flush=True)
        rows.append(row)
    report(rows, device.type == "cuda", f"{args.layers} layers", args.json)


def report(rows: list[dict], cuda: bool, what: str, json_path: str | None) -> None:
    """The table of rows per codebase (``error`` rows: failed), with device, versions and date,
    and the JSON (``their_models_gpu.py`` reports through this too)."""
    env = dict(
        device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
        triton=triton.__version__, date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    )  # fmt: skip
    print(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}; {what}")
    print(
        "| codebase | layers | history (frames) | theirs ms | omnimem ms | omnimem / theirs "
        "| peak GiB theirs / omnimem |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['codebase']} | failed | | | | | |")
            continue
        print(
            f"| {r['codebase']} | {r['layers']} | {r['history_frames']} | {r['theirs_ms']:.0f} "
            f"| {r['omnimem_ms']:.0f} | {r['omnimem_vs_theirs']:.2f}x "
            f"| {r['theirs_peak_gib']:.1f} / {r['omnimem_peak_gib']:.1f} |"
        )
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(dict(environment=env, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
