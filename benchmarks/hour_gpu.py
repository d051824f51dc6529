"""An hour of history (issue 37): Wan2.1-1.3B-shaped layers with offloaded, quantized caches
and relative positions, timed at 1, 10, 30 and 60 minutes of history (GPU; one device call).

The history is written as a rollout writes it (one commit per 3-frame chunk of random keys
and values, in the cache's format) up to each mark, then one chunk (4 denoising passes + the
clean pass, each a full block forward) is timed, and, for layer 0, the selection and the
attention call alone (``triton.testing.do_bench`` medians). Per mark: per-layer ms of a chunk,
selection's share of the attention call, peak GPU memory, the host bytes of the history,
the disk bytes (``--disk``: native history in a file), and the selection index's bytes (the
per-block key sums, ``--index-format int8`` by default) scaled to 30 layers.

    python benchmarks/hour_gpu.py [--minutes 1 10 30 60] [--layers 1] [--kv-format int4]
                                  [--positions relative] [--disk DIR] [--index-format int8]
                                  [--json out.json]
    python benchmarks/hour_gpu.py --smoke   # a tiny CPU run: checks the script
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import functools
import json
import mmap
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

from omnimem import OmniMemCache, OmniMemConfig
from omnimem.gated.wan import wan_rope_freqs
from omnimem.positions import RelativeTime, wan_time_table

sys.path.insert(0, str(Path(__file__).parent))
from wan_block import WanBlock, rope_tables

FRAME, CHUNK, TEXT, FPS = 1560, 3 * 1560, 512, 4  # tokens a latent frame, a chunk; latent frames/s


def page_out(t: torch.Tensor, fraction: float) -> bool:
    """Ask the kernel to drop the first ``fraction`` of a file-backed tensor's pages from memory
    (``madvise(MADV_PAGEOUT)``, Linux 5.4+): those blocks then come from the disk. Whether it
    took is returned (the kernel may refuse: then the numbers say page cache, not disk)."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    start = t.data_ptr()
    end = start + int(t.numel() * t.element_size() * fraction)
    first = (start + page - 1) // page * page
    length = max(0, (end - first) // page * page)
    return libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(length), 21) == 0  # 21: MADV_PAGEOUT


def bench(fn) -> float:
    if torch.cuda.is_available():
        return triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median")
    begin = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - begin)


def chunk(blocks, caches, inputs, start: int) -> None:
    """One chunk at ``start``: 4 denoising passes + the clean pass, each a forward of every block."""
    x, e, context, rope = inputs
    with torch.no_grad():
        for _ in range(5):
            out = x
            for cache, block in zip(caches, blocks, strict=True):
                attention = functools.partial(attend_at, cache, start)
                out = block(out, e, context, rope, attention)


def attend_at(cache: OmniMemCache, start: int, q, k, v) -> torch.Tensor:
    """``cache.attend_at`` in the block's ``[B, L, H, D]`` layout."""
    return cache.attend_at(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), start=start).transpose(
        1, 2
    )


