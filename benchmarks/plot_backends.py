"""Plot attention time vs history length from ``backends_gpu.py --json`` results (CPU; matplotlib).

Usage: ``python benchmarks/plot_backends.py results.json [--top-k 32] [--heads 12] --out plot.png``
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SERIES = [
    ("triton_ms", "omnimem triton (scattered, in place; Gluon on Hopper)"),
    ("triton_kernel_ms", "omnimem Triton-language kernel"),
    ("flex_ms", "omnimem flex (BlockMask)"),
    ("gather_ms", "omnimem gather (masked SDPA)"),
    ("gather_cudnn_ms", "peer: gather + cuDNN SDPA"),
    ("contiguous_cudnn_ms", "cuDNN on pre-gathered tokens (ceiling)"),
    ("dense_cudnn_ms", "dense cuDNN SDPA, full history"),
    ("dense_fa2_ms", "dense FA2, full history"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with open(args.results) as fh:
        data = json.load(fh)
    rows = sorted(
        (r for r in data["rows"] if r["top_k"] == args.top_k and r["heads"] == args.heads),
        key=lambda r: r["history"],
    )
    env = data["env"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    tokens = [r["history"] for r in rows]
    for key, label in SERIES:
        if key not in rows[0]:  # older result files
            continue
        ax.plot(
            tokens,
            [r[key] for r in rows],
            marker="o",
            label=label,
            linestyle="--" if "dense" in key else "-",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    names = {37440: "10 s", 369720: "60 s", 1872000: "5 min"}  # DESIGN.md section 4
    ax.set_xticks(tokens, [f"{t:,}\n{names.get(t, '')}" for t in tokens], fontsize=8)
    ax.set_xlabel("history tokens (video length)")
    ax.set_ylabel("attention ms per layer and step")
    ax.set_title(
        f"wan-1.3b (H={args.heads}, D=128, bf16, Lq=4680), top_k={args.top_k}\n"
        f"{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
