"""``omnimem demo``: roll the built-in causal video DiT out with OmniMem, dense and truncation.

A synthetic stream whose later chunks now and then return to the first scene. Per chunk it
prints what each memory costs (attended tokens, attention GFLOP, wall time, KV bytes kept on the
device, resident or offloaded) and what it gets (attention error against full attention; at
the revisits, which far frames OmniMem retrieved), and writes a PNG of the same. Weights are
random and the stream is synthetic. CPU defaults finish in well under a minute; ``--device
cuda --frame-size 64 --chunks 60`` scales up.
"""

from __future__ import annotations

import argparse
import sys

import torch

from omnimem.api import resolve_backend
from omnimem.config import OmniMemConfig
from omnimem.demo.model import TinyCausalDiT, TinyDiTConfig
from omnimem.demo.rollout import MODES, Memory, rollout, scene_schedule

# Model sizes: the tiny CPU model, and Wan2.1-1.3B's width, depth and heads with square frames
# of 40 x 40 patches (1,600 tokens, near Wan's 30 x 52 = 1,560).
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(frame_size=16, layers=4, heads=4, dim=128, top_k=8),
    "wan-1.3b": dict(frame_size=80, layers=30, heads=12, dim=1536, top_k=3),
}


def _resolve_sizes(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the unset size options from ``--size`` (default: by device)."""
    size = args.size or ("wan-1.3b" if torch.device(args.device).type == "cuda" else "tiny")
    for name, value in SIZES[size].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.size = size
    return args


def _model_config(args: argparse.Namespace) -> TinyDiTConfig:
    return TinyDiTConfig(
        height=args.frame_size, width=args.frame_size, dim=args.dim, heads=args.heads, layers=args.layers
    )


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chunks", type=int, default=40, help="chunks to generate (3 latent frames each)")
    parser.add_argument(
        "--revisit-every", type=int, default=5, help="from the middle on, every n-th chunk returns to scene 0"
    )
    parser.add_argument(
        "--steps", type=int, default=3, help="denoising steps per chunk (plus one commit pass)"
    )
    parser.add_argument(
        "--size", default=None, choices=list(SIZES),
        help="model and frame sizes: 'tiny' (the CPU default) or 'wan-1.3b' (the CUDA default: 30 "
        "layers, 12 heads x 128, 1,600 tokens per frame); the options below override single values",
    )  # fmt: skip
    parser.add_argument(
        "--frame-size", type=int, default=None, help="latent frame height = width, in patches"
    )
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks of the DiT")
    parser.add_argument("--heads", type=int, default=None, help="attention heads per block")
    parser.add_argument("--dim", type=int, default=None, help="model width (heads x head dim)")
    parser.add_argument(
        "--top-k", type=int, default=None, help="retrieved blocks per head (block = one frame)"
    )
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
    args = _resolve_sizes(args)
    device = torch.device(args.device)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    model_config = _model_config(args)
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
    scenes = scene_schedule(args.chunks, revisit_every=args.revisit_every)
    backend = resolve_backend(config, device, dtype=dtype, head_dim=model_config.head_dim)
    print(
        f"causal DiT '{args.size}' (random weights, synthetic stream): {args.layers} layers x "
        f"{args.heads} heads, {frame} tokens/frame, {chunk} tokens/chunk, {args.chunks} chunks, "
        f"{args.steps} denoising steps + 1 clean pass; {device}, {dtype}\n"
        f"OmniMem ({backend} backend): block = 1 frame, top_k {args.top_k}, sink 1 frame, local window "
        f"1 chunk; truncation: the same sink and local window only; dense: the whole history\n"
        f"scenes: {' '.join(map(str, scenes))}"
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
            scenes=scenes,
            on_chunk=bar.update if bar else None,
        )
        if bar:
            bar.close()
    return results


def _scene0_frames(stats: list, frames_per_chunk: int = 3) -> set[int]:
    return {s.chunk * frames_per_chunk + f for s in stats if s.scene == 0 for f in range(frames_per_chunk)}


def revisits(stats: list) -> list[int]:
    """Chunks that return to scene 0 after other scenes came between."""
    return [s.chunk for s in stats if s.scene == 0 and any(t.scene != 0 for t in stats[: s.chunk])]


def summary(results: dict[str, list]) -> dict[str, float]:
    omni, dense, trunc = results["omnimem"], results["dense"], results["truncated"]
    faster = [o.step_ms < d.step_ms for o, d in zip(omni, dense, strict=True)]
    faster_from = next((i for i in range(len(omni)) if all(faster[i:])), None)
    back = revisits(omni)
    scene0 = _scene0_frames(omni)
    picked = [f for i in back for f in omni[i].retrieved_frames]
    # What a blind pick would give: scene 0's share of the far history each revisit could pick.
    far = [range(3, 3 * i - 3) for i in back]  # after the sink frame, before the local chunk

    def mean(xs: list) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    return dict(
        faster_than_dense_from=faster_from,
        chunks=len(omni),
        error_at_revisits_omnimem=mean([omni[i].attention_error for i in back]),
        error_at_revisits_truncation=mean([trunc[i].attention_error for i in back]),
        revisit_picks_from_scene0=mean([f in scene0 for f in picked]),
        revisit_chance_of_scene0=mean([mean([f in scene0 for f in frames]) for frames in far]),
    )


def print_table(results: dict[str, list]) -> None:
    omni_all, dense_all, trunc_all = results["omnimem"], results["dense"], results["truncated"]
    scene0, back = _scene0_frames(omni_all), set(revisits(omni_all))
    header = (
        "| chunk | scene | history | attended omnimem / dense | GFLOP omnimem / dense | "
        "ms per pass omnimem / dense / trunc | error vs full omnimem / trunc | revisit: far frames "
        "retrieved from scene 0 | device KV MiB omnimem / offloaded / trunc |"
    )
    print("\n" + header)
    print("|" + "---|" * (header.count("|") - 1))
    for omni, dense, trunc in zip(omni_all, dense_all, trunc_all, strict=True):
        picks = omni.retrieved_frames
        retrieved = f"{sum(f in scene0 for f in picks)}/{len(picks)}" if omni.chunk in back else ""
        cells = [
            omni.chunk,
            f"{omni.scene}{' (back)' if omni.chunk in back else ''}",
            omni.history_tokens,
            f"{omni.attended_tokens} / {dense.attended_tokens}",
            f"{omni.attention_gflop:.2f} / {dense.attention_gflop:.2f}",
            f"{omni.step_ms:.1f} / {dense.step_ms:.1f} / {trunc.step_ms:.1f}",
            f"{omni.attention_error:.3f} / {trunc.attention_error:.3f}",
            retrieved,
            f"{omni.kv_device_mib:.1f} / {omni.kv_device_mib_offloaded:.1f} / {trunc.kv_device_mib:.1f}",
        ]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    s = summary(results)
    print(
        f"\nOmniMem's wall time per pass is below dense's from chunk {s['faster_than_dense_from']} of "
        f"{s['chunks']} on. At the returns to scene 0, attention error against full attention: OmniMem "
        f"{s['error_at_revisits_omnimem']:.3f}, truncation {s['error_at_revisits_truncation']:.3f}; "
        f"{100 * s['revisit_picks_from_scene0']:.0f}% of the far frames OmniMem retrieved there are scene "
        f"0's (a blind pick: {100 * s['revisit_chance_of_scene0']:.0f}%). Weights are random and the stream "
        "is synthetic: this shows costs and retrieval, not video quality."
    )


def plot(results: dict[str, list], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (ax_time, ax_error), (ax_work, ax_kv) = axes
    back = revisits(results["omnimem"])
    colors = {"omnimem": "C0", "dense": "C1", "truncated": "C2"}
    for mode, stats in results.items():
        chunk = [s.chunk for s in stats]
        ax_time.plot(chunk, [s.step_ms for s in stats], marker=".", label=mode, color=colors[mode])
        ax_work.plot(chunk, [s.attention_gflop for s in stats], marker=".", label=mode, color=colors[mode])
        if mode != "dense":
            ax_error.plot(
                chunk, [s.attention_error for s in stats], marker=".", label=mode, color=colors[mode]
            )
        label = "omnimem, resident (as dense)" if mode == "omnimem" else mode
        ax_kv.plot(chunk, [s.kv_device_mib for s in stats], label=label, color=colors[mode])
    omni = results["omnimem"]
    ax_kv.plot(
        [s.chunk for s in omni], [s.kv_device_mib_offloaded for s in omni], "--", label="omnimem, offloaded",
        color=colors["omnimem"],
    )  # fmt: skip
    for x in back:
        ax_error.axvline(x, color="grey", alpha=0.3)
    ax_time.set(xlabel="chunk", ylabel="ms per forward pass", title="Wall time (the model, all layers)")
    ax_error.set(
        xlabel="chunk (grey: returns to scene 0)",
        ylabel="|attention - full attention| / |full|",
        title="What the memory loses",
    )
    ax_work.set(xlabel="chunk", ylabel="attention GFLOP per pass", title="Attention work")
    ax_kv.set(xlabel="chunk", ylabel="MiB", title="KV kept on the device")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("omnimem demo: random weights, synthetic stream")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:  # no command: say what there is, and fail like argparse does
        parser.print_help(sys.stderr)
        raise SystemExit(2)
    try:  # size options that do not fit together: a usage error before anything runs
        _model_config(_resolve_sizes(args))
    except ValueError as error:
        parser.error(
            f"demo: {error} (size {args.size!r}: --size sets --frame-size, --layers, --heads, --dim "
            "and --top-k; each given option overrides its value)"
        )
    results = run_demo(args)
    print_table(results)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
