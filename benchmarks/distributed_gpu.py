"""Head-sharded OmniMem on 1 vs 2 GPUs (NCCL): the attention step, a whole Wan block, a history
that does not fit one GPU. Launch (NVLink multicast off, as the machine requires):

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 benchmarks/distributed_gpu.py --json out.json

Attention step, per head count (wan-1.3b: 12 heads; wan-14b: 40; D=128, bf16, chunk 4680
tokens, 60 s of history, top_k 32, sink 1 frame, local 1 chunk, ``[B, L, H, D]`` caches):
``1 GPU`` is rank 0 alone with a full-head ``OmniMemCache`` and ``cached_attention`` (a
denoising step: chunk write + selection from block sums + attention); ``2 GPUs`` is every rank
with its half of the heads (``sharded_cache``) and ``ulysses_attention`` on its token half of
the chunk, plain and with ``pipeline=2/4``; ``all_to_all`` is the two exchanges alone. Each is
timed eagerly (host launch overhead included) and replayed from a CUDA graph (GPU time).

Whole block: ``wan_block.WanBlock.wan_14b()`` (random bf16 weights; self-attention through
omnimem, cross-attention to 512 text tokens, MLP) on the full chunk on one GPU vs its token half
per rank under Ulysses on two (the xDiT layout: projections and MLP token-sharded).

Times are medians of per-call CUDA-event times over a fixed number of calls (ranks run in
lockstep, so ``do_bench``'s adaptive repeat counts, which could differ between ranks, are not
used); the 2-GPU time is the slower rank's. ``--profile DIR`` writes a torch profiler table and
trace of one eager step per variant and rank, and prints where host and GPU time went.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import triton

from omnimem import OmniMemCache, OmniMemConfig, cached_attention
from omnimem.distributed import _layout_fn, _pack_parts, _unpack_parts, sharded_cache, ulysses_attention

sys.path.insert(0, str(Path(__file__).parent))
from wan_block import WanBlock, rope_tables

FRAME, CHUNK, DIM, TEXT = 1560, 4680, 128, 512


def say(*args: object) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)


def cache_kwargs(config: OmniMemConfig, cuda_graphs: bool = False) -> dict:
    """Every cache here: wan chunks, bf16, ``[B, L, H, D]`` storage on this rank's GPU."""
    return dict(
        max_chunk_tokens=CHUNK, batch=1, head_dim=DIM, config=config, dtype=torch.bfloat16, device="cuda",
        layout="blhd", cuda_graphs=cuda_graphs,
    )  # fmt: skip


def timed(fn: Callable[[], object], reps: int = 40, warmup: int = 5) -> float:
    """Median ms per call of ``fn`` (every rank calls this in lockstep)."""
    for _ in range(warmup):
        fn()
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in range(reps)]
    torch.cuda.synchronize()
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def host_ms(fn: Callable[[], object], reps: int = 20) -> float:
    """Host (Python + launch) ms per call when the GPU keeps up: wall time of ``reps`` calls with
    no synchronisation inside, divided by ``reps``."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e3 * elapsed / reps


def graphed(fn: Callable[[], object], group_ok: bool = True) -> Callable[[], object] | None:
    """``fn`` captured in a CUDA graph (NCCL calls included), or None where capture failed on
    any rank (every rank then skips it: the ranks must stay in lockstep)."""
    graph, ok = torch.cuda.CUDAGraph(), 1
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            fn()
        torch.cuda.synchronize()
    except Exception as err:
        first_line = str(err).splitlines()[0][:200]
        print(f"rank {dist.get_rank()}: CUDA graph capture failed: {first_line}", flush=True)
        ok = 0
    if group_ok:
        flag = torch.tensor([ok], device="cuda")
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = int(flag.item())
    return graph.replay if ok else None


def slowest(*values: float | None) -> list[float | None]:
    """Per value, the maximum over ranks (None stays None)."""
    stats = torch.tensor([float("nan") if x is None else x for x in values], dtype=torch.float64).cuda()
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    return [None if x != x else x for x in stats.tolist()]


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


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return scale * torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)


def token_shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    tokens = x.shape[1] // world
    return x[:, rank * tokens : (rank + 1) * tokens].contiguous()


def profile_step(name: str, fn: Callable[[], object], out_dir: str | None) -> dict:
    """One eager step under the torch profiler on every rank: host ms, GPU kernel ms, top ops."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_ms = sum(e.self_device_time_total for e in events) / 3e3
    rank = dist.get_rank()
    if out_dir:
        with open(os.path.join(out_dir, f"profile_rank{rank}.txt"), "a") as fh:
            fh.write(f"\n== {name} (3 steps) ==\n")
            fh.write(events.table(sort_by="self_cpu_time_total", row_limit=18))
            fh.write(events.table(sort_by="self_device_time_total", row_limit=12))
        if rank == 0 and name in ("2 GPUs", "2 GPUs, pipeline=2"):
            label = name.replace(" ", "").replace(",", "_").replace("=", "")
            prof.export_chrome_trace(os.path.join(out_dir, f"trace_{label}.json"))
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:4]
    return dict(
        gpu_kernel_ms=gpu_ms,
        top_gpu=[(e.key[:60], round(e.self_device_time_total / 3e3, 3)) for e in top],
    )


