"""The gated selection's kernel chain at the authors' shapes, variant by variant, one device call.

B=1, H=12, D=128, bf16, a 4,680-query chunk, blocks of 30, groups of 15, top 16; histories of
18 / 60 / 237 / 1200 frames of random keys. Every time is a CUDA graph replay
(``triton.testing.do_bench`` median, L2 flushed), and every variant's block table is checked
equal to ``select_groups``' own:

- ``select_groups``: what the layer runs (group queries, pass 1, refine pass; chained by
  programmatic dependent launch on Hopper, two query groups per group-queries program);
- ``chain ...``: the same three kernels launched by hand: with and without PDL (``pdl``: both
  passes wait for their predecessor in-kernel; ``gqtrig``: the group-queries kernel lets pass 1
  start at once), 1 / 2 / 4 / 8 groups per group-queries program, 4-warp group-queries programs;
- ``gq ...``: the group-queries kernel alone; ``two passes alone``: pass 1 + refine.

``--flex-zeroing`` adds what the CPU path of the flex backend does before FlexAttention (values
nobody attends zeroed in a copy, ``omnimem.backends.flex.unattended_values_zeroed``) timed on
CUDA at Wan2.1-1.3B 60 s (blocks of 128, top_k 32), beside flex and triton forwards.

Usage: ``python benchmarks/selection_chain_gpu.py [--histories 237] [--flex-zeroing] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from attention_gpu import FRAME_TOKENS, bench, environment, graph_ms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnimem import GatedConfig, OmniMemConfig, select_blocks, sparse_attention
from omnimem.backends.flex import unattended_values_zeroed
from omnimem.gated.selection import CandidateRule, select_groups
from omnimem.kernels.group_queries import group_queries_and_span
from omnimem.kernels.group_topk import two_pass_topk
from omnimem.pooling import pool_kv

HEADS, HEAD_DIM, CHUNK = 12, 128, 3 * FRAME_TOKENS
SCALE = HEAD_DIM**-0.5
RULE = CandidateRule.of(GatedConfig())  # the authors' current candidates (chunk exclusion)
CHAIN_VARIANTS = {
    "chain, no PDL, 1 group per gq program": dict(gpp=1),
    "chain pdl": dict(gpp=1, pdl=True),
    "chain pdl gqtrig": dict(gpp=1, pdl=True, trig=True),
    **{f"chain gpp={g}": dict(gpp=g) for g in (2, 4, 8)},
    **{f"chain gpp={g} pdl gqtrig": dict(gpp=g, pdl=True, trig=True) for g in (2, 4, 8)},
    "chain gpp=4 gq 4 warps": dict(gpp=4, warps=4),
}


def run_history(frames: int) -> dict:
    history = frames * FRAME_TOKENS
    gen = torch.Generator(device="cuda").manual_seed(history)
    seq = history + CHUNK
    k = torch.randn(1, seq, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    q = torch.randn(1, CHUNK, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, q = k.transpose(1, 2), q.transpose(1, 2)
    seq_len = torch.tensor(seq, device="cuda")
    pooled = pool_kv(k, k, seq_len=seq, block_size=30, num_slots=math.ceil(seq / 30))

    def select():
        return select_groups(
            q, pooled.k, seq_len, query_group_size=15, precision="float32", scale=SCALE,
            use_kernel=True, approx_keys=pooled.k_attn, key_bounds=pooled.k_bounds, rule=RULE,
        )  # fmt: skip

    want = select()
    gq_rule = dict(query_group_size=15, num_kv_heads=HEADS, precision="float32", rule=RULE)

    def chain(gpp=1, warps=2, pdl=False, trig=False):
        pq, end = group_queries_and_span(
            q, seq_len, groups_per_program=gpp, num_warps=warps, pdl_trigger=trig, **gq_rule
        )
        return two_pass_topk(
            pq, pooled.k, end, top_k=16, scale=SCALE, approx_keys=pooled.k_attn, key_bounds=pooled.k_bounds,
            pdl=pdl,
        )  # fmt: skip

    t = {"select_groups": graph_ms(select)}
    for name, options in CHAIN_VARIANTS.items():
        idx, num = chain(**options)
        if not (torch.equal(idx, want.block_idx) and torch.equal(num, want.num_blocks)):
            name += " (TABLE DIFFERS)"
        t[name] = graph_ms(lambda o=options: chain(**o))
    pq_want, end_want = group_queries_and_span(q, seq_len, groups_per_program=1, **gq_rule)
    for gpp in (1, 2, 4, 8):
        for warps in (2, 4):
            pq, end = group_queries_and_span(q, seq_len, groups_per_program=gpp, num_warps=warps, **gq_rule)
            # 4 warps sum a group's rows in another order: float32 rounding may differ.
            same = torch.equal(pq, pq_want) and torch.equal(end, end_want)
            t[f"gq gpp={gpp} w={warps}" + ("" if same else " (rounding differs)")] = graph_ms(
                lambda g=gpp, w=warps: group_queries_and_span(
                    q, seq_len, groups_per_program=g, num_warps=w, **gq_rule
                )
            )
    t["two passes alone"] = graph_ms(
        lambda: two_pass_topk(
            pq_want,
            pooled.k,
            end_want,
            top_k=16,
            scale=SCALE,
            approx_keys=pooled.k_attn,
            key_bounds=pooled.k_bounds,
        ),
    )
    return t


def flex_zeroing() -> dict:
    history = 237 * FRAME_TOKENS
    gen = torch.Generator(device="cuda").manual_seed(1)
    shape = (1, history + CHUNK, HEADS, HEAD_DIM)
    k = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)
    v = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)
    q = torch.randn(1, CHUNK, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    q = q.transpose(1, 2)
    config = OmniMemConfig.preset("wan2.1-1.3b")
    sel = select_blocks(q, k, config=config)

    def flex(values):
        return sparse_attention(q, k, values, selection=sel, backend="flex", config=config)

    return {
        "flex fwd": bench(lambda: flex(v)),
        "zeroing alone": bench(lambda: unattended_values_zeroed(v, sel, chunk_len=CHUNK)),
        "flex fwd + zeroing": bench(lambda: flex(unattended_values_zeroed(v, sel, chunk_len=CHUNK))),
        "triton fwd": bench(
            lambda: sparse_attention(q, k, v, selection=sel, backend="triton", config=config)
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--histories", type=int, nargs="+", default=[18, 60, 237, 1200], help="frames")
    parser.add_argument("--flex-zeroing", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = {"env": environment()}
    for frames in args.histories:
        result[f"{frames}f"] = run_history(frames)
        torch.cuda.empty_cache()
    if args.flex_zeroing:
        result["flex_zeroing_60s"] = flex_zeroing()
    names = list(result[f"{args.histories[0]}f"])
    print("| ms | " + " | ".join(f"{f} frames" for f in args.histories) + " |")
    print("|---" * (len(args.histories) + 1) + "|")
    for name in names:
        cells = " | ".join(f"{result[f'{f}f'].get(name, float('nan')):.4f}" for f in args.histories)
        print(f"| {name} | {cells} |")
    for name, ms in result.get("flex_zeroing_60s", {}).items():
        print(f"flex zeroing, wan-1.3b 60 s: {name}: {ms:.4f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
