"""``omnimem demo``: roll the built-in causal video DiT out with OmniMem, dense and truncation.

Prints a per-chunk table (history tokens, attended tokens, attention and step time, peak
memory, difference to the dense rollout) and writes a PNG of latency and memory per chunk.
CPU defaults finish in about a minute; ``--device cuda --frame-size 64 --chunks 60`` scales up.
"""

from __future__ import annotations

import argparse
import sys

import torch

from omnimem.config import OmniMemConfig
from omnimem.demo.model import TinyCausalDiT, TinyDiTConfig
from omnimem.demo.rollout import MODES, Memory, rollout


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chunks", type=int, default=24, help="chunks to generate (3 latent frames each)")
    parser.add_argument(
        "--steps", type=int, default=3, help="denoising steps per chunk (plus one commit pass)"
    )
    parser.add_argument("--frame-size", type=int, default=16, help="latent frame height = width, in patches")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks of the tiny DiT")
    parser.add_argument("--heads", type=int, default=4, help="attention heads per block")
    parser.add_argument("--dim", type=int, default=128, help="model width (heads x head dim)")
    parser.add_argument("--top-k", type=int, default=8, help="retrieved blocks per head (block = one frame)")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the model runs"
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="%(default)s: float32 on CPU, bfloat16 on GPU",
    )
    parser.add_argument(
        "--backend", default="auto", choices=["auto", "flex", "triton", "gather", "dense"],
        help="omnimem's attention backend (auto: by device, dtype and head dim)",
    )  # fmt: skip
    parser.add_argument("--no-compile", action="store_true", help="eager FlexAttention (no compile time)")
    parser.add_argument("--plot", default="omnimem-demo.png", help="PNG path ('' to skip)")
    parser.add_argument("--seed", type=int, default=0, help="weights and latents seed (they are random)")


def build_parser() -> argparse.ArgumentParser:
    """``omnimem`` with its subcommands (``omnimem --help`` lists them)."""
    parser = argparse.ArgumentParser(
        prog="omnimem",
        description="omnimem: per-head sparse retrieval over the full KV history of AR video models.",
    )
    commands = parser.add_subparsers(dest="command", metavar="command")
    demo = commands.add_parser(
        "demo",
        help=__doc__.splitlines()[0].split(": ", 1)[1],
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_demo_arguments(demo)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The demo's options (``argv`` without the leading ``demo``)."""
    return build_parser().parse_args(["demo", *argv])


def run_demo(args: argparse.Namespace) -> dict[str, list]:
    device = torch.device(args.device)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    model_config = TinyDiTConfig(
        height=args.frame_size, width=args.frame_size, dim=args.dim, heads=args.heads, layers=args.layers
    )
    model = TinyCausalDiT(model_config, seed=args.seed).to(device=device, dtype=dtype).eval()
    frame = model_config.tokens_per_frame
    chunk = frame * model_config.frames_per_chunk
    config = OmniMemConfig(
        block_size=frame,
        top_k=args.top_k,
        sink_tokens=frame,
        local_tokens=chunk,
        backend=args.backend,
        compile=not args.no_compile,
    )
    capacity = args.chunks * chunk
    print(
        f"tiny causal DiT: {args.layers} layers x {args.heads} heads, {frame} tokens/frame, "
        f"{chunk} tokens/chunk, {args.chunks} chunks, {args.steps} denoising steps + 1 commit pass; "
        f"{device}, {dtype}\n"
        f"OmniMem: block = 1 frame, top_k {args.top_k}, sink 1 frame, local window 1 chunk; "
        f"truncation: the same sink and local window only"
    )
    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is a nicety
        tqdm = None
    results = {}
    for mode in MODES:
        # Warm-up on the same static shapes: compile time (once per shape) stays out of the table.
        warm = Memory(mode, model, capacity, config, batch=1, device=device, dtype=dtype)
        rollout(model, warm, chunks=min(2, args.chunks), steps=1, seed=args.seed + 1, dtype=dtype)
        del warm
        memory = Memory(mode, model, capacity, config, batch=1, device=device, dtype=dtype)
        bar = tqdm(total=args.chunks, desc=f"{mode:>9}", file=sys.stderr, leave=False) if tqdm else None
        results[mode] = rollout(
            model,
            memory,
            chunks=args.chunks,
            steps=args.steps,
            seed=args.seed,
            dtype=dtype,
            on_chunk=bar.update if bar else None,
        )
        if bar:
            bar.close()
    return results


def print_table(results: dict[str, list]) -> None:
    dense = results["dense"]
    header = (
        "| chunk | history | attended (omnimem) | attn ms omnimem | attn ms dense | attn ms trunc | "
        "step ms omnimem | step ms dense | peak MiB | diff vs dense omnimem | diff vs dense trunc |"
    )
    print("\n" + header)
    print("|" + "---|" * (header.count("|") - 1))

    def diff(stats, ref) -> float:
        return float((stats.latents - ref.latents).norm() / ref.latents.norm())

    for i, omni in enumerate(results["omnimem"]):
        trunc, ref = results["truncated"][i], dense[i]
        cells = [
            i,
            omni.history_tokens,
            omni.attended_tokens,
            f"{omni.attention_ms:.2f}",
            f"{ref.attention_ms:.2f}",
            f"{trunc.attention_ms:.2f}",
            f"{omni.step_ms:.1f}",
            f"{ref.step_ms:.1f}",
            f"{omni.peak_memory_mib:.0f}",
            f"{diff(omni, ref):.3f}",
            f"{diff(trunc, ref):.3f}",
        ]
        print("| " + " | ".join(str(c) for c in cells) + " |")


def plot(results: dict[str, list], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, stats in results.items():
        history = [s.history_tokens for s in stats]
        ax_time.plot(history, [s.attention_ms for s in stats], marker=".", label=mode)
        ax_mem.plot(history, [s.peak_memory_mib for s in stats], marker=".", label=mode)
    ax_time.set(
        xlabel="history tokens", ylabel="attention ms per forward (all layers)", title="Attention latency"
    )
    device_kind = (
        "GPU allocator peak"
        if any(s.peak_memory_mib for s in stats) and torch.cuda.is_available()
        else "process max RSS"
    )
    ax_mem.set(xlabel="history tokens", ylabel=f"peak memory, MiB ({device_kind})", title="Peak memory")
    for ax in (ax_time, ax_mem):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nwrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:  # no command: say what there is, and fail like argparse does
        parser.print_help(sys.stderr)
        raise SystemExit(2)
    results = run_demo(args)
    print_table(results)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
