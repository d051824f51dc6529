"""Training cost: forward + backward of the scattered kernels beside the peers, one device call.

Two workloads, bf16 on the GPU, ``triton.testing.do_bench`` medians (L2 flushed):

1. ``sparse_attention`` at Wan2.1-1.3B shapes (12 heads x 128, a 4,680-token chunk, blocks of
   128, top_k 32, a sink frame and a chunk of local window; histories of 24 and 237 frames):
   the ``triton`` backend (forward, forward with the LSE kept, backward), compiled
   FlexAttention on the same BlockMask (with its backward tables), and gather + SDPA (the
   attended tokens gathered per head, flash SDPA; the gather's backward scatters into dK/dV).
2. The gated layer's selected branch at the authors' shapes (blocks of 30, groups of 15, top
   16; histories of 18 / 60 / 237 frames): the kernel forward, forward with LSE, backward; and
   the whole ``gated_attention`` layer forward + backward.

3. One layer's training step through ``OmniMemCache`` (attend with gradients, backward) at
   those histories: the compact copy of the attended blocks against a copy of the whole
   history, time and what autograd keeps for the backward.
4. The same through ``GatedCache`` at the authors' shapes (``--parts gated-cache``): compact
   keys (selected history blocks + the live region) against the stateless layer over a copy
   of the whole history.

Each gradient is first checked against float32 autograd over exactly the attended tokens.
"Peak extra" is what a backward allocates beyond the three gradients it returns.

Usage: ``python benchmarks/backward_gpu.py [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from attention_gpu import FRAME_TOKENS, bench, environment
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnimem import (
    GatedCache,
    GatedConfig,
    OmniMemCache,
    OmniMemConfig,
    gated_attention,
    select_blocks,
    sparse_attention,
)
from omnimem.backends import flex as flex_backend
from omnimem.backends import triton as triton_backend
from omnimem.backends.gated_branches import selected_attention_gather
from omnimem.backends.scattered_backward import Tiles, default_tiles, scattered_attention_backward
from omnimem.backends.selected_attention import SelectedAttention, selected_attention
from omnimem.gated import attention as gated_module
from omnimem.gated.attention import select_group_blocks
from omnimem.kernels.block_sums import block_sums

HEADS, HEAD_DIM, CHUNK = 12, 128, 3 * FRAME_TOKENS
# (block_m, block_n, num_warps, num_stages) swept by --variants, per kernel (the other default).
SPARSE_VARIANTS = {
    "dkv": [(64, 64, 4, 2), (32, 64, 4, 3)],
    "dq": [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 2)],
}  # fmt: skip
GROUP_VARIANTS = {
    "dkv": [(16, 32, 2, 1), (16, 32, 4, 1), (16, 32, 1, 1)],
    "dq": [(16, 32, 2, 1), (16, 32, 2, 2), (16, 32, 4, 1)],
}  # fmt: skip


def sweep(run, variants: dict, defaults: tuple[Tiles, Tiles]) -> list[dict]:
    """Backward time per tile variant of one kernel, the other kernel at its default."""
    rows = []
    for kernel, options in variants.items():
        for option in options:
            tiles = dict(dq_tiles=defaults[0], dkv_tiles=defaults[1])
            tiles[f"{kernel}_tiles"] = Tiles(*option)
            try:
                ms = bench(lambda: run(**tiles))  # noqa: B023
            except Exception as exc:  # e.g. out of shared memory or registers
                print(f"variant {kernel} {option} failed: {str(exc).splitlines()[0][:200]}")
                ms = float("nan")
            rows.append(dict(kernel=kernel, tiles=option, ms=ms))
            print(f"variant {kernel} {option}: {ms:.3f} ms", flush=True)
    return rows


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref.float()).norm() / ref.float().norm())


def leaves(*xs):
    return [x.detach().clone().requires_grad_() for x in xs]


def inputs(history_len: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (1, HEADS, history_len + CHUNK, HEAD_DIM)
    q = torch.randn(1, HEADS, CHUNK, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    d_out = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    return q, k, v, d_out


def backward_ms_and_peak(out: torch.Tensor, xs: list, d_out: torch.Tensor) -> tuple[float, float]:
    """Median time of ``autograd.grad(out, xs, d_out)`` and its peak memory beyond the gradients."""

    def run():
        return torch.autograd.grad(out, xs, d_out, retain_graph=True)

    grads = run()
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    del grads
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    grads = run()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base - grad_bytes) / 2**20
    del grads
    return bench(run), peak


def measure(row: dict, name: str, forward, inputs: tuple, d_out: torch.Tensor, ref) -> None:
    """``row[name + "_fwd_ms" / "_grad_rel_err" / "_bwd_ms" / "_bwd_peak_extra_mib"]`` of
    ``forward(*inputs)``: inference time, gradients against ``ref``, backward time and memory."""
    with torch.no_grad():
        row[f"{name}_fwd_ms"] = bench(lambda: forward(*inputs))
    xs = leaves(*inputs)
    out = forward(*xs)
    grads = torch.autograd.grad(out, xs, d_out, retain_graph=True)
    row[f"{name}_grad_rel_err"] = [rel_err(g, r) for g, r in zip(grads, ref, strict=True)]
    row[f"{name}_bwd_ms"], row[f"{name}_bwd_peak_extra_mib"] = backward_ms_and_peak(out, xs, d_out)


def attended_tokens(sel, history_len: int) -> torch.Tensor:
    """``[1, Hkv, T]`` the tokens each KV head attends (one query group; equal counts here)."""
    rows = []
    for kvh in range(sel.kv_block_idx.shape[1]):
        blocks = sel.kv_block_idx[0, kvh, 0, : sel.kv_num_blocks[0, kvh, 0]].long()
        tokens = (blocks[:, None] * sel.block_size + torch.arange(sel.block_size, device="cuda")).flatten()
        chunk = torch.arange(history_len, history_len + CHUNK, device="cuda")
        rows.append(torch.cat([tokens[tokens < history_len], chunk]))
    return torch.stack(rows)[None]


def sparse_shape(history_len: int, top_k: int, variants: bool = False) -> dict:
    q, k, v, d_out = inputs(history_len, seed=history_len)
    config = OmniMemConfig(block_size=128, top_k=top_k, sink_tokens=FRAME_TOKENS, local_tokens=CHUNK)
    sums = block_sums(k, torch.tensor(history_len, device="cuda"), 128)
    sel = select_blocks(q, k, history_len=history_len, config=config, key_block_sums=sums)
    scale = HEAD_DIM**-0.5
    tokens = attended_tokens(sel, history_len)
    index = tokens[..., None].expand(-1, -1, -1, HEAD_DIM)
    row = dict(history=history_len, top_k=top_k, attended_tokens=tokens.shape[-1])

    # Reference: float32 autograd over exactly the attended tokens.
    ref_q, ref_k, ref_v = leaves(q.float(), k.float(), v.float())
    ref_out = F.scaled_dot_product_attention(
        ref_q, ref_k.gather(2, index), ref_v.gather(2, index), scale=scale
    )
    ref = torch.autograd.grad(ref_out, (ref_q, ref_k, ref_v), d_out.float())
    del ref_q, ref_k, ref_v, ref_out

    def triton_forward(*xs):
        call = dict(chunk_len=CHUNK, scale=scale, return_lse=False, config=config)
        return triton_backend.forward(*xs, sel, **call)[0]

    if variants:
        fwd_out, fwd_lse = triton_backend._attend(q, k, v, sel, chunk_len=CHUNK, scale=scale, return_lse=True)
        table = dict(block_idx=sel.kv_block_idx, num_blocks=sel.kv_num_blocks, limit=sel.history_len)
        sizes = dict(block_size=128, query_group_size=CHUNK, chunk_len=CHUNK, scale=scale)

        def run(**tiles):
            return scattered_attention_backward(q, k, v, fwd_out, fwd_lse, d_out, **table, **sizes, **tiles)

        row["variants"] = sweep(run, SPARSE_VARIANTS, default_tiles(CHUNK, 128, q.dtype, q.device))
    xs = leaves(q, k, v)
    row["triton_fwd_with_lse_ms"] = bench(lambda: triton_forward(*xs))
    measure(row, "triton", triton_forward, (q, k, v), d_out, ref)

    shapes = dict(num_q_heads=HEADS, q_len=CHUNK, kv_len=history_len + CHUNK, chunk_len=CHUNK, compiled=True)
    mask = flex_backend.build_block_mask(sel, **shapes, for_backward=True)

    def flex_forward(*xs):
        return flex_backend.attend(*xs, mask, scale=scale)[0]

    def gather_sdpa(*xs):
        q_, k_, v_ = xs
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q_, k_.gather(2, index), v_.gather(2, index), scale=scale)

    measure(row, "flex", flex_forward, (q, k, v), d_out, ref)
    measure(row, "gather_sdpa", gather_sdpa, (q, k, v), d_out, ref)
    row["triton_bwd_over_fwd"] = row["triton_bwd_ms"] / row["triton_fwd_ms"]
    row["flex_bwd_over_triton_bwd"] = row["flex_bwd_ms"] / row["triton_bwd_ms"]
    print(f"sparse {row}", flush=True)
    return row


def selected_shape(frames: int, variants: bool = False) -> dict:
    history_len = frames * FRAME_TOKENS
    q, k, v, d_out = inputs(history_len, seed=frames)
    config = GatedConfig()
    scale = HEAD_DIM**-0.5
    sel = select_group_blocks(q, k, history_len=history_len, config=config)
    table = dict(block_idx=sel.block_idx, num_blocks=sel.num_blocks, seq_len=sel.seq_len)
    sizes = dict(block_size=config.block_size, query_group_size=sel.query_group_size, scale=scale)
    row = dict(frames=frames, history=history_len)

    ref_q, ref_k, ref_v = leaves(q.float(), k.float(), v.float())
    table_only = dict(block_idx=sel.block_idx, seq_len=sel.seq_len)
    ref_out = selected_attention_gather(ref_q, ref_k, ref_v, **table_only, **sizes)
    ref = torch.autograd.grad(ref_out, (ref_q, ref_k, ref_v), d_out.float())
    del ref_q, ref_k, ref_v, ref_out

    row["selected_fwd_ms"] = bench(lambda: selected_attention(q, k, v, **table, **sizes))
    lse = torch.empty(q.shape[:3], device="cuda")
    row["selected_fwd_with_lse_ms"] = bench(lambda: selected_attention(q, k, v, **table, **sizes, lse=lse))
    if variants:
        out = selected_attention(q, k, v, **table, **sizes, lse=lse)
        bwd_table = dict(block_idx=sel.block_idx, num_blocks=sel.num_blocks, limit=sel.seq_len)
        run = lambda out=out, **tiles: scattered_attention_backward(  # noqa: E731
            q, k, v, out, lse, d_out, **bwd_table, **sizes, chunk_len=0, **tiles
        )
        defaults = default_tiles(sel.query_group_size, config.block_size, q.dtype, q.device)
        row["variants"] = sweep(run, GROUP_VARIANTS, defaults)
    xs = leaves(q, k, v)
    args = (sel.block_idx, sel.num_blocks, sel.seq_len, config.block_size, sel.query_group_size, scale)
    out = SelectedAttention.apply(*xs, *args)
    grads = torch.autograd.grad(out, xs, d_out, retain_graph=True)
    row["selected_grad_rel_err"] = [rel_err(g, r) for g, r in zip(grads, ref, strict=True)]
    row["selected_bwd_ms"], row["selected_bwd_peak_extra_mib"] = backward_ms_and_peak(out, xs, d_out)
    row["selected_bwd_over_fwd"] = row["selected_bwd_ms"] / row["selected_fwd_ms"]
    del out, grads

    gates = torch.rand(*q.shape[:3], 3, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        row["layer_fwd_ms"] = bench(lambda: gated_attention(q, k, v, gates, history_len=history_len))
    layer_grads = {}
    for fanout, suffix in ((True, ""), (False, "_autograd_sum")):
        # One backward for dk/dv (SelectedAttentionFanout) vs autograd summing the branches'.
        gated_module.FANOUT_BACKWARD = fanout
        xs = leaves(q, k, v, gates)
        train_forward = lambda xs=xs: gated_attention(*xs, history_len=history_len)  # noqa: E731
        row[f"layer_train_fwd_ms{suffix}"] = bench(train_forward)
        layer_out = train_forward()
        layer_grads[fanout] = torch.autograd.grad(layer_out, xs, d_out, retain_graph=True)
        row[f"layer_bwd_ms{suffix}"], row[f"layer_bwd_peak_extra_mib{suffix}"] = backward_ms_and_peak(
            layer_out, xs, d_out
        )
        del layer_out, xs
    gated_module.FANOUT_BACKWARD = True
    row["layer_fanout_vs_autograd_rel_err"] = [
        rel_err(a, b.float()) for a, b in zip(layer_grads[True], layer_grads[False], strict=True)
    ]
    del layer_grads
    print(f"selected {row}", flush=True)
    return row


def cache_step(frames: int) -> dict:
    """One training step of one layer through ``OmniMemCache`` (attend with gradients, then
    backward) at ``frames`` of history, beside the same step over a copy of the whole history
    (what the cache did before it copied only the attended blocks): time and the memory
    autograd keeps between the forward and the backward."""
    history_len = frames * FRAME_TOKENS
    q, k, v, d_out = inputs(history_len, seed=frames)
    config = OmniMemConfig(
        block_size=128, top_k=32, sink_tokens=FRAME_TOKENS, local_tokens=CHUNK, backend="triton"
    )
    shape = dict(max_chunk_tokens=CHUNK, batch=1, num_kv_heads=HEADS, head_dim=HEAD_DIM, dtype=torch.bfloat16)
    cache = OmniMemCache(history_len + CHUNK, **shape, device="cuda", config=config)
    for start in range(0, history_len, CHUNK):
        end = min(start + CHUNK, history_len)
        cache.commit(k[:, :, start:end], v[:, :, start:end])
    chunk = [x.detach().clone().requires_grad_() for x in (q, k[:, :, history_len:], v[:, :, history_len:])]

    def compact():
        out = cache.attend(*chunk)
        torch.autograd.grad(out, chunk, d_out)

    def whole():
        keys = torch.cat([cache.k[:, :, :history_len], chunk[1]], 2)
        values = torch.cat([cache.v[:, :, :history_len], chunk[2]], 2)
        out = sparse_attention(chunk[0], keys, values, history_len=history_len, config=config)
        torch.autograd.grad(out, chunk, d_out)

    row = dict(frames=frames, history=history_len)
    row["compact_step_ms"], row["whole_step_ms"] = bench(compact), bench(whole)
    row["compact_kept_mib"] = kept_mib(lambda: cache.attend(*chunk))
    row["whole_kept_mib"] = kept_mib(
        lambda: sparse_attention(
            chunk[0], torch.cat([cache.k[:, :, :history_len], chunk[1]], 2),
            torch.cat([cache.v[:, :, :history_len], chunk[2]], 2), history_len=history_len, config=config,
        )
    )  # fmt: skip
    print(f"cache {row}", flush=True)
    return row


def kept_mib(step_forward) -> float:
    """Memory a forward leaves allocated until its output is dropped (what autograd keeps)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    out = step_forward()
    torch.cuda.synchronize()
    held = (torch.cuda.memory_allocated() - base) / 2**20
    del out
    return held


