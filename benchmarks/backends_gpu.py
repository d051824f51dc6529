"""Every backend side by side with the peers, at DESIGN.md section 4/5 shapes (GPU; one device call).

Per (heads, history, top_k) it first checks each omnimem backend against a float32 attention
over exactly the attended tokens (``attention_gpu.gather_reference``), then times with
``triton.testing.do_bench`` (median, L2 flushed):

- run step (selection prebuilt): ``triton`` backend (on Hopper its Gluon kernel; the
  Triton-language kernel is timed beside it), ``flex`` kernel (BlockMask prebuilt),
  ``gather`` backend (gather + masked SDPA), the DESIGN peer "gather + cuDNN" (the exact
  attended tokens gathered per head, unmasked cuDNN SDPA, copy included), and cuDNN over the
  same tokens already contiguous (the ceiling for a scattered kernel);
- dense cuDNN SDPA and FA2 over the full history + chunk;
- ``selection``: ``select_blocks`` from cached block sums, replayed from a CUDA graph (its GPU
  time; called alone it is host-bound), beside the floor under it: one kernel that only reads
  the queries and block sums selection reads (``read_floor.py``), timed the same way;
- ``triton e2e``: ``sparse_attention(..., key_block_sums=)`` with the triton backend, plain and
  replayed from a CUDA graph (what a captured decoding step costs);
- peak extra memory of each run step beyond its output (``torch.cuda.max_memory_allocated``).

``--variants`` first sweeps the Triton kernel's tile configurations and the Gluon kernel's
options at the first shape.

Usage: ``python benchmarks/backends_gpu.py [--histories ...] [--heads 12 40] [--top-k 16 32 64]
[--variants] [--json out.json]``
"""

from __future__ import annotations

import argparse
import functools
import json
import math

import torch
import torch.nn.functional as F
from attention_gpu import FRAME_TOKENS, bench, environment, gather_reference, graph_ms, peak_extra_mib
from read_floor import read_inputs
from torch.nn.attention import SDPBackend, sdpa_kernel

from omnimem import OmniMemConfig, select_blocks, sparse_attention
from omnimem.backends import flex as flex_backend
from omnimem.backends import gather as gather_backend
from omnimem.backends import gluon_attention
from omnimem.backends import triton as triton_backend
from omnimem.backends.triton_attention import default_num_sms, scattered_attention
from omnimem.kernels.block_sums import block_sums

# Kernel configurations swept by --variants (keyword arguments of scattered_attention; unset:
# the tuned default). 128-query tiles feed two 64-row wgmma warpgroups; 128-key tiles match the
# retrieval block; 2-3 stages fit K+V tiles in shared memory. num_sms=1: no split last wave;
# 64x64 tiles on 4 warps fit two programs per SM (num_sms=264 splits for that).
VARIANTS = [
    dict(),
    dict(num_sms=1),
    dict(num_stages=2),
    dict(block_n=64),
    dict(block_m=64, num_warps=4),
    dict(block_m=64, block_n=64, num_warps=4, num_stages=3, num_sms=264),
    dict(use_tma=False),
]


