"""The gated layer's dense branches: cuDNN and flash SDPA against omnimem's Hopper kernel (GPU).

Why the compressed and window branches run SDPA (docs/gated.md, "How far each piece is from its
floor"): the warp-specialized Gluon kernel of the ``triton`` backend
(``backends/gluon_attention.py``) can attend a contiguous range of keys, given an empty block
table and the range as its "chunk", so it is a candidate for both. At the authors' shapes (B=1,
H=12, D=128, bf16, 4,680 queries): the window branch attends 14,040 keys of ``[B, L, H, D]``
storage; the compressed branch attends ``ceil(seq / 30)`` block means of ``[B, H, L, D]``
storage, for 18 frames to 5 minutes of history. Each kernel is checked against float64 SDPA,
then timed with ``do_bench`` (eager: host work included) and replayed from a CUDA graph (GPU
time); TFLOP/s from the better of the two.

    python benchmarks/dense_branches_gpu.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from attention_gpu import FRAME_TOKENS, bench, environment, graph_ms
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnimem.backends.gated_branches import _hopper_dense
from omnimem.backends.gluon_attention import skip_reason

HEADS, HEAD_DIM, CHUNK, WINDOW = 12, 128, 3 * FRAME_TOKENS, 14040
SCALE = HEAD_DIM**-0.5


def hopper_dense(q, k, v, start: int, length: int, stages: int):
    """Keys ``[start, start + length)`` through the scattered kernel: no history blocks (what
    the gated layer's dense branches run from ``HOPPER_MIN_KEYS`` keys)."""
    end = start + length
    return _hopper_dense(q, k[:, :, start:end], v[:, :, start:end], SCALE, stages=stages)


def cases():
    """``(name, q, k, v, start, length)`` at the authors' shapes."""
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)

    q = randn(1, CHUNK, HEADS, HEAD_DIM).transpose(1, 2)
    for frames in (18, 237):
        seq = frames * FRAME_TOKENS + CHUNK
        k, v = (randn(1, seq, HEADS, HEAD_DIM).transpose(1, 2) for _ in range(2))
        yield f"window, {frames} frames", q, k, v, seq - WINDOW, WINDOW
    for frames in (18, 60, 237, 1200):
        means = math.ceil((frames * FRAME_TOKENS + CHUNK) / 30)
        k, v = (randn(1, HEADS, means, HEAD_DIM) for _ in range(2))
        yield f"compressed, {frames} frames", q, k, v, 0, means


def measure(name: str, q, k, v, start: int, length: int) -> dict:
    keys, values = k[:, :, start : start + length], v[:, :, start : start + length]
    reason = skip_reason(q, keys, values, block_size=128, grouped=False)
    if reason:
        raise SystemExit(f"{name}: the Hopper kernel cannot run here: {reason}")
    row = dict(name=name, keys=length)

    def sdpa():
        return F.scaled_dot_product_attention(q, keys, values, scale=SCALE)

    if length <= 20_000:  # float64 reference
        want = F.scaled_dot_product_attention(q.double(), keys.double(), values.double(), scale=SCALE)
        row["max_err_hopper"] = (hopper_dense(q, k, v, start, length, 3).double() - want).abs().max().item()
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            row["max_err_cudnn"] = (sdpa().double() - want).abs().max().item()
        assert row["max_err_hopper"] < 4 * row["max_err_cudnn"] + 1e-3, row
    for label, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel(backend):
            row[label], row[f"{label} graph"] = bench(sdpa), graph_ms(sdpa)
    for stages in (2, 3):

        def hopper(s=stages):
            return hopper_dense(q, k, v, start, length, s)

        row[f"hopper s{stages}"], row[f"hopper s{stages} graph"] = bench(hopper), graph_ms(hopper)
    flop = 4 * CHUNK * length * HEAD_DIM * HEADS
    for label in ("cudnn", "hopper s3"):
        row[f"{label} TFLOP/s"] = flop / min(row[label], row[f"{label} graph"]) / 1e9
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    env = environment()
    print(json.dumps(env), flush=True)
    rows = []
    for case in cases():
        rows.append(measure(*case))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, rows=rows), f, indent=1)
    print(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}; ms eager / graph")
    print("| branch | keys | cuDNN | flash | Hopper kernel, 2 stages | 3 stages | TFLOP/s cuDNN / Hopper |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[x]:.3f} / {r[x + ' graph']:.3f}" for x in ("cudnn", "flash", "hopper s2", "hopper s3")]
        print(
            f"| {r['name']} | {r['keys']:,} | " + " | ".join(cells)
            + f" | {r['cudnn TFLOP/s']:.0f} / {r['hopper s3 TFLOP/s']:.0f} |"
        )  # fmt: skip


if __name__ == "__main__":
    main()
