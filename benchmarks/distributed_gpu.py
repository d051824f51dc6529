"""Head-sharded OmniMem on 1 vs 2 GPUs (NCCL): one attention step per layer, and a history
that does not fit one GPU. Launch: ``torchrun --nproc-per-node 2 benchmarks/distributed_gpu.py``.

Per shape (wan-1.3b: 12 heads; wan-14b: 40 heads; D=128, bf16, chunk 4680 tokens, 60 s of
history, top_k 32, sink 1 frame, local 1 chunk, ``[B, L, H, D]`` caches):

- ``1 GPU``: rank 0 alone, a full-head ``OmniMemCache`` and ``cached_attention`` (a denoising
  step: chunk write + selection from block sums + attention);
- ``2 GPUs``: every rank its half of the heads (``sharded_cache``) and ``ulysses_attention``
  on its token half of the chunk (all_to_all in, attention, all_to_all out), and with
  ``pipeline=2`` (each rank's heads in two groups: one attends while the other's exchange is in
  flight); the all_to_all alone is timed too. Times are means over a fixed number of steps
  (ranks run in lockstep), CUDA events; the 2-GPU time is the slower rank's; the speed-up
  uses the faster of the two 2-GPU variants.

Then a wan-14b history too large for one GPU (``--big-history`` tokens, one layer) is created
on one GPU (expected: out of memory) and sharded over two, where one step runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import torch
import torch.distributed as dist
import triton

from omnimem import OmniMemCache, OmniMemConfig, cached_attention
from omnimem.distributed import _heads_to_tokens, _tokens_to_heads, sharded_cache, ulysses_attention

FRAME, CHUNK, DIM = 1560, 4680, 128


def cache_kwargs(config: OmniMemConfig) -> dict:
    """Every cache here: wan chunks, bf16, ``[B, L, H, D]`` storage on this rank's GPU."""
    return dict(
        max_chunk_tokens=CHUNK, batch=1, head_dim=DIM, config=config, dtype=torch.bfloat16, device="cuda",
        layout="blhd",
    )  # fmt: skip


def timed(fn, reps: int = 30, warmup: int = 5) -> float:
    """Mean ms per call of ``fn`` over ``reps`` calls (every rank calls this in lockstep)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def fill(cache: OmniMemCache, history: int, seed: int) -> OmniMemCache:
    """Put ``history`` random tokens in ``cache`` (block sums as commits would leave them)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for start in range(0, history, 1 << 18):  # fill in slices: no full-size temporaries
        stop = min(history, start + (1 << 18))
        cache.k[:, :, start:stop].normal_(generator=gen)
        cache.v[:, :, start:stop].normal_(generator=gen)
    cache._refresh_block_sums(0, history)
    cache.history_len = history
    return cache


