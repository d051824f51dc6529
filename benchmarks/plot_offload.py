"""Plot GPU memory and step time vs history from ``offload_gpu.py --json`` results (CPU; matplotlib).

Usage: ``python benchmarks/plot_offload.py results.json --out plot.png``
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

GPU_GIB = 79.2  # an H100 80GB's usable memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with open(args.results) as fh:
        data = json.load(fh)
    rows, env = data["rows"], data["env"]
    seconds = [r["seconds"] for r in rows]
    fig, (memory, time) = plt.subplots(1, 2, figsize=(10, 4))
    memory.plot(
        seconds, [r["history_kv_gib"] for r in rows], "o--", label="KV of the history (resident cache)"
    )
    memory.plot(seconds, [r["peak_gpu_gib"] for r in rows], "o-", label="peak GPU memory, offloaded")
    memory.axhline(GPU_GIB, color="grey", linewidth=1)
    memory.text(seconds[0], GPU_GIB + 2, "H100 memory", color="grey")
    memory.set(xlabel="seconds of video in the history", ylabel="GiB", title="30 layers, wan-1.3b shapes")
    memory.legend(loc="center right")
    time.plot(seconds, [r["first_step_ms"] for r in rows], "o-", label="first denoising step of a chunk")
    time.plot(seconds, [r["later_step_ms"] for r in rows], "o-", label="later steps")
    time.set(xlabel="seconds of video in the history", ylabel="ms per step (30 layers)", ylim=(0, None))
    time.set_title("offloaded attention, all layers")
    time.legend(loc="lower right")
    fig.suptitle(f"{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
