"""Side-by-side attention timings at DESIGN.md section 4/5 shapes (GPU; one device call).

For each history length it checks omnimem's flex backend against a float32 gather reference
(the exact attended set, so the check is independent of FlexAttention), then times with
``triton.testing.do_bench`` (median):

- ``flex kernel``: compiled FlexAttention with omnimem's prebuilt BlockMask (the run step);
- ``e2e cached``: ``sparse_attention`` end to end (selection + BlockMask + kernel) given the
  per-block key sums a KV cache maintains;
- ``e2e raw``: the same from raw keys: selection first sums every history key (one pass over
  the whole key buffer: ~0.42 ms for the 1.1 GB of wan-1.3b 60 s at 2.7 TB/s);
- ``sel cached`` / ``sel raw``: ``select_blocks`` alone, both ways;
- ``plan``: the BlockMask tables; ``block sums``: the key-summing kernel alone (bandwidth);
- ``sdpa cudnn`` / ``sdpa flash``: dense SDPA over the full history + chunk (the peers).

``backends_gpu.py`` compares every backend (triton, flex, gather) with the peers.

Usage: ``python benchmarks/attention_gpu.py [--histories 37440 369720] [--heads 12] [--json out.json]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import math

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import omnimem
from omnimem import OmniMemConfig, select_blocks, sparse_attention
from omnimem.backends import flex as flex_backend
from omnimem.kernels.block_sums import block_sums

FRAME_TOKENS = 1560  # one 480x832 Wan2.1 latent frame


def gather_reference(q, k, v, sel, history_len: int, chunk_len: int, scale: float) -> torch.Tensor:
    """Float32 attention over exactly the attended tokens, gathered per KV head (B=1, G=1)."""
    bs = sel.block_size
    heads_per_kv = q.shape[1] // k.shape[1]
    out = torch.empty_like(q, dtype=torch.float32)
    for kvh in range(k.shape[1]):
        blocks = sel.kv_block_idx[0, kvh, 0, : sel.kv_num_blocks[0, kvh, 0]].long()
        tokens = (blocks[:, None] * bs + torch.arange(bs, device=q.device)).flatten()
        tokens = torch.cat(
            [
                tokens[tokens < history_len],
                torch.arange(history_len, history_len + chunk_len, device=q.device),
            ]
        )
        ks, vs = k[0, kvh, tokens].float(), v[0, kvh, tokens].float()
        for h in range(kvh * heads_per_kv, (kvh + 1) * heads_per_kv):
            out[0, h] = F.scaled_dot_product_attention(
                q[0, h].float()[None], ks[None], vs[None], scale=scale
            )[0]
    return out


def environment() -> dict:
    """Device, versions and date: recorded with every benchmark's results."""
    return dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        omnimem=omnimem.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    )


