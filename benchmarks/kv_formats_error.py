"""What a quantized history costs in accuracy: the attention output of one chunk over a history
stored in fp8 / int4 (``omnimem.store.formats``: quantize, then dequantize, then attend),
against the same call over the native (bf16) history, with the same selection.

Keys and values come from a Wan2.1-1.3B-shaped block (``wan_block.py``, random weights, bf16):
its q/k/v projection, RMS-normed q/k and rotary positions, over random input tokens. Two calls:

- ``sparse_attention`` at the ``wan2.1-1.3b`` preset (128-token blocks, top 32, sink = first
  frame, local = last chunk): history blocks quantized, the chunk native;
- ``gated_attention`` at the authors' settings: history outside the 3-chunk window quantized,
  the window and the chunk native (re-read at full resolution every pass), block means from
  the native keys.

Selection reads block sums / means taken before quantization, so it is the native call's
(the caches' tests hold them to that); printed beside it, the share of history blocks that
selection from the dequantized keys would have attended differently, which is why it does
not. Printed: relative L2 error of each output against the native one, per format.

    python benchmarks/kv_formats_error.py [--frames 60] [--json out.json]   # GPU
    python benchmarks/kv_formats_error.py --small                           # CPU, short history
    python benchmarks/kv_formats_error.py --cpu --frames 60 --fp8-operands   # CPU, ~10 min

``--fp8-operands`` adds what fp8 tensor cores would cost (``fp8_operands_output``): queries in
e4m3 (the Gluon kernel's ``FP8_KEY_PRODUCTS``), and probabilities in e4m3 too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from wan_block import WanBlock, rope_tables

from omnimem import GatedConfig, OmniMemConfig, gated_attention, pool_kv, select_blocks, sparse_attention
from omnimem.backends.quantized_attention import fp8_queries
from omnimem.selection import token_mask_mod
from omnimem.store.formats import dequantize, quantize

FRAME = 1560


def kv_of_block(block: WanBlock, tokens: int, chunk: int, device, dtype, gen):
    """q of the last ``chunk`` tokens and k, v of all ``tokens`` ([B, H, L, D]), made the way the
    block makes them (projection, RMS norm, rotary positions)."""
    from wan_block import apply_rope

    ks, vs = [], []
    for start in range(0, tokens, chunk):
        x = torch.randn(1, min(chunk, tokens - start), block.self_qkv.in_features, device=device,
                        generator=gen).to(dtype)  # fmt: skip
        q, k, v = block.self_qkv(x).chunk(3, dim=-1)
        rope = rope_tables(torch.arange(start, start + x.shape[1], device=device), block.head_dim)
        q = apply_rope(block.heads_of(block.self_norm_q(q)), rope)
        ks.append(apply_rope(block.heads_of(block.self_norm_k(k)), rope))
        vs.append(block.heads_of(v))
    return q.transpose(1, 2), torch.cat(ks, 1).transpose(1, 2), torch.cat(vs, 1).transpose(1, 2)


def stored(x: torch.Tensor, kv_format: str, role: str, block_size: int, keep_from: int) -> torch.Tensor:
    """``x`` with ``[0, keep_from)`` (whole blocks) quantized and dequantized, the rest as is."""
    cut = keep_from - keep_from % block_size
    if kv_format == "native" or cut == 0:
        return x
    q = quantize(x[:, :, :cut], kv_format, role=role, block_size=block_size)
    return torch.cat([dequantize(q, x.dtype), x[:, :, cut:]], dim=2)


def fp8_operands_output(q, k, v, ks, vs, selection, *, history, chunk, block_size,
                        e4m3_queries: bool, e4m3_probabilities: bool, rows: int = 1170):  # fmt: skip
    """What fp8 tensor cores would compute over the sparse call's quantized (fp8) history: its
    whole blocks' scores from queries in e4m3 (``fp8_queries``: a scale a query row; the Gluon
    kernel's ``FP8_KEY_PRODUCTS``) against the keys' codes, their probabilities in e4m3
    (``e4m3_probabilities``; times 2**8 so that [0, 1] keeps e4m3's normal range) against the
    values' codes; the partial block and the chunk as today (native keys, bf16 queries).
    Float32, the softmax over the final row maximum (a kernel's running maximum rounds the same
    values relative to a smaller maximum)."""
    cut = history - history % block_size
    mask_mod = token_mask_mod(selection, num_q_heads=q.shape[1], chunk_len=chunk)
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    kv = torch.arange(k.shape[2], device=q.device)
    for h in range(q.shape[1]):
        kh = torch.cat([ks[0, h, :cut], k[0, h, cut:]]).float()
        vh = torch.cat([vs[0, h, :cut], v[0, h, cut:]]).float()
        for r in range(0, q.shape[2], rows):
            qr = q[0, h, r : r + rows].float()
            qi = torch.arange(r, r + qr.shape[0], device=q.device)
            s = qr @ kh.T
            if e4m3_queries:
                s[:, :cut] = fp8_queries(qr) @ kh[:cut].T
            s = s / q.shape[-1] ** 0.5
            s = s.masked_fill(~mask_mod(0, h, qi[:, None], kv[None, :]), float("-inf"))
            p = torch.exp(s - s.amax(-1, keepdim=True))
            total = p.sum(-1, keepdim=True)
            if e4m3_probabilities:
                p[:, :cut] = (p[:, :cut] * 256).to(torch.float8_e4m3fn).float() / 256
            out[0, h, r : r + rows] = (p @ vh) / total
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=60, help="history in latent frames")
    parser.add_argument("--small", action="store_true", help="CPU: 12 frames of history")
    parser.add_argument("--cpu", action="store_true", help="on the CPU at --frames (slow)")
    parser.add_argument("--fp8-operands", action="store_true",
                        help="also: fp8 tensor cores' error (queries, probabilities in e4m3)")  # fmt: skip
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    on_cpu = args.small or args.cpu
    device = torch.device("cpu" if on_cpu else "cuda")
    frames = 12 if args.small else args.frames
    dtype = torch.bfloat16
    torch.manual_seed(0)
    block = WanBlock.wan_1_3b().to(device, dtype)
    chunk = 3 * FRAME
    history = frames * FRAME
    gen = torch.Generator(device=device).manual_seed(1)
    with torch.no_grad():
        q, k, v = kv_of_block(block, history + chunk, chunk, device, dtype, gen)
        rows = []
        sparse = OmniMemConfig.preset("wan2.1-1.3b", backend="gather" if on_cpu else "auto")
        selection = select_blocks(q, k, history_len=history, chunk_len=chunk, config=sparse)
        want = sparse_attention(
            q, k, v, history_len=history, chunk_len=chunk, config=sparse, selection=selection
        )
        gated = GatedConfig(backend="gather" if on_cpu else "auto")
        pooled = pool_kv(k, v, seq_len=history + chunk, block_size=gated.block_size)
        gates = torch.full((*q.shape[:3], 3), 0.5, device=device, dtype=dtype)
        want_g = gated_attention(q, k, v, gates, history_len=history, config=gated, pooled=pooled)
        window_start = max(0, history + chunk - gated.window_tokens)
        for kv_format in ("fp8", "int4"):
            ks = stored(k, kv_format, "key", sparse.block_size, history)
            vs = stored(v, kv_format, "value", sparse.block_size, history)
            # What selection scored from the dequantized keys would pick (the caches never do).
            again = select_blocks(q, ks, history_len=history, chunk_len=chunk, config=sparse)
            moved = 1.0 - float((again.kv_block_idx == selection.kv_block_idx).float().mean())
            got = sparse_attention(
                q, ks, vs, history_len=history, chunk_len=chunk, config=sparse, selection=selection
            )
            kg = stored(k, kv_format, "key", gated.block_size, window_start)
            vg = stored(v, kv_format, "value", gated.block_size, window_start)
            got_g = gated_attention(q, kg, vg, gates, history_len=history, config=gated, pooled=pooled)
            row = dict(format=kv_format, frames=frames, sparse_rel_l2=rel(got, want),
                       gated_rel_l2=rel(got_g, want_g),
                       selection_moved_if_scored_quantized=moved)  # fmt: skip
            if kv_format == "fp8" and args.fp8_operands:
                common = dict(history=history, chunk=chunk, block_size=sparse.block_size)
                for name, fq, fp in (("emulated", False, False), ("fp8_queries", True, False),
                                     ("fp8_queries_and_probabilities", True, True)):  # fmt: skip
                    emulated = fp8_operands_output(q, k, v, ks, vs, selection, e4m3_queries=fq,
                                                   e4m3_probabilities=fp, **common)  # fmt: skip
                    row[f"sparse_rel_l2_{name}"] = rel(emulated, want)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(
        f"\n| format | sparse_attention rel. L2 vs bf16 | gated_attention rel. L2 vs bf16 "
        f"| table entries that quantized scores would move ({frames} frames of history) |"
    )
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['sparse_rel_l2']:.2%} | {r['gated_rel_l2']:.2%} | "
              f"{r['selection_moved_if_scored_quantized']:.2%} |")  # fmt: skip
    for r in rows:
        if "sparse_rel_l2_emulated" in r:
            print(
                f"\nfp8 tensor cores, emulated in float32 ({frames} frames; sparse_attention rel. L2 vs "
                f"bf16): the emulation itself {r['sparse_rel_l2_emulated']:.2%} (the kernel's "
                f"{r['sparse_rel_l2']:.2%}), queries in e4m3 {r['sparse_rel_l2_fp8_queries']:.2%}, "
                f"queries and probabilities in e4m3 {r['sparse_rel_l2_fp8_queries_and_probabilities']:.2%}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows), indent=1))


if __name__ == "__main__":
    main()