# The Hopper Gluon kernel's options (keyword arguments of gluon_attention.scattered_attention).
GLUON_VARIANTS = [dict(), dict(num_sms=1), dict(stages=2)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def exact_tokens(sel, history_len: int, chunk_len: int) -> torch.Tensor:
    """``[B, H, T]`` the attended token positions per KV head (equal counts across heads here)."""
    bs = sel.block_size
    rows = []
    for kvh in range(sel.kv_block_idx.shape[1]):
        blocks = sel.kv_block_idx[0, kvh, 0, : sel.kv_num_blocks[0, kvh, 0]].long()
        tokens = (blocks[:, None] * bs + torch.arange(bs, device=blocks.device)).flatten()
        chunk = torch.arange(history_len, history_len + chunk_len, device=blocks.device)
        rows.append(torch.cat([tokens[tokens < history_len], chunk]))
    assert len({len(r) for r in rows}) == 1, "benchmark shapes give every head the same count"
    return torch.stack(rows)[None]


def make_inputs(heads: int, history_len: int, chunk_len: int, dtype=torch.bfloat16, head_dim: int = 128):
    gen = torch.Generator(device="cuda").manual_seed(history_len)
    shape = (1, heads, history_len + chunk_len, head_dim)
    q = torch.randn(1, heads, chunk_len, head_dim, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(*shape, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(*shape, device="cuda", dtype=dtype, generator=gen)
    return q, k, v


def auto_check(history_len: int, chunk_len: int) -> list[dict]:
    """End-to-end ``sparse_attention`` per backend on the shape classes ``auto`` decides between."""
    rows = []
    for dtype, head_dim in (
        (torch.bfloat16, 128),
        (torch.float16, 128),
        (torch.bfloat16, 64),
        (torch.float32, 128),
    ):
        q, k, v = make_inputs(12, history_len, chunk_len, dtype, head_dim)
        config = OmniMemConfig(block_size=128, top_k=32, sink_tokens=FRAME_TOKENS, local_tokens=chunk_len)
        sums = block_sums(k, torch.tensor(history_len, device="cuda"), 128)
        row = dict(dtype=str(dtype).removeprefix("torch."), head_dim=head_dim)
        for name in ("triton", "flex", "gather"):
            call = functools.partial(
                sparse_attention,
                q,
                k,
                v,
                history_len=history_len,
                config=config,
                backend=name,
                key_block_sums=sums,
            )
            row[name] = bench(call)
        print(f"auto check {row}", flush=True)
        rows.append(row)
    return rows


def run_shape(heads: int, history_len: int, top_k: int, args, variants: bool) -> dict:
    chunk_len = q_len = args.chunk_tokens
    kv_len = history_len + chunk_len
    q, k, v = make_inputs(heads, history_len, chunk_len)
    scale = 128**-0.5
    config = OmniMemConfig(block_size=128, top_k=top_k, sink_tokens=FRAME_TOKENS, local_tokens=chunk_len)
    history = torch.tensor(history_len, device="cuda")
    sums = block_sums(k, history, 128)
    sel = select_blocks(q, k, history_len=history_len, config=config, key_block_sums=sums)
    tokens = exact_tokens(sel, history_len, chunk_len)
    attended = tokens.shape[-1]
    ref = gather_reference(q, k, v, sel, history_len, chunk_len, scale)
    out_bytes = q.numel() * q.element_size()
    flops = 4 * q_len * attended * 128 * heads
    row = dict(heads=heads, history=history_len, top_k=top_k, attended_tokens=attended)

    def triton_run():  # the backend's run step: the Gluon kernel on Hopper, else the Triton one
        return triton_backend.forward(
            q, k, v, sel, chunk_len=chunk_len, scale=scale, return_lse=False, config=config
        )[0]

    def triton_kernel_run(**kernel_options):
        return scattered_attention(
            q, k, v, block_idx=sel.kv_block_idx, num_blocks=sel.kv_num_blocks, block_attended=None,
            history_len=sel.history_len, chunk_len=chunk_len, block_size=128, query_group_size=q_len,
            scale=scale, return_lse=False, **kernel_options,
        )[0]  # fmt: skip

    if variants:
        row["variants"] = []
        gluon_run = lambda **options: gluon_attention.scattered_attention(  # noqa: E731
            q, k, v, block_idx=sel.kv_block_idx, num_blocks=sel.kv_num_blocks, history_len=sel.history_len,
            chunk_len=chunk_len, block_size=128, scale=scale, return_lse=False,
            num_sms=options.pop("num_sms", default_num_sms(q.device)), **options,
        )[0]  # fmt: skip
        runs = [("triton", triton_kernel_run, variant) for variant in VARIANTS]
        if gluon_attention.supported(q, k, v, block_size=128, grouped=False):
            runs += [("gluon", gluon_run, variant) for variant in GLUON_VARIANTS]
        for kernel, fn, variant in runs:
            run = functools.partial(fn, **variant)
            try:
                err = rel_err(run(), ref)
                ms = bench(run)
            except Exception as exc:  # e.g. out of shared memory for a config
                print(f"variant {variant} failed: {str(exc).splitlines()[0][:300]}")
                err, ms = float("nan"), float("nan")
            row["variants"].append(dict(kernel=kernel, config=variant, ms=ms, rel_err=err))
            print(f"variant {kernel} {variant or 'default'}: "
                  f"{ms:.3f} ms, {flops / ms * 1e-9:.0f} TFLOP/s, rel err {err:.1e}", flush=True)  # fmt: skip

    # Correctness of every backend through the public API.
    for name in ("triton", "flex", "gather"):
        out = sparse_attention(
            q, k, v, history_len=history_len, config=config, backend=name, key_block_sums=sums
        )
        row[f"{name}_rel_err"] = rel_err(out, ref)
        assert row[f"{name}_rel_err"] < 1e-2, (name, row)

    # Split tiles hand partial results between programs: a missing barrier would show as
    # outputs that differ between identical calls (the split itself is deterministic).
    first = triton_run()
    row["triton_repeat_mismatches"] = sum(int(not torch.equal(triton_run(), first)) for _ in range(50))
    assert row["triton_repeat_mismatches"] == 0, row
    row["triton_ms"] = bench(triton_run)
    row["triton_kernel_ms"] = bench(triton_kernel_run)  # the Triton-language kernel (any GPU)
    shapes = dict(num_q_heads=heads, q_len=q_len, kv_len=kv_len, chunk_len=chunk_len, compiled=True)
    block_mask = flex_backend.build_block_mask(sel, **shapes)
    flex_run = lambda: flex_backend.attend(q, k, v, block_mask, scale=scale)  # noqa: E731
    row["flex_ms"] = bench(flex_run)
    gather_run = lambda: gather_backend.forward(  # noqa: E731
        q, k, v, sel, chunk_len=chunk_len, scale=scale, return_lse=False, config=config
    )[0]
    row["gather_ms"] = bench(gather_run)
    index = tokens[..., None].expand(-1, -1, -1, 128)

    def gather_cudnn():
        return F.scaled_dot_product_attention(q, k.gather(2, index), v.gather(2, index), scale=scale)

    contiguous = (k.gather(2, index), v.gather(2, index))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        row["gather_cudnn_rel_err"] = rel_err(gather_cudnn(), ref)
        row["gather_cudnn_ms"] = bench(gather_cudnn)
        row["contiguous_cudnn_ms"] = bench(functools.partial(F.scaled_dot_product_attention, q, *contiguous))
        row["gather_cudnn_extra_mib"] = peak_extra_mib(gather_cudnn, out_bytes)
    for name, backend in (
        ("dense_cudnn_ms", SDPBackend.CUDNN_ATTENTION),
        ("dense_fa2_ms", SDPBackend.FLASH_ATTENTION),
    ):
        try:
            with sdpa_kernel(backend):
                row[name] = bench(lambda: F.scaled_dot_product_attention(q, k, v))
        except RuntimeError as err:
            row[name] = float("nan")
            print(f"{name}: unavailable ({str(err).splitlines()[0]})")

    select = lambda: select_blocks(q, k, history_len=history_len, config=config, key_block_sums=sums)  # noqa: E731
    row["selection_ms"] = bench(select)
    row["selection_graph_ms"] = graph_ms(select)
    floor_out = read_inputs(q, sums)
    row["selection_read_floor_graph_ms"] = graph_ms(lambda: read_inputs(q, sums, floor_out))
    e2e = lambda: sparse_attention(  # noqa: E731
        q, k, v, history_len=history_len, config=config, backend="triton", key_block_sums=sums
    )
    row["triton_e2e_ms"] = bench(e2e)
    row["triton_e2e_graph_ms"] = graph_ms(e2e)
    row["triton_extra_mib"] = peak_extra_mib(triton_run, out_bytes)
    row["flex_extra_mib"] = peak_extra_mib(flex_run, out_bytes)
    row["gather_extra_mib"] = peak_extra_mib(gather_run, out_bytes)
    for name in ("triton", "flex", "gather", "gather_cudnn", "contiguous_cudnn"):
        row[f"{name}_tflops"] = flops / row[f"{name}_ms"] * 1e-9
    row["triton_over_gather_cudnn"] = row["triton_ms"] / row["gather_cudnn_ms"]
    row["triton_over_flex"] = row["triton_ms"] / row["flex_ms"]
    row["selection_share"] = row["selection_graph_ms"] / row["triton_ms"]
    row["selection_read_floor_share"] = row["selection_read_floor_graph_ms"] / row["triton_ms"]
    row["dense_cudnn_over_triton_e2e"] = row["dense_cudnn_ms"] / row["triton_e2e_ms"]
    return row


COLUMNS = [
    ("H", "heads", "d"),
    ("history", "history", "d"),
    ("top_k", "top_k", "d"),
    ("attended", "attended_tokens", "d"),
    ("triton ms", "triton_ms", ".3f"),
    ("triton-lang kernel ms", "triton_kernel_ms", ".3f"),
    ("flex ms", "flex_ms", ".3f"),
    ("gather ms", "gather_ms", ".3f"),
    ("gather+cuDNN ms", "gather_cudnn_ms", ".3f"),
    ("contig cuDNN ms", "contiguous_cudnn_ms", ".3f"),
    ("dense cuDNN ms", "dense_cudnn_ms", ".2f"),
    ("dense FA2 ms", "dense_fa2_ms", ".2f"),
    ("triton TFLOP/s", "triton_tflops", ".0f"),
    ("triton/gather+cuDNN", "triton_over_gather_cudnn", ".2f"),
    ("triton/flex", "triton_over_flex", ".2f"),
    ("selection ms (graph)", "selection_graph_ms", ".3f"),
    ("sel/triton", "selection_share", ".1%"),
    ("read floor/triton", "selection_read_floor_share", ".1%"),
    ("triton e2e ms", "triton_e2e_ms", ".3f"),
    ("triton e2e graph ms", "triton_e2e_graph_ms", ".3f"),
    ("extra MiB triton/flex/gather/gather+cuDNN", None, None),
    ("triton err", "triton_rel_err", ".1e"),
]


def fmt_row(row: dict) -> str:
    cells = []
    for _, key, spec in COLUMNS:
        if key is None:
            cells.append(
                "/".join(f"{row[f'{n}_extra_mib']:.1f}" for n in ("triton", "flex", "gather", "gather_cudnn"))
            )
        else:
            value = row[key]
            cells.append("n/a" if isinstance(value, float) and math.isnan(value) else format(value, spec))
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--histories", type=int, nargs="+", default=[24 * FRAME_TOKENS, 237 * FRAME_TOKENS])
    parser.add_argument("--heads", type=int, nargs="+", default=[12])
    parser.add_argument("--top-k", type=int, nargs="+", default=[32])
    parser.add_argument("--chunk-tokens", type=int, default=3 * FRAME_TOKENS)
    parser.add_argument(
        "--variants", action="store_true", help="sweep triton tile configs at the first shape"
    )
    parser.add_argument(
        "--auto-check", action="store_true", help="time each backend per dtype/head_dim class"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    env = environment()
    print(json.dumps(env))
    rows = []
    for heads in args.heads:
        for top_k in args.top_k:
            for history_len in args.histories:
                row = run_shape(heads, history_len, top_k, args, variants=args.variants and not rows)
                print(json.dumps(row), flush=True)
                rows.append(row)
                if args.json:  # after every shape: a later failure keeps what was measured
                    with open(args.json, "w") as fh:
                        json.dump(dict(env=env, rows=rows), fh, indent=1)
    checks = auto_check(args.histories[-1], args.chunk_tokens) if args.auto_check else []
    if args.json and checks:
        with open(args.json, "w") as fh:
            json.dump(dict(env=env, rows=rows, auto_check=checks), fh, indent=1)
    print(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    print("| " + " | ".join(c[0] for c in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print(fmt_row(row))
    for check in checks:
        print("auto check (e2e ms):", check)


if __name__ == "__main__":
    main()