def peak_extra_mib(fn, output_bytes: int) -> float:
    """Peak memory a call allocates beyond its output (MiB)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - output_bytes
    del result
    return extra / 2**20


def graph_ms(fn) -> float:
    """Median time of ``fn`` replayed from a CUDA graph (GPU time without host overhead)."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return bench(graph.replay)
    except RuntimeError as err:
        print(f"CUDA graph capture failed: {str(err).splitlines()[0]}")
        return float("nan")


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def run_shape(heads: int, history_len: int, args) -> dict:
    device = torch.device("cuda")
    q_len = chunk_len = args.chunk_tokens
    head_dim = 128
    kv_len = history_len + chunk_len
    gen = torch.Generator(device=device).manual_seed(history_len)
    q = torch.randn(1, heads, q_len, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, heads, kv_len, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, heads, kv_len, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
    config = OmniMemConfig(
        block_size=128, top_k=args.top_k, sink_tokens=FRAME_TOKENS, local_tokens=chunk_len, backend="flex"
    )
    scale = head_dim**-0.5
    row = dict(heads=heads, history=history_len, top_k=args.top_k)

    sel = select_blocks(q, k, history_len=history_len, config=config)
    attended_hist = sum(
        min((int(b) + 1) * 128, history_len) - int(b) * 128
        for b in sel.kv_block_idx[0, 0, 0, : sel.kv_num_blocks[0, 0, 0]]
    )
    attended = attended_hist + chunk_len
    row["attended_tokens"] = attended

    out = sparse_attention(q, k, v, history_len=history_len, config=config)
    ref = gather_reference(q, k, v, sel, history_len, chunk_len, scale)
    row["rel_err_vs_gather_fp32"] = float((out.float() - ref).norm() / ref.norm())
    assert row["rel_err_vs_gather_fp32"] < 1e-2, row

    # The run step alone: compiled FlexAttention with the BlockMask prebuilt (planning hoisted).
    shapes = dict(num_q_heads=heads, q_len=q_len, kv_len=kv_len, chunk_len=chunk_len, compiled=True)
    block_mask = flex_backend.build_block_mask(sel, **shapes)
    row["flex_kernel_ms"] = bench(lambda: flex_backend.attend(q, k, v, block_mask, scale=scale))
    row["flex_e2e_ms"] = bench(lambda: sparse_attention(q, k, v, history_len=history_len, config=config))
    row["selection_ms"] = bench(lambda: select_blocks(q, k, history_len=history_len, config=config))
    row["plan_ms"] = bench(lambda: flex_backend.build_block_mask(sel, **shapes))
    history = torch.tensor(history_len, device=device)
    row["block_sums_ms"] = bench(lambda: block_sums(k, history, 128))
    # With the per-block key sums a KV cache maintains: no pass over the key history.
    sums = block_sums(k, history, 128)
    row["flex_e2e_cached_ms"] = bench(
        lambda: sparse_attention(q, k, v, history_len=history_len, config=config, key_block_sums=sums)
    )
    row["selection_cached_ms"] = bench(
        lambda: select_blocks(q, k, history_len=history_len, config=config, key_block_sums=sums)
    )
    row["block_sums_gbps"] = history_len * heads * head_dim * 2 / row["block_sums_ms"] * 1e-6
    for name, backend in (
        ("sdpa_cudnn_ms", SDPBackend.CUDNN_ATTENTION),
        ("sdpa_flash_ms", SDPBackend.FLASH_ATTENTION),
    ):
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v)
                row[name] = bench(lambda: F.scaled_dot_product_attention(q, k, v))
        except RuntimeError as err:  # a backend unavailable on this build/device
            row[name] = float("nan")
            print(f"{name}: unavailable ({str(err).splitlines()[0]})")
    flops = 4 * q_len * head_dim * heads
    row["flex_kernel_tflops"] = flops * attended / row["flex_kernel_ms"] * 1e-9
    row["flex_e2e_tflops"] = flops * attended / row["flex_e2e_ms"] * 1e-9
    row["cudnn_tflops"] = flops * kv_len / row["sdpa_cudnn_ms"] * 1e-9
    row["cudnn_over_flex_e2e"] = row["sdpa_cudnn_ms"] / row["flex_e2e_ms"]
    row["cudnn_over_flex_kernel"] = row["sdpa_cudnn_ms"] / row["flex_kernel_ms"]
    row["cudnn_over_flex_e2e_cached"] = row["sdpa_cudnn_ms"] / row["flex_e2e_cached_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--histories", type=int, nargs="+", default=[24 * FRAME_TOKENS, 237 * FRAME_TOKENS])
    parser.add_argument("--heads", type=int, nargs="+", default=[12])
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--chunk-tokens", type=int, default=3 * FRAME_TOKENS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    env = environment()
    print(json.dumps(env))
    rows = []
    for heads in args.heads:
        for history_len in args.histories:
            row = run_shape(heads, history_len, args)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(env=env, rows=rows), fh, indent=1)

    cols = [
        ("H", "heads", "d"),
        ("history", "history", "d"),
        ("attended", "attended_tokens", "d"),
        ("flex kernel ms", "flex_kernel_ms", ".3f"),
        ("e2e cached ms", "flex_e2e_cached_ms", ".3f"),
        ("e2e raw ms", "flex_e2e_ms", ".3f"),
        ("sel cached ms", "selection_cached_ms", ".3f"),
        ("sel raw ms", "selection_ms", ".3f"),
        ("plan ms", "plan_ms", ".3f"),
        ("block sums GB/s", "block_sums_gbps", ".0f"),
        ("cuDNN dense ms", "sdpa_cudnn_ms", ".2f"),
        ("FA2 dense ms", "sdpa_flash_ms", ".2f"),
        ("flex TFLOP/s", "flex_kernel_tflops", ".0f"),
        ("cuDNN/kernel", "cudnn_over_flex_kernel", ".1f"),
        ("cuDNN/e2e cached", "cudnn_over_flex_e2e_cached", ".1f"),
        ("cuDNN/e2e raw", "cudnn_over_flex_e2e", ".1f"),
        ("rel err", "rel_err_vs_gather_fp32", ".1e"),
    ]
    print(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    print("| " + " | ".join(c[0] for c in cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print(
            "| "
            + " | ".join(format(row[key], fmt) if not math.isnan(row[key]) else "n/a" for _, key, fmt in cols)
            + " |"
        )


if __name__ == "__main__":
    main()