def main() -> None:
    global FRAME, CHUNK, TEXT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 10, 30, 60])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--kv-format", default="int4")
    parser.add_argument("--positions", default="relative", choices=["relative", "absolute"])
    parser.add_argument("--disk", default=None, help="a directory: the native history in a file")
    parser.add_argument("--index-format", default="int8", choices=["int8", "float32"])
    parser.add_argument(
        "--evict-half",
        action="store_true",
        help="with --disk: also time chunks right after the first half of every history is paged out",
    )
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.smoke:
        FRAME, CHUNK, TEXT = 12, 36, 8
        device, dtype, args.minutes = torch.device("cpu"), torch.float32, [0.5, 1]
        blocks = [WanBlock(32, 2, 64) for _ in range(args.layers)]
        config = OmniMemConfig(block_size=4, top_k=2, sink_tokens=FRAME, local_tokens=CHUNK, backend="gather")
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        blocks = [WanBlock.wan_1_3b().to(device, dtype) for _ in range(args.layers)]
        config = OmniMemConfig.preset("wan2.1-1.3b")
    heads, head_dim = blocks[0].heads, blocks[0].head_dim
    marks = sorted(round(m * 60 * FPS / 3) * 3 * FRAME for m in args.minutes)  # whole chunks
    time_table = RelativeTime(wan_time_table(wan_rope_freqs(head_dim, positions=1024)), FRAME)
    kv_format = "native" if args.disk else args.kv_format
    caches = OmniMemCache.for_layers(
        args.layers, marks[-1] + CHUNK, max_chunk_tokens=CHUNK, batch=1, num_kv_heads=heads,
        head_dim=head_dim, config=config, dtype=dtype, device=device, layout="blhd", offload=True,
        kv_format=kv_format, positions=time_table if args.positions == "relative" else None, disk=args.disk,
        index_format=args.index_format,
    )  # fmt: skip
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, CHUNK, heads * head_dim, device=device, dtype=dtype, generator=gen)
    e = 0.1 * torch.randn(1, 6, x.shape[-1], device=device, dtype=dtype, generator=gen)
    context = torch.randn(1, TEXT, x.shape[-1], device=device, dtype=dtype, generator=gen)
    rows = []
    for mark in marks:
        begin = time.perf_counter()
        for cache in caches:  # the history up to this mark, one commit per chunk
            while cache.history_len < mark:
                k, v = (torch.randn(1, heads, CHUNK, head_dim, device=device, dtype=dtype, generator=gen)
                        for _ in "kv")  # fmt: skip
                cache.commit(k, v)
        written = time.perf_counter() - begin
        rope = rope_tables(torch.arange(mark, mark + CHUNK, device=device), head_dim)
        run = functools.partial(chunk, blocks, caches, (x, e, context, rope), mark)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        run()  # warm-up: compiles, stages
        ms = min(bench(run) for _ in range(2))
        half_on_disk = paged = None
        if args.disk and args.evict_half:  # each chunk right after half the history left memory
            times = []
            for _ in range(3):
                paged = all(page_out(s, 0.5) for c in caches for s in (c._k_storage, c._v_storage))
                begin = time.perf_counter()
                run()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(1e3 * (time.perf_counter() - begin))
            half_on_disk = statistics.median(times)
        q, k, v = (torch.randn(1, heads, CHUNK, head_dim, device=device, dtype=dtype, generator=gen)
                   for _ in "qkv")  # fmt: skip
        with torch.no_grad():
            selection_ms = bench(functools.partial(caches[0].selection, q))
            attend_ms = bench(functools.partial(caches[0].attend, q, k, v))
        store = getattr(caches[0]._offload, "store", None)
        row = dict(
            minutes=mark / FRAME / FPS / 60, history=mark, write_s=written, ms_per_chunk=ms,
            ms_per_layer_call=ms / 5 / args.layers, selection_ms=selection_ms, attend_ms=attend_ms,
            selection_share=selection_ms / attend_ms,
            peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
            host_gib=(store.nbytes if store is not None else 0) * args.layers / 2**30,
            disk_gib=(2 * caches[0].k.numel() * caches[0].k.element_size() if args.disk else 0) * args.layers
            / 2**30,
            index_gib_30_layers=caches[0].key_block_sums.nbytes * 30 / 2**30,
            ms_per_chunk_half_on_disk=half_on_disk, paged_out=paged,
        )  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    env = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
        triton=triton.__version__, date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        layers=args.layers, kv_format=kv_format, positions=args.positions, disk=bool(args.disk),
        index_format=args.index_format,
    )  # fmt: skip
    print(f"\n{env}")
    print("| minutes | ms per layer call | vs first | selection share | peak GPU GiB | host GiB | disk GiB "
          "| index GiB (30 layers) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    first = rows[0]["ms_per_layer_call"]
    for r in rows:
        per_call = r["ms_per_layer_call"]
        sizes = (f"{r[key]:.1f}" for key in ("peak_gib", "host_gib", "disk_gib", "index_gib_30_layers"))
        share = f"{r['selection_share']:.1%}"
        cells = (f"{r['minutes']:.1f}", f"{per_call:.2f}", f"{per_call / first:.2f}x", share, *sizes)
        print("| " + " | ".join(cells) + " |")
    for r in rows:
        if r["ms_per_chunk_half_on_disk"] is not None:
            print(
                f"{r['minutes']:.1f} min: a chunk right after half the history was paged out "
                f"{r['ms_per_chunk_half_on_disk']:.1f} ms (paged out: {r['paged_out']}), "
                f"with the file's pages in memory {r['ms_per_chunk']:.1f} ms"
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(environment=env, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
