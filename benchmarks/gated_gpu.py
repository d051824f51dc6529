"""The gated OmniMem layer at the authors' shapes (DESIGN.md section 8), one device call.

B=1, H=12, D=128, bf16, a chunk of 4680 queries (3 frames), blocks of 30, groups of 15, top 16,
a 14,040-token window; histories of 18 / 60 / 237 / 1200 frames. Inputs are random, in
``[B, L, H, D]`` storage (a cache's layout) viewed as ``[B, H, L, D]``. Two query patterns:
``random`` (every group selects independently: no reuse between neighbouring groups, the
worst case for L2) and ``paired`` (the two 15-query groups of a 30-token block share their
mean query, as the halves of one 1x15x2 patch block do in a real model).

First checks (float64 reference on small shapes; the Triton selection against the torch
selection, near-ties allowed; the selected kernel against the plain-torch branch), then times
with ``triton.testing.do_bench`` medians (L2 flushed):

- ``selection``: ``select_groups`` from cached float32 block means (pooled queries, the
  scores + top-k kernel, the split merge), and the kernel alone; sweeps of its tile sizes;
- ``selected``: the scattered kernel alone (output allocation only), sweeps;
- ``compressed`` / ``window``: the layer's choice (the Hopper kernel from ``HOPPER_MIN_KEYS``
  keys), and SDPA with cuDNN and with flash (the peers for dense branches);
- ``cache update``: writing the chunk's K/V into the buffers and pooling its blocks;
- ``layer``: ``gated_attention(pooled=...)`` (selection, the three branches, the gated sum),
  and layer + cache update; peak extra memory beyond the output; the same with the selection
  inline instead of on its side stream, and with both dense branches on cuDNN.

Usage: ``python benchmarks/gated_gpu.py [--histories ...] [--json out.json] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from attention_gpu import FRAME_TOKENS, bench, environment, graph_ms, peak_extra_mib
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnimem import GatedConfig, gated_attention
from omnimem.backends import gated_branches
from omnimem.backends import selected_attention as selected_module
from omnimem.backends.gated_branches import (
    compressed_attention,
    selected_attention_gather,
    window_attention,
)
from omnimem.backends.quantized_attention import dequantized_history
from omnimem.backends.selected_attention import selected_attention
from omnimem.gated import attention as gated_module
from omnimem.gated.selection import (
    CandidateRule,
    candidate_span,
    group_queries,
    select_groups,
    select_groups_torch,
)
from omnimem.kernels.group_topk import (
    _PASS_1_PER_SM,
    _PASS_1_ROWS,
    _PASS_1_WARPS,
    bucket_maxima,
    default_bucket,
    group_topk,
    stream_topk,
    two_pass_topk,
)
from omnimem.pooling import block_means, key_bounds, pool_kv
from omnimem.store.blocks import QuantizedBlocks
from tests.reference_gated import reference_gated_attention

HEADS, HEAD_DIM, CHUNK = 12, 128, 3 * FRAME_TOKENS
CFG = GatedConfig()
# The candidates of the authors' current code (the default) and of their code before ca257ce.
RULE, RULE_ALL = CandidateRule.of(CFG), CandidateRule.of(CFG.replace(candidates="all"))
# group_topk keyword variants swept by --variants (pass 1's tiles; pass 2's bucket and warps).
# Pass 2's knobs around the defaults (the warp refine pass past 512 buckets per row, else the
# block one in 2 warps; d_chunk=16, bucket=4, pass 1 on the bfloat16 means in 64-row tiles of
# 4 warps, 8 programs per SM);
# approx_keys=None runs pass 1 in tf32 on the float32 means.
SELECTION_VARIANTS = [
    dict(),
    dict(refine="block"),
    dict(refine="warp"),
    dict(refine="warp", refine_warps=1, d_chunk=8),
    dict(approx_keys=None),
    dict(d_chunk=32),
    dict(d_chunk=4),
    dict(refine_warps=2),
    dict(refine_warps=4),
    dict(refine_warps=2, d_chunk=8),
    dict(rows=128, num_warps=8, per_sm=3),  # pass 1's launch before 2026-12-02
    dict(per_sm=6),
    dict(per_sm=12),
    dict(level_steps=5),
    dict(level_steps=12),
    dict(bucket=8),
    dict(chunk_lanes=256),
]


def check_small() -> list[str]:
    """Triton path against the float64 reference on small shapes (fp32 and bf16)."""
    lines = []
    gen = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 2e-3), (torch.bfloat16, 3e-2)):
        for hist, lq, bs, gs, k, win, cand, hq, hkv in [
            (300, 60, 30, 15, 4, 90, "all", 4, 4),
            (1000, 45, 7, 10, 16, 100, "awe", 4, 2),
            (0, 33, 30, 15, 16, 14040, "all", 2, 2),
            (540, 60, 30, 15, 4, 180, "chunks", 4, 4),  # chunk 9: the authors' exclusion applies
        ]:
            # The reference sees the same (rounded) inputs as the kernels.
            q = torch.randn(2, lq, hq, 64, generator=gen).transpose(1, 2).to(dtype)
            kv = torch.randn(2, hist + lq + 5, hkv, 64, generator=gen).transpose(1, 2).to(dtype)
            v = torch.randn(2, hist + lq + 5, hkv, 64, generator=gen).transpose(1, 2).to(dtype)
            gates = torch.rand(2, hq, lq, 3, generator=gen)
            ref = reference_gated_attention(
                q, kv, v, gates, history_len=hist, block_size=bs, query_group_size=gs,
                top_k=k, window_tokens=win, candidates=cand,
            )  # fmt: skip
            out = gated_attention(
                q.cuda(), kv.cuda(), v.cuda(), gates.cuda(),
                history_len=hist, block_size=bs, query_group_size=gs, top_k=k, window_tokens=win,
                candidates=cand, backend="triton",
            )  # fmt: skip
            err = (out.double().cpu() - ref.out).abs().max().item()
            status = "ok" if err < tol else "FAIL"
            lines.append(
                f"small {dtype} hist={hist} bs={bs} gs={gs} k={k} {cand}: max err {err:.2e} {status}"
            )
    return lines


def make_inputs(history: int, pattern: str):
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(history)
    total = history + CHUNK
    k = torch.randn(1, total, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, total, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
    q = torch.randn(1, CHUNK, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
    if pattern == "paired":  # the two groups of a 30-token block share their mean query
        half = q.view(1, CHUNK // 30, 2, 15, HEADS, HEAD_DIM)
        half[:, :, 1] = half[:, :, 0].flip(2)
    gates = torch.rand(1, HEADS, CHUNK, 3, device=device, generator=gen).to(torch.bfloat16)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), gates


def selection_agreement(q, pooled, seq_len) -> str:
    """Fraction of groups whose kernel top-k equals the torch top-k, and whether every
    difference is a near-tie (kernel's pick scores within 1e-5 relative of the k-th best)."""
    scale = HEAD_DIM**-0.5
    pq = group_queries(q, 15, HEADS, "float32")
    end = candidate_span(seq_len, CHUNK, RULE)
    got, _ = group_topk(
        pq, pooled.k, end, top_k=16, scale=scale, approx_keys=pooled.k_attn, key_bounds=pooled.k_bounds
    )
    want, _ = select_groups_torch(pq, pooled.k, end, top_k=16, scale=scale)
    same = (got.sort(-1).values == want.sort(-1).values).all(-1)
    scores = torch.einsum("bhgd,bhjd->bhgj", pq.double(), pooled.k.double()) * scale
    kth = scores.gather(-1, want.long()[..., -1:])
    picked = scores.gather(-1, got.long())
    near = (picked >= kth - 1e-5 * kth.abs().clamp(min=1)).all()
    share = same.float().mean().item()
    return f"selection: {share:.4f} of groups identical; differences near-ties: {bool(near)}"


def run_history(history: int, pattern: str, args) -> dict:
    q, k, v, gates = make_inputs(history, pattern)
    seq = history + CHUNK
    seq_len = torch.tensor(seq, device="cuda")
    scale = HEAD_DIM**-0.5
    slots = math.ceil(seq / 30)
    pooled = pool_kv(k, v, seq_len=seq, block_size=30, num_slots=slots)
    row = dict(history=history, frames=history // FRAME_TOKENS, pattern=pattern)
    sel = select_groups(
        q, pooled.k, seq_len, query_group_size=15, rule=RULE, precision="float32", scale=scale,
        use_kernel=True, approx_keys=pooled.k_attn, key_bounds=pooled.k_bounds,
    )  # fmt: skip
    checks = []
    if pattern == "random":
        checks.append(selection_agreement(q, pooled, seq_len))
    if history <= 100_000 and pattern == "random":
        got = selected_attention(
            q, k, v, block_idx=sel.block_idx, num_blocks=sel.num_blocks, seq_len=seq_len,
            block_size=30, query_group_size=15, scale=scale,
        )  # fmt: skip
        want = selected_attention_gather(
            q, k, v, block_idx=sel.block_idx, seq_len=seq_len, block_size=30, query_group_size=15, scale=scale
        )
        err = (got.float() - want.float()).abs().max().item()
        checks.append(f"selected kernel vs torch branch: max err {err:.2e} {'ok' if err < 2e-2 else 'FAIL'}")
    row["checks"] = checks
    for line in checks:
        print(f"  [{history}/{pattern}] {line}", flush=True)

    def select(approx_keys=pooled.k_attn, rule=RULE):
        """What the layer runs: pass 1 on the bfloat16 means (``approx_keys=None``: tf32)."""
        return select_groups(
            q, pooled.k, seq_len, query_group_size=15, rule=rule, precision="float32", scale=scale,
            use_kernel=True, approx_keys=approx_keys,
            key_bounds=None if approx_keys is None else pooled.k_bounds,
        )  # fmt: skip

    pq = group_queries(q, 15, HEADS, "float32")
    end = candidate_span(seq_len, CHUNK, RULE)
    t = {}
    t["selection"] = bench(select)
    t["selection kernel+merge"] = bench(
        lambda: group_topk(
            pq, pooled.k, end, top_k=16, scale=scale, approx_keys=pooled.k_attn, key_bounds=pooled.k_bounds
        )
    )
    if args.variants and pattern == "random":
        for options in SELECTION_VARIANTS:
            name = "two-pass " + " ".join(f"{k}={v}" for k, v in options.items())
            options = {"approx_keys": pooled.k_attn, "key_bounds": pooled.k_bounds, **options}
            if options["approx_keys"] is None:
                options["key_bounds"] = None
            t[name] = graph_ms(lambda o=options: two_pass_topk(pq, pooled.k, end, top_k=16, scale=scale, **o))
        pass_1 = dict(
            bucket=default_bucket(slots), rows=_PASS_1_ROWS, block_n=64, precision="tf32",
            num_warps=_PASS_1_WARPS, per_sm=_PASS_1_PER_SM,
        )  # fmt: skip
        t["selection pass 1 alone"] = bench(
            lambda: bucket_maxima(pq, pooled.k_attn, end, bounds=pooled.k_bounds, **pass_1)
        )
        t["selection pass 1 alone, tf32"] = bench(lambda: bucket_maxima(pq, pooled.k, end, **pass_1))
        t["selection one-pass (tf32x3)"] = bench(
            lambda: stream_topk(pq, pooled.k, end, top_k=16, scale=scale)
        )
    t["selection (CUDA graph)"] = graph_ms(select)
    t["selection, candidates=all (CUDA graph)"] = graph_ms(lambda: select(rule=RULE_ALL))
    t["selection, tf32 pass 1 (CUDA graph)"] = graph_ms(lambda: select(approx_keys=None))

    def slc(**kw):
        return selected_attention(
            q, k, v, block_idx=sel.block_idx, num_blocks=sel.num_blocks, seq_len=seq_len,
            block_size=30, query_group_size=15, scale=scale, **kw,
        )  # fmt: skip

    t["selected"] = bench(slc)
    # A quantized cache's selected branch (GatedCache(kv_format=...)): blocks before the live
    # region (the window, rounded down to a block) read from the store's bytes, the rest native.
    live_first = max(0, seq - 14040) // 30
    live_k, live_v = k[:, :, live_first * 30 :], v[:, :, live_first * 30 :]
    for kv_format in ("fp8", "int4"):
        store = QuantizedBlocks(kv_format, batch=1, num_kv_heads=HEADS, capacity=max(live_first * 30, 30),
                                head_dim=HEAD_DIM, block_size=30, device=q.device)  # fmt: skip
        if live_first:
            store.write(0, k[:, :, : live_first * 30], v[:, :, : live_first * 30])

        def quantized(store=store):
            return selected_attention(
                q, live_k, live_v, block_idx=sel.block_idx, num_blocks=sel.num_blocks, seq_len=seq_len,
                block_size=30, query_group_size=15, scale=scale, store=store, live_first=live_first,
            )  # fmt: skip

        if history <= 100_000 and pattern == "random":  # against the branch over the dequantized keys
            read_k, read_v = dequantized_history(store, live_k, live_v, history_len=live_first * 30,
                                                 dtype=torch.bfloat16) if live_first else (k, v)  # fmt: skip
            want = selected_attention_gather(q, read_k, read_v, block_idx=sel.block_idx, seq_len=seq_len,
                                             block_size=30, query_group_size=15, scale=scale)  # fmt: skip
            got, native = quantized(), slc()
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            cost = ((got.float() - native.float()).norm() / native.float().norm()).item()
            line = f"selected {kv_format}: kernel vs dequantized branch {err:.2e}, vs bf16 {cost:.2%}"
            print(f"  [{history}/{pattern}] {line}", flush=True)
            checks.append(line)
        t[f"selected {kv_format}"] = bench(quantized)
        if kv_format == "fp8":  # the store's blocks multiplied in fp16 (FP8_HALF_PRODUCTS; new)
            selected_module.FP8_HALF_PRODUCTS = True
            try:
                half, native = quantized().float(), slc().float()
                cost = ((half - native).norm() / native.norm()).item()
                print(f"  [{history}/{pattern}] selected fp8, fp16 products: vs bf16 {cost:.2%}", flush=True)
                t["selected fp8 fp16 products"] = bench(quantized)
            finally:
                selected_module.FP8_HALF_PRODUCTS = False
        row[f"store {kv_format} bytes vs bf16"] = store.nbytes / (
            2 * live_k.element_size() * max(live_first, 1) * 30 * HEADS * HEAD_DIM
        )
    if args.variants:
        for warps, stages in [(4, 2), (2, 2), (2, 4), (1, 3)]:
            t[f"selected w={warps} s={stages}"] = bench(
                lambda w=warps, s=stages: slc(num_warps=w, num_stages=s)
            )

    def compressed():
        return compressed_attention(q, pooled.k_attn, pooled.v_attn, slots, scale=scale)

    def window():
        return window_attention(q, k, v, seq, window_tokens=14040, scale=scale)

    t["compressed (layer's choice)"], t["window (layer's choice)"] = bench(compressed), bench(window)
    gated_branches.HOPPER_DENSE = False
    try:
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            with sdpa_kernel(backend):
                t[f"compressed {name}"], t[f"window {name}"] = bench(compressed), bench(window)
    finally:
        gated_branches.HOPPER_DENSE = True

    # The cache update a layer call needs (GatedCache.write): the chunk's K/V into the buffers,
    # its blocks pooled, their key bounds.
    k_new, v_new = k[:, :, history:].clone(), v[:, :, history:].clone()
    first = history // 30

    def cache_update():
        k[:, :, history:seq].copy_(k_new)
        v[:, :, history:seq].copy_(v_new)
        k_means = block_means(k_new, CHUNK, 30)
        pooled.k[:, :, first:slots].copy_(k_means)
        pooled.k_attn[:, :, first:slots].copy_(k_means)
        pooled.v_attn[:, :, first:slots].copy_(block_means(v_new, CHUNK, 30))
        pooled.k_bounds[:, :, first:slots].copy_(key_bounds(k_means, pooled.k_attn[:, :, first:slots]))

    t["cache update"] = bench(cache_update)

    def layer():
        return gated_attention(q, k, v, gates, history_len=history, pooled=pooled, backend="triton")

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        t["layer"] = bench(layer)
        t["layer + cache update"] = bench(lambda: (cache_update(), layer()))
        t["layer + cache update (CUDA graph)"] = graph_ms(lambda: (cache_update(), layer()))
        row["layer extra MiB"] = peak_extra_mib(layer, q.numel() * 2)
        # The same with the selection inline (no side stream): what the overlap saves; and with
        # both dense branches on cuDNN: what the Hopper kernel saves there.
        for module, flag, label in (
            (gated_module, "OVERLAP_SELECTION", "selection inline"),
            (gated_branches, "HOPPER_DENSE", "dense branches cuDNN"),
        ):
            setattr(module, flag, False)
            try:
                t[f"layer, {label}"] = bench(layer)
                t[f"layer + cache update, {label} (CUDA graph)"] = graph_ms(lambda: (cache_update(), layer()))
            finally:
                setattr(module, flag, True)
    row["times_ms"] = t
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--histories", type=int, nargs="+", default=[18, 60, 237, 1200], help="frames")
    parser.add_argument("--patterns", nargs="+", default=["random", "paired"])
    parser.add_argument("--variants", action="store_true", help="sweep kernel tile sizes")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    env = environment()
    print(json.dumps(env), flush=True)
    small = check_small()
    print("\n".join(small), flush=True)
    rows = []
    for frames in args.histories:
        for pattern in args.patterns:
            row = run_history(frames * FRAME_TOKENS, pattern, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    names = list(rows[0]["times_ms"])
    print(f"\n{'ms':<44}" + "".join(f"{r['frames']:>6}f {r['pattern'][:3]}" for r in rows))
    for name in names:
        print(f"{name:<44}" + "".join(f"{r['times_ms'].get(name, float('nan')):>11.3f}" for r in rows))
    print(f"{'layer extra MiB':<44}" + "".join(f"{r['layer extra MiB']:>11.1f}" for r in rows))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(env=env, small=small, rows=rows), indent=1))


if __name__ == "__main__":
    main()