def one_gpu_attention(heads: int, history: int, config: OmniMemConfig, qkv: tuple, args) -> dict:
    """Rank 0 alone: the full-head step (the other rank waits at a barrier)."""
    full = fill(OmniMemCache(history, num_kv_heads=heads, **cache_kwargs(config)), history, seed=1)

    def one():
        return cached_attention(*qkv, full)

    replay = graphed(one, group_ok=False)
    row = {"1 GPU": timed(one), "1 GPU host": host_ms(one), "1 GPU graph": timed(replay) if replay else None}
    row["1 GPU do_bench"] = triton.testing.do_bench(one)  # cross-check: L2 flushed between calls
    del full, replay
    full = fill(OmniMemCache(history, num_kv_heads=heads, **cache_kwargs(config, True)), history, seed=1)
    name = "1 GPU, cuda_graphs"
    row[name], row[f"{name} host"], row[f"{name} graph"] = timed(one), host_ms(one), None
    if args.profile:
        row["1 GPU profile"] = profile_step_local(one)
    return row


def attention_rows(heads: int, history: int, config: OmniMemConfig, args) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    row: dict = dict(heads=heads, history=history)
    q, k, v = (randn(1, CHUNK, heads, DIM, seed=i) for i in range(3))
    variants: dict[str, Callable[[], object]] = {}
    if rank == 0:
        row.update(one_gpu_attention(heads, history, config, (q, k, v), args))
    dist.barrier()
    cache = fill(sharded_cache(history, num_kv_heads=heads, **cache_kwargs(config)), history, seed=2 + rank)
    replaying = fill(
        sharded_cache(history, num_kv_heads=heads, **cache_kwargs(config, True)), history, seed=2 + rank
    )
    shards = [token_shard(x, rank, world) for x in (q, k, v)]
    pack, unpack = _layout_fn(_pack_parts, q, cache), _layout_fn(_unpack_parts, q, cache)
    returned = torch.empty(
        1, world, 1, CHUNK // world, heads // world, DIM, device="cuda", dtype=torch.bfloat16
    )
    heads_layout = [randn(1, CHUNK, heads // world, DIM, seed=40 + i) for i in range(3)]

    def exchange():
        """What ulysses_attention adds to the rank's attention: pack, two all_to_alls, unpack."""
        send = pack(*shards, world, 1)
        dist.all_to_all_single(torch.empty_like(send[0]), send[0])
        dist.all_to_all_single(returned[0], torch.empty_like(returned[0]))
        return unpack(returned)

    variants["rank's attention alone"] = lambda: cached_attention(*heads_layout, cache)
    variants["all_to_all"] = exchange
    kv_per_rank = heads // world
    for pipeline in (1, 2, 4):
        if kv_per_rank % pipeline == 0 and (pipeline == 1 or kv_per_rank // pipeline >= 3):
            name = "2 GPUs" if pipeline == 1 else f"2 GPUs, pipeline={pipeline}"
            variants[name] = lambda p=pipeline: ulysses_attention(*shards, cache, pipeline=p)
            if pipeline <= 2:  # the same through a cache that replays its own graphs
                variants[f"{name}, cuda_graphs"] = lambda p=pipeline: ulysses_attention(
                    *shards, replaying, pipeline=p
                )
    for name, fn in variants.items():
        eager = timed(fn)
        host = host_ms(fn)
        replay = graphed(fn)
        graph = timed(replay) if replay else None
        row[name], row[f"{name} host"], row[f"{name} graph"] = slowest(eager, host, graph)
        if args.profile and name.startswith(("2 GPUs", "1 GPU")):
            prof = profile_step(name, fn, args.profile)
            row[f"{name} profile"] = prof
        del replay
    return row


def profile_step_local(fn: Callable[[], object]) -> dict:
    """Rank 0's one-GPU step under the profiler (no collectives: the other rank waits)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    return dict(gpu_kernel_ms=sum(e.self_device_time_total for e in events) / 3e3)


def one_gpu_block(block: WanBlock, inputs: tuple, history: int, config: OmniMemConfig) -> dict:
    """Rank 0 alone: the block on the whole chunk with a full-head cache."""
    full = fill(OmniMemCache(history, num_kv_heads=block.heads, **cache_kwargs(config)), history, seed=1)

    def one():
        return block(*inputs, lambda q, k, v: cached_attention(q, k, v, full))

    replay = graphed(one, group_ok=False)
    row = {
        "1 GPU": timed(one, reps=20),
        "1 GPU graph": timed(replay, reps=20) if replay else None,
        "1 GPU without self-attention": timed(lambda: block(*inputs, lambda q, k, v: q), reps=20),
    }
    del full, replay
    full = fill(
        OmniMemCache(history, num_kv_heads=block.heads, **cache_kwargs(config, True)), history, seed=1
    )
    row["1 GPU, cuda_graphs"], row["1 GPU, cuda_graphs graph"] = timed(one, reps=20), None
    return row


BLOCKS = {"wan-14b": WanBlock.wan_14b, "wan-1.3b": WanBlock.wan_1_3b}


def block_rows(model: str, history: int, config: OmniMemConfig) -> dict:
    """One Wan block per chunk: one GPU vs Ulysses on two (plain and pipelined)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    block = BLOCKS[model]().to(device="cuda", dtype=torch.bfloat16)
    heads, dim, ffn = block.heads, block.heads * block.head_dim, block.ffn[0].out_features
    x = randn(1, CHUNK, dim, seed=10)
    e = randn(1, 6, dim, seed=11, scale=0.1)
    context = randn(1, TEXT, dim, seed=12)
    rope = rope_tables(torch.arange(history, history + CHUNK, device="cuda"), DIM)
    row: dict = dict(model=model, heads=heads, history=history)
    flops = 2 * CHUNK * (4 * dim * dim + 2 * dim * dim + 2 * dim * ffn) + 4 * CHUNK * TEXT * dim
    row["dense GFLOP"] = flops / 1e9
    with torch.no_grad():
        if rank == 0:
            row.update(one_gpu_block(block, (x, e, context, rope), history, config))
        dist.barrier()
        caches = {
            graphs: fill(
                sharded_cache(history, num_kv_heads=heads, **cache_kwargs(config, graphs)),
                history,
                seed=2 + rank,
            )
            for graphs in (False, True)
        }
        xs, ropes = token_shard(x, rank, world), rope[rank * CHUNK // world : (rank + 1) * CHUNK // world]
        for pipeline, graphs in ((1, False), (2, False), (1, True), (2, True)):
            name = ("2 GPUs" if pipeline == 1 else f"2 GPUs, pipeline={pipeline}") + (
                ", cuda_graphs" if graphs else ""
            )

            def step(p=pipeline, cache=caches[graphs]):
                def attention(q, k, v):
                    return ulysses_attention(q, k, v, cache, pipeline=p)

                return block(xs, e, context, ropes, attention)

            eager = timed(step, reps=20)
            replay = graphed(step)
            graph = timed(replay, reps=20) if replay else None
            row[name], row[f"{name} graph"] = slowest(eager, graph)
            del replay
        no_attention = lambda: block(xs, e, context, ropes, lambda q, k, v: q)  # noqa: E731
        (row["2 GPUs without self-attention"],) = slowest(timed(no_attention, reps=20))
    return row


def big_history(tokens: int, config: OmniMemConfig) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
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
    shards = [token_shard(randn(1, CHUNK, heads, DIM, seed=20 + i), rank, world) for i in range(3)]
    (row["two_gpu_ms"],) = slowest(timed(lambda: ulysses_attention(*shards, cache), reps=10, warmup=2))
    row["two_gpu_peak_gib_per_gpu"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def exchange_probe(heads: int, history: int, config: OmniMemConfig) -> dict:
    """What the exchange costs and how it shares the GPU: NCCL all_to_all vs copy-engine peer
    copies (symmetric memory) of the same bytes, alone and beside a rank's attention step."""
    import torch.distributed._symmetric_memory as symm_mem

    rank, world = dist.get_rank(), dist.get_world_size()
    per_peer = 3 * (CHUNK // world) * (heads // world) * DIM  # q, k, v elements one rank sends one peer
    row: dict = dict(heads=heads, mib_per_peer=per_peer * 2 / 2**20)
    send = randn(world * per_peer, seed=30 + rank)
    recv = torch.empty_like(send)
    buf = symm_mem.empty(world * per_peer, dtype=torch.bfloat16, device="cuda")
    handle = symm_mem.rendezvous(buf, dist.group.WORLD)
    peers = [handle.get_buffer(p, (world * per_peer,), torch.bfloat16) for p in range(world)]

    def nccl():
        dist.all_to_all_single(recv, send)

    def copy_engine():
        handle.barrier(channel=0)  # every peer is done with what it received last time
        for p in range(world):
            if p != rank:
                peers[p][rank * per_peer : (rank + 1) * per_peer].copy_(
                    send[p * per_peer : (p + 1) * per_peer]
                )
        handle.barrier(channel=1)  # every peer's copies into this rank's buffer are done

    cache = fill(sharded_cache(history, num_kv_heads=heads, **cache_kwargs(config)), history, seed=2 + rank)
    qh, kh, vh = (randn(1, CHUNK, heads // world, DIM, seed=40 + i) for i in range(3))
    attention = graphed(lambda: cached_attention(qh, kh, vh, cache), group_ok=False)
    side, main = torch.cuda.Stream(), torch.cuda.current_stream()

    def beside(fn):
        def both():
            side.wait_stream(main)
            with torch.cuda.stream(side):
                fn()
            attention()
            main.wait_stream(side)

        return both

    values = [timed(fn) for fn in (nccl, copy_engine, attention, beside(nccl), beside(copy_engine))]
    names = [
        "nccl all_to_all", "copy engine + 2 barriers", "attention (graph)", "attention + nccl",
        "attention + copy engine",
    ]  # fmt: skip
    row.update(zip(names, slowest(*values), strict=True))
    return row


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def speedup(base: float | None, x: float | None) -> str:
    return "-" if base is None or x is None else f"{base / x:.2f}x"


def report(env: dict, rows: list[dict], blocks: list[dict], big: dict | None) -> None:
    say(f"\n{env['device']} x{env['gpus']}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    say("attention step, ms (eager / CUDA graph; host = Python+launch ms per call)")
    say("| H | variant | eager | host | graph | speed-up eager | speed-up graph |")
    say("|---|---|---|---|---|---|---|")
    for r in rows:
        names = (
            "1 GPU",
            "1 GPU, cuda_graphs",
            "2 GPUs",
            "2 GPUs, pipeline=2",
            "2 GPUs, pipeline=4",
            "2 GPUs, cuda_graphs",
            "2 GPUs, pipeline=2, cuda_graphs",
            "rank's attention alone",
            "all_to_all",
        )
        for name in names:
            if name in r:
                eager, host, graph = r[name], r[f"{name} host"], r[f"{name} graph"]
                ups = ("", "") if name in ("1 GPU", "all_to_all", "rank's attention alone") else (
                    speedup(r["1 GPU"], eager), speedup(r["1 GPU graph"], graph)
                )  # fmt: skip
                cells = (r["heads"], name, fmt(eager), fmt(host), fmt(graph), *ups)
                say("| " + " | ".join(map(str, cells)) + " |")
    for block in blocks:
        gflop = block["dense GFLOP"]
        say(f"\n{block['model']} block per chunk, ms ({gflop:.0f} GFLOP outside self-attention)")
        say("| variant | eager | graph | speed-up eager | speed-up graph |")
        say("|---|---|---|---|---|")
        for name in (
            "1 GPU", "1 GPU, cuda_graphs", "2 GPUs", "2 GPUs, pipeline=2", "2 GPUs, cuda_graphs",
            "2 GPUs, pipeline=2, cuda_graphs",
        ):  # fmt: skip
            eager, graph = block[name], block[f"{name} graph"]
            ups = (speedup(block["1 GPU"], eager), speedup(block["1 GPU graph"], graph))
            say(f"| {name} | {fmt(eager)} | {fmt(graph)} | {ups[0]} | {ups[1]} |")
        without = block["1 GPU without self-attention"], block["2 GPUs without self-attention"]
        say(f"without self-attention: 1 GPU {fmt(without[0])}, 2 GPUs {fmt(without[1])}")
    if big:
        say(
            f"\nwan-14b, one layer, {big['history']:,} history tokens ({big['kv_gib_total']:.0f} GiB of KV): "
            f"one GPU: {big['one_gpu']}; two GPUs: {big['two_gpu_ms']:.3f} ms per step, "
            f"{big['two_gpu_peak_gib_per_gpu']:.1f} GiB peak per GPU"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, default=237 * FRAME)
    parser.add_argument("--heads", type=int, nargs="+", default=[40, 12])
    parser.add_argument(
        "--big-history", type=int, default=8_000_000, help="0 skips the too-big-for-one-GPU run"
    )
    parser.add_argument("--blocks", nargs="*", default=list(BLOCKS), help="whole-block benchmarks to run")
    parser.add_argument("--eager", action="store_true", help="eager selection (compile=False)")
    parser.add_argument("--profile", default=None, help="folder for profiler tables and traces")
    parser.add_argument(
        "--probe", action="store_true", help="NCCL vs copy-engine exchange, alone and beside attention"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=180))
    world = dist.get_world_size()
    config = OmniMemConfig(
        block_size=128,
        top_k=32,
        sink_tokens=FRAME,
        local_tokens=CHUNK,
        backend="triton",
        compile=not args.eager,
    )
    env = dict(
        device=torch.cuda.get_device_name(), gpus=world, torch=torch.__version__, triton=triton.__version__,
        nccl=".".join(map(str, torch.cuda.nccl.version())),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    )  # fmt: skip
    rows, blocks, big, probe = [], [], None, None

    def save() -> None:
        if args.json and dist.get_rank() == 0:
            with open(args.json, "w") as fh:
                json.dump(dict(env=env, rows=rows, blocks=blocks, big=big, probe=probe), fh, indent=1)

    def free() -> None:
        gc.collect()
        torch.cuda.empty_cache()
        dist.barrier()

    for heads in args.heads:
        free()
        rows.append(attention_rows(heads, args.history, config, args))
        say(json.dumps(rows[-1]))
        save()
    for model in args.blocks:
        free()
        blocks.append(block_rows(model, args.history, config))
        say(json.dumps(blocks[-1]))
        save()
    if args.big_history:
        free()
        big = big_history(args.big_history, config)
        save()
    if args.probe:
        free()
        probe = exchange_probe(40, args.history, config)
        say(json.dumps(probe))
        save()
    if dist.get_rank() == 0:
        report(env, rows, blocks, big)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