def chunk_inputs(heads: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(
        torch.randn(1, CHUNK, heads, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
        for _ in range(3)
    )


def run_shape(heads: int, history: int, config: OmniMemConfig, rank: int, world: int) -> dict:
    row = dict(heads=heads, history=history)
    q, k, v = chunk_inputs(heads, 0)
    if rank == 0:
        full = fill(
            OmniMemCache(history, num_kv_heads=heads, **cache_kwargs(config)),
            history,
            seed=1,
        )  # fmt: skip
        torch.cuda.reset_peak_memory_stats()
        row["one_gpu_ms"] = timed(lambda: cached_attention(q, k, v, full))
        row["one_gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        del full
        torch.cuda.empty_cache()
    dist.barrier()
    cache = sharded_cache(history, num_kv_heads=heads, **cache_kwargs(config))
    fill(cache, history, seed=2 + rank)
    tokens = slice(rank * CHUNK // world, (rank + 1) * CHUNK // world)
    q_shard, k_shard, v_shard = (
        q[:, tokens].contiguous(),
        k[:, tokens].contiguous(),
        v[:, tokens].contiguous(),
    )
    torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    step_ms = timed(lambda: ulysses_attention(q_shard, k_shard, v_shard, cache))
    pipelined_ms = timed(lambda: ulysses_attention(q_shard, k_shard, v_shard, cache, pipeline=2))
    out_heads = torch.empty(1, CHUNK, heads // world, DIM, device="cuda", dtype=torch.bfloat16)

    def all_to_all_only():
        _tokens_to_heads(q_shard, k_shard, v_shard, world=world, group=None)
        _heads_to_tokens(out_heads, world, None)

    a2a_ms = timed(all_to_all_only)
    peak = torch.cuda.max_memory_allocated() / 2**30
    stats = torch.tensor([step_ms, pipelined_ms, a2a_ms, peak], device="cuda")
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    row["two_gpu_ms"], row["two_gpu_pipelined_ms"], row["all_to_all_ms"], row["two_gpu_peak_gib_per_gpu"] = (
        stats.tolist()
    )
    return row


def big_history(tokens: int, config: OmniMemConfig, rank: int, world: int) -> dict:
    heads = 40
    row = dict(heads=heads, history=tokens, kv_gib_total=2 * tokens * heads * DIM * 2 / 2**30)
    if rank == 0:
        try:
            OmniMemCache(tokens, num_kv_heads=heads, **cache_kwargs(config))
            row["one_gpu"] = "fits"
        except torch.OutOfMemoryError:
            row["one_gpu"] = "out of memory"
        torch.cuda.empty_cache()
    dist.barrier()
    cache = sharded_cache(tokens, num_kv_heads=heads, **cache_kwargs(config))
    cache._refresh_block_sums(0, tokens)  # zero history: finite, as unwritten space must be
    cache.history_len = tokens
    q, k, v = chunk_inputs(heads, 3)
    tokens_slice = slice(rank * CHUNK // world, (rank + 1) * CHUNK // world)
    shards = [x[:, tokens_slice].contiguous() for x in (q, k, v)]
    step = torch.tensor([timed(lambda: ulysses_attention(*shards, cache), reps=10, warmup=2)], device="cuda")
    dist.all_reduce(step, op=dist.ReduceOp.MAX)
    row["two_gpu_ms"] = step.item()
    row["two_gpu_peak_gib_per_gpu"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, default=237 * FRAME)
    parser.add_argument("--heads", type=int, nargs="+", default=[12, 40])
    parser.add_argument(
        "--big-history", type=int, default=8_000_000, help="0 skips the too-big-for-one-GPU run"
    )
    parser.add_argument("--eager", action="store_true", help="eager selection (compile=False)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = OmniMemConfig(
        block_size=128,
        top_k=32,
        sink_tokens=FRAME,
        local_tokens=CHUNK,
        backend="triton",
        compile=not args.eager,
    )
    rows = [run_shape(heads, args.history, config, rank, world) for heads in args.heads]
    big = big_history(args.big_history, config, rank, world) if args.big_history else None
    if rank == 0:
        env = dict(
            device=torch.cuda.get_device_name(), gpus=world, torch=torch.__version__,
            triton=triton.__version__, date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        )  # fmt: skip
        print(json.dumps(dict(env=env, rows=rows, big=big)))
        print(f"\n{env['device']} x{world}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
        print(
            "| "
            + " | ".join(
                (
                    "H",
                    "history",
                    "1 GPU ms",
                    "2 GPUs ms (step)",
                    "2 GPUs, pipeline=2 ms",
                    "all_to_all alone ms",
                    "speed-up",
                    "peak GiB 1 GPU",
                    "per GPU on 2",
                )
            )
            + " |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            best = min(r["two_gpu_ms"], r["two_gpu_pipelined_ms"])
            print(
                f"| {r['heads']} | {r['history']:,} | {r['one_gpu_ms']:.3f} | {r['two_gpu_ms']:.3f} | "
                f"{r['two_gpu_pipelined_ms']:.3f} | "
                f"{r['all_to_all_ms']:.3f} | {r['one_gpu_ms'] / best:.2f}x | "
                f"{r['one_gpu_peak_gib']:.1f} | {r['two_gpu_peak_gib_per_gpu']:.1f} |"
            )
        if big:
            print(
                f"\nwan-14b, one layer, {big['history']:,} history tokens "
                f"({big['kv_gib_total']:.0f} GiB of KV): "
                f"one GPU: {big['one_gpu']}; two GPUs: {big['two_gpu_ms']:.3f} ms per step, "
                f"{big['two_gpu_peak_gib_per_gpu']:.1f} GiB peak per GPU"
            )
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(dict(env=env, rows=rows, big=big), fh, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