def gated_cache_step(frames: int) -> dict:
    """One training step of one gated layer through ``GatedCache`` at the authors' shapes
    (attend with gradients in q, k, v and the gates, then backward) at ``frames`` of history,
    beside the stateless layer over a copy of the whole history: time and what autograd keeps."""
    history_len = frames * FRAME_TOKENS
    q, k, v, d_out = inputs(history_len, seed=frames)
    cache = GatedCache(
        history_len + CHUNK, batch=1, num_kv_heads=HEADS, head_dim=HEAD_DIM, dtype=torch.bfloat16,
        device="cuda", layout="bhld",
    )  # fmt: skip
    for start in range(0, history_len, CHUNK):
        cache.write(k[:, :, start : start + CHUNK], v[:, :, start : start + CHUNK], start=start)
    gates = torch.rand(*q.shape[:3], 3, device="cuda", dtype=torch.bfloat16)
    chunk = leaves(q, k[:, :, history_len:], v[:, :, history_len:], gates)

    def compact():
        out = cache.attend(chunk[0], chunk[1], chunk[2], chunk[3], start=history_len)
        torch.autograd.grad(out, chunk, d_out)

    def whole_forward():
        keys = torch.cat([cache.k[:, :, :history_len], chunk[1]], 2)
        values = torch.cat([cache.v[:, :, :history_len], chunk[2]], 2)
        return gated_attention(chunk[0], keys, values, chunk[3], history_len=history_len)

    def whole():
        torch.autograd.grad(whole_forward(), chunk, d_out)

    with torch.no_grad():  # the same output both ways (compact keys: same tokens, same order)
        got = cache.attend(chunk[0], chunk[1], chunk[2], chunk[3], start=history_len)
        want = whole_forward()
    row = dict(frames=frames, history=history_len)
    row["max_abs_diff"] = (got.float() - want.float()).abs().max().item()
    grads = {}
    for fanout, suffix in ((True, ""), (False, "_autograd_sum")):
        # One backward for the chunk's dk/dv (SelectedAttentionFanout) vs autograd's sums.
        gated_module.FANOUT_BACKWARD = fanout
        out = cache.attend(chunk[0], chunk[1], chunk[2], chunk[3], start=history_len)
        grads[fanout] = torch.autograd.grad(out, chunk, d_out)
        del out
        row[f"compact_step_ms{suffix}"], row[f"whole_step_ms{suffix}"] = bench(compact), bench(whole)
        row[f"compact_kept_mib{suffix}"] = kept_mib(
            lambda: cache.attend(*chunk[:3], chunk[3], start=history_len)
        )
        row[f"whole_kept_mib{suffix}"] = kept_mib(whole_forward)
    gated_module.FANOUT_BACKWARD = True
    row["compact_fanout_vs_autograd_rel_err"] = [
        rel_err(a, b.float()) for a, b in zip(grads[True], grads[False], strict=True)
    ]
    print(f"gated cache {row}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--histories", type=int, nargs="+", default=[24, 237], help="frames (sparse)")
    parser.add_argument("--gated-histories", type=int, nargs="+", default=[18, 60, 237], help="frames")
    parser.add_argument("--variants", action="store_true", help="sweep the backward kernels' tiles")
    parser.add_argument(
        "--parts", nargs="+", default=["sparse", "selected", "cache", "gated-cache"],
        choices=["sparse", "selected", "cache", "gated-cache"],
    )  # fmt: skip
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    env = environment()
    print(env, flush=True)
    sparse, selected, cache, gated_cache = [], [], [], []
    if "cache" in args.parts:
        cache = [cache_step(frames) for frames in args.histories]
    if "gated-cache" in args.parts:
        gated_cache = [gated_cache_step(frames) for frames in args.gated_histories]
    if "sparse" in args.parts:
        sparse = [sparse_shape(frames * FRAME_TOKENS, 32, args.variants) for frames in args.histories]
    if "selected" in args.parts:
        selected = [selected_shape(frames, args.variants) for frames in args.gated_histories]

    print("\nsparse_attention, 12 heads, top_k 32, bf16 (ms; grad rel err q/k/v max)")
    print("| history | triton fwd | +LSE | triton bwd | bwd/fwd | flex fwd | flex bwd | gather+SDPA | bwd |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sparse:
        print(
            f"| {r['history']} | {r['triton_fwd_ms']:.3f} | {r['triton_fwd_with_lse_ms']:.3f} | "
            f"{r['triton_bwd_ms']:.3f} ({max(r['triton_grad_rel_err']):.1e}) | "
            f"{r['triton_bwd_over_fwd']:.2f}x | "
            f"{r['flex_fwd_ms']:.3f} | {r['flex_bwd_ms']:.3f} ({max(r['flex_grad_rel_err']):.1e}) | "
            f"{r['gather_sdpa_fwd_ms']:.3f} | {r['gather_sdpa_bwd_ms']:.3f} |"
        )
    print("\nselected branch (authors' shapes) and the whole gated layer, bf16 (ms)")
    print(
        "| frames | fwd | fwd+LSE | bwd | bwd/fwd | peak extra MiB | layer fwd | layer train fwd | "
        "layer bwd (peak MiB) | the same, autograd summing the branches |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in selected:
        print(
            f"| {r['frames']} | {r['selected_fwd_ms']:.3f} | {r['selected_fwd_with_lse_ms']:.3f} | "
            f"{r['selected_bwd_ms']:.3f} ({max(r['selected_grad_rel_err']):.1e}) | "
            f"{r['selected_bwd_over_fwd']:.2f}x | "
            f"{r['selected_bwd_peak_extra_mib']:.0f} | {r['layer_fwd_ms']:.3f} | "
            f"{r['layer_train_fwd_ms']:.3f} | "
            f"{r['layer_bwd_ms']:.3f} ({r['layer_bwd_peak_extra_mib']:.0f}) | "
            f"{r['layer_train_fwd_ms_autograd_sum']:.3f} + {r['layer_bwd_ms_autograd_sum']:.3f} "
            f"({r['layer_bwd_peak_extra_mib_autograd_sum']:.0f}; grads differ by "
            f"{max(r['layer_fanout_vs_autograd_rel_err']):.1e}) |"
        )
    print("\none layer's training step through OmniMemCache (attend + backward), bf16")
    print("| history | compact copy ms | whole-history copy ms | kept for backward MiB: compact / whole |")
    print("|---|---|---|---|")
    for r in cache:
        print(
            f"| {r['history']} | {r['compact_step_ms']:.3f} | {r['whole_step_ms']:.3f} | "
            f"{r['compact_kept_mib']:.0f} / {r['whole_kept_mib']:.0f} |"
        )
    print("\none gated layer's training step through GatedCache (attend + backward), bf16")
    print(
        "| history | compact ms | whole-history copy ms | kept MiB: compact / whole | max diff | "
        "autograd summing the branches: compact / whole ms | grads differ by |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in gated_cache:
        print(
            f"| {r['history']} | {r['compact_step_ms']:.3f} | {r['whole_step_ms']:.3f} | "
            f"{r['compact_kept_mib']:.0f} / {r['whole_kept_mib']:.0f} | {r['max_abs_diff']:.1e} | "
            f"{r['compact_step_ms_autograd_sum']:.3f} / {r['whole_step_ms_autograd_sum']:.3f} | "
            f"{max(r['compact_fanout_vs_autograd_rel_err']):.1e} |"
        )
    if args.json:
        results = dict(environment=env, sparse=sparse, selected=selected, cache=cache)
        results["gated_cache"] = gated_cache
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
