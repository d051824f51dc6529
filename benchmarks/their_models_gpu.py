"""Each codebase's own model class at its real shapes, one step at 60 s: theirs vs patched (GPU).

``codebases_gpu.py`` times every codebase's attention pattern on omnimem's own Wan blocks; this
script runs *their* ``CausalWanModel`` (imported from a checkout, never copied here) the way
their inference loop calls it: random weights (their init), random latents and text embeddings
(text encoder and VAE stubbed), their cache dicts as their pipeline allocates them. A history of
60 s is written by their loop's own calls (one clean call a chunk), then one step is timed:
their denoising passes and the clean pass at the next chunk (Rolling Forcing: a 5-block window,
then its first block again with ``updating_cache=True``). The same model is then patched
(``patch_causal_wan``, the ``wan2.1-1.3b`` preset: 32 blocks of 128, a one-frame sink, a
one-chunk window), the history written again through the patched model, and the step timed again.

Their attention calls (``flash_attention``/``attention``; flash-attn is not required) go to
``F.scaled_dot_product_attention`` under their contract, as their own fallback does. Each
codebase runs in its own process (their packages share names such as ``wan``).

``--theirs DIR`` holds one checkout (or an export of the files named below) per codebase:

    DIR/self-forcing     guandeh17/Self-Forcing      33593df   wan/
    DIR/causvid          tianweiy/CausVid            ca21150   causvid/
    DIR/longlive         NVlabs/LongLive             7b56712   wan/, utils/   (its Wan2.1-1.3B model)
    DIR/longlive2        NVlabs/LongLive             7860ad9   wan_5b/, utils/
    DIR/rolling-forcing  TencentARC/RollingForcing   a1477d0   wan/

(the commits read on 2026-12-07; e.g. ``git -C LongLive archive 7b56712 wan utils | tar -x -C
DIR/longlive``).

    python benchmarks/their_models_gpu.py --theirs DIR [--layers 30] [--only NAME ...] [--json F]
    python benchmarks/their_models_gpu.py --theirs DIR --smoke   # CPU, tiny shapes: it runs
    python benchmarks/their_models_gpu.py --theirs DIR --check   # CPU, tiny: patched == theirs

``--check`` (CPU, tiny shapes, all weights random: their init zeroes the output head) keeps two
chunks of history, which every codebase's own window holds whole, and patches at full budget
(every block retrieved, no sink or window of omnimem's, the dense backend): every call's output
must then equal theirs to within a bf16 unit in the last place of its largest value (exit 1
otherwise).

Packages their model files import that the machine lacks (``diffusers``' mixins,
``transformers``) are replaced by empty stand-ins; their package ``__init__`` files (which load
T5, the VAE, ...) are skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class Spec:
    """One codebase: where its model is, its shapes and settings, and its loop's step."""

    root: str  # folder under --theirs
    module: str  # the module holding CausalWanModel
    model: dict  # constructor arguments beyond the shared ones
    latent: tuple[int, int, int]  # channels, height, width of a latent frame
    fps: int  # latent frames a second
    chunk_frames: int  # frames a call generates (Rolling Forcing: a block)
    passes: int  # forwards a step at one start (denoising + clean)
    cache_frames: int | None  # their cache dict's frames (None: the whole history, dense)
    window_blocks: int = 1  # Rolling Forcing: blocks in its denoising window
    end_argument: bool = False  # CausVid passes current_end
    extra_cache: tuple[str, ...] = ()  # LongLive-2.0's dict fields
    bare: tuple[str, ...] = ()  # more packages whose __init__ would load the whole codebase


WAN_1_3B = dict(dim=1536, ffn_dim=8960, num_heads=12, freq_dim=256, text_dim=4096, in_dim=16, out_dim=16)
WAN_5B = dict(dim=3072, ffn_dim=14336, num_heads=24, freq_dim=256, text_dim=4096, in_dim=48, out_dim=48)
SPECS = {
    "Self-Forcing": Spec(
        "self-forcing",
        "wan.modules.causal_model",
        # its rolling window (local_attn_size, in frames; the default -1 never rolls: its cache
        # of 21 frames overflows at the 22nd) over the 21 frames its pipeline caches
        dict(WAN_1_3B, local_attn_size=21, sink_size=0),
        (16, 60, 104),
        4,
        3,
        5,
        21,
    ),
    "CausVid": Spec(
        "causvid",
        "causvid.models.wan.causal_model",
        WAN_1_3B,
        (16, 60, 104),
        4,
        3,
        5,
        None,
        end_argument=True,
        bare=("causvid.models.wan.wan_base", "causvid.models.wan.wan_base.modules"),
    ),
    "LongLive": Spec(
        "longlive",
        "wan.modules.causal_model",
        dict(WAN_1_3B, local_attn_size=12, sink_size=3),
        (16, 60, 104),
        4,
        3,
        5,
        12,
    ),
    "LongLive-2.0": Spec(
        "longlive2",
        "wan_5b.modules.causal_model",
        dict(WAN_5B, local_attn_size=32, sink_size=8, num_frame_per_block=8),
        (48, 44, 80),
        6,
        8,
        5,
        32,
        extra_cache=("pinned",),
    ),
    "Rolling Forcing": Spec(
        "rolling-forcing", "wan.modules.causal_model", WAN_1_3B, (16, 60, 104), 4, 3, 1, 24, window_blocks=5
    ),
}


class _EasyDict(dict):  # easydict's attribute access, for the configs CausVid's package builds
    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as error:
            raise AttributeError(key) from error

    __setattr__ = dict.__setitem__


STUBS = {  # module: attributes, for packages their model files import at module level
    "diffusers.configuration_utils": dict(
        ConfigMixin=type("ConfigMixin", (), {}), register_to_config=lambda f: f
    ),
    "diffusers.models.modeling_utils": dict(ModelMixin=torch.nn.Module),
    "transformers.models.x_clip.modeling_x_clip": dict(x_clip_loss=None),
    "easydict": dict(EasyDict=_EasyDict),
}


def stub_missing() -> None:
    for name, attributes in STUBS.items():
        try:
            if importlib.util.find_spec(name) is not None:
                # installed, but perhaps another version: add what their import needs only
                # (the device's transformers has no x_clip_loss)
                module = importlib.import_module(name)
                for key, value in attributes.items():
                    if not hasattr(module, key):
                        setattr(module, key, value)
                continue
        except ModuleNotFoundError:
            pass
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        vars(sys.modules[name]).update(attributes)


def sdpa(
    q,
    k,
    v,
    q_lens=None,
    k_lens=None,
    dropout_p=0.0,
    softmax_scale=None,
    q_scale=None,
    causal=False,
    window_size=(-1, -1),
    deterministic=False,
    dtype=torch.bfloat16,
    version=None,
    **_,
):
    """Their ``flash_attention``'s contract ([B, L, N, D]; ``k_lens`` masks keys) through SDPA."""
    if causal or window_size != (-1, -1):
        raise NotImplementedError("their causal/windowed flash path is not used at inference")
    mask = None
    if k_lens is not None:
        mask = (torch.arange(k.shape[1], device=k.device)[None, :] < k_lens[:, None])[:, None, None, :]
    q, k, v = (x.transpose(1, 2).to(dtype) for x in (q, k, v))
    return (
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale)
        .transpose(1, 2)
        .type_as(q)
    )


def import_theirs(root: Path, module: str, bare: tuple[str, ...] = ()):
    sys.path.insert(0, str(root))
    stub_missing()
    parts = module.split(".")
    for name in [".".join(parts[:i]) for i in range(1, len(parts))] + list(bare):
        package = types.ModuleType(name)  # bare packages: their __init__s import T5, the VAE, ...
        package.__path__ = [str(root.joinpath(*name.split(".")))]
        sys.modules[name] = package
    loaded = importlib.import_module(module)
    for name, mod in list(sys.modules.items()):
        if name.split(".")[0] == parts[0]:
            for attribute in ("flash_attention", "attention"):
                if isinstance(getattr(mod, attribute, None), types.FunctionType):
                    setattr(mod, attribute, sdpa)
    return loaded


def their_caches(spec: Spec, model, layers: int, history: int, frame: int, device, dtype):
    """The dicts their pipeline's ``_initialize_kv_cache`` / ``_initialize_crossattn_cache`` make."""
    heads, head_dim = model.num_heads, model.dim // model.num_heads
    tokens = (
        history + spec.window_blocks * spec.chunk_frames * frame
        if spec.cache_frames is None
        else (spec.cache_frames * frame)
    )
    index = lambda value: torch.tensor([value], dtype=torch.long, device=device)  # noqa: E731
    kv, cross = [], []
    for _ in range(layers):
        entry = dict(
            k=torch.zeros(1, tokens, heads, head_dim, dtype=dtype, device=device),
            v=torch.zeros(1, tokens, heads, head_dim, dtype=dtype, device=device),
            global_end_index=index(0),
            local_end_index=index(0),
        )
        if spec.extra_cache:  # LongLive-2.0, unquantized
            block = spec.chunk_frames * frame
            entry.update(
                quantized=False,
                block_token_size=block,
                max_blocks=tokens // block,
                num_heads=heads,
                num_filled_blocks=0,
                pinned_start=index(-1),
                pinned_len=index(0),
            )
        kv.append(entry)
        cross.append(
            dict(
                k=torch.zeros(1, 512, heads, head_dim, dtype=dtype, device=device),
                v=torch.zeros(1, 512, heads, head_dim, dtype=dtype, device=device),
                is_init=False,
            )
        )
    return kv, cross


def run_one(name: str, args) -> dict:
    spec = SPECS[name]
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.bfloat16  # their attention casts to bf16 (its default dtype)
    if args.smoke:  # their imports ask for a GPU; LongLive-2.0's Triton RoPE/adaLN have eager twins
        torch.cuda.current_device = lambda: 0
        os.environ.update(LLV2_TRITON_ROPE="0", LLV2_TRITON_ADALN="0")
    theirs = import_theirs(Path(args.theirs) / spec.root, spec.module, spec.bare)
    from self_forcing_rollout_gpu import peak_gib, per_chunk_ms

    from omnimem import patch_causal_wan  # after theirs: omnimem never imports their packages

    shape, latent, seconds = dict(spec.model), spec.latent, 60
    if args.smoke:  # tiny: a 2x2-token frame, 2 heads of 32, a few seconds
        shape.update(dim=64, ffn_dim=128, num_heads=2, freq_dim=32, text_dim=16)
        latent, seconds = (shape["in_dim"], 4, 4), args.smoke_seconds
    frame = latent[1] * latent[2] // 4
    chunk = spec.chunk_frames * frame
    history_frames = seconds * spec.fps // spec.chunk_frames * spec.chunk_frames
    if args.check:  # two chunks: every codebase's own window then holds the whole video
        history_frames = 2 * spec.chunk_frames
    history = history_frames * frame
    # bf16 K and V a layer: omnimem's history (with 10% for its block sums and staging), and
    # theirs (their window, or the whole video for CausVid), which may not be freed before
    # omnimem's is allocated (their model may keep a reference): both must fit at once
    tokens = history + spec.window_blocks * chunk
    theirs_tokens = tokens if spec.cache_frames is None else spec.cache_frames * frame
    per_layer = 2 * (1.1 * tokens + theirs_tokens) * shape["dim"] * 2
    layers = args.layers
    if device.type == "cuda":  # beside the weights and activations
        free = torch.cuda.mem_get_info()[0] - (12 << 30) * (2 if spec.model is WAN_5B else 1)
        layers = max(1, min(layers, int(free // per_layer)))
    parameters = inspect.signature(theirs.CausalWanModel.__init__).parameters
    kwargs = {k: v for k, v in shape.items() if k in parameters}
    with torch.device(device):
        model = (
            theirs.CausalWanModel(
                model_type="t2v",
                patch_size=(1, 2, 2),
                text_len=512 if not args.smoke else 8,
                num_layers=layers,
                **kwargs,
            )
            .eval()
            .requires_grad_(False)
            .to(dtype)
        )
    if args.check:  # their init zeroes the output head: random weights everywhere instead
        for prm in model.parameters():
            prm.normal_(0, 0.1, generator=torch.Generator(device=device).manual_seed(prm.numel()))
    model.num_frame_per_block = spec.chunk_frames
    for module in model.modules():  # Rolling Forcing's hard-coded 1,560-token frames (tiny shapes)
        if args.smoke and hasattr(module, "block_length"):
            module.frame_length, module.block_length = frame, 3 * frame
            module.max_attention_size = 21 * frame
    gen = torch.Generator(device=device).manual_seed(0)
    context = torch.randn(
        1, 512 if not args.smoke else 8, shape["text_dim"], device=device, dtype=dtype, generator=gen
    )
    latents = {
        n: torch.randn(1, latent[0], n, latent[1], latent[2], device=device, dtype=dtype, generator=gen)
        for n in {spec.chunk_frames, spec.window_blocks * spec.chunk_frames}
    }
    meta = getattr(theirs, "_CURRENT_GRID_META", None)

    outputs: dict[str, list[torch.Tensor]] = {"theirs": [], "omnimem": []}
    label = "theirs"

    def call(kv, cross, frames: int, start: int, t: float, **extra) -> None:
        if meta is not None and "global_end_index" in kv[0]:  # LongLive-2.0's wrapper, before a call
            meta.update(
                global_end_index=int(kv[0]["global_end_index"].item()),
                local_end_index=int(kv[0]["local_end_index"].item()),
                pinned_start=-1,
                pinned_len=0,
            )
        if spec.end_argument:
            extra["current_end"] = start + frames * frame
        else:  # their wrappers pass cache_start=None (the layer then takes current_start)
            extra["cache_start"] = None
        out = model(
            latents[frames],
            t=torch.full((1, frames), t, device=device),
            context=context,
            seq_len=frames * frame,
            kv_cache=kv,
            crossattn_cache=cross,
            current_start=start,
            **extra,
        )
        if args.check:  # their models return the video tensor(s) first
            outputs[label].append((out[0] if isinstance(out, (list, tuple)) else out).float().cpu())

    def fill(kv, cross) -> None:  # their loop over the minute: one clean call a chunk
        for c in range(history_frames // spec.chunk_frames):
            call(kv, cross, spec.chunk_frames, c * chunk, 0.0)
            if spec.window_blocks > 1:
                call(kv, cross, spec.chunk_frames, c * chunk, 0.0, updating_cache=True)

    def step(kv, cross) -> None:
        if spec.window_blocks > 1:  # the window at staggered noise, then its first block clean
            call(kv, cross, spec.window_blocks * spec.chunk_frames, history, 500.0)
            call(kv, cross, spec.chunk_frames, history, 0.0, updating_cache=True)
            return
        for p in range(spec.passes):
            call(kv, cross, spec.chunk_frames, history, 500.0 if p < spec.passes - 1 else 0.0)

    row = dict(codebase=name, layers=layers, history_frames=history_frames, history=history, frame=frame)
    with torch.no_grad():
        for label in ("theirs", "omnimem"):
            if label == "omnimem":
                # --check: every block retrieved (full budget), no sink or window of omnimem's,
                # the exact dense backend: the same attention as theirs over the whole video
                tiny = dict(block_size=4, backend="dense" if args.check else "gather")
                top_k = 64 if args.check else 2 if args.smoke else 32
                patch_causal_wan(
                    model,
                    max_frames=history_frames + spec.window_blocks * spec.chunk_frames,
                    max_chunk_frames=spec.window_blocks * spec.chunk_frames,
                    top_k=top_k,
                    **(
                        dict(tiny, sink_tokens=0, local_tokens=0)
                        if args.check
                        else tiny
                        if args.smoke
                        else {}
                    ),
                )
            kv, cross = their_caches(spec, model, layers, history, frame, device, dtype)
            fill(kv, cross)
            if args.check:
                step(kv, cross)
                continue
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            row[f"{label}_ms"] = per_chunk_ms(lambda kv=kv, cross=cross: step(kv, cross), args.reps)
            row[f"{label}_peak_gib"] = peak_gib()
            row[f"{label}_used_omnimem"] = any("omnimem" in layer for layer in kv)
            del kv, cross
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.check:  # the largest difference of any call's output, relative to its largest value
        pairs = zip(outputs["theirs"], outputs["omnimem"], strict=True)
        row["relative_differences"] = [float((a - b).abs().max() / a.abs().max()) for a, b in pairs]
        row["max_relative_difference"] = max(row["relative_differences"])
        return row
    row["omnimem_vs_theirs"] = row["omnimem_ms"] / row["theirs_ms"]
    if row["theirs_used_omnimem"] or not row["omnimem_used_omnimem"]:
        raise RuntimeError(f"{name}: the patch did not take (or took before it was applied): {row}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--theirs", required=True, help="a folder of their checkouts (see above)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=list(SPECS), default=list(SPECS))
    parser.add_argument("--child-timeout", type=float, default=240, help="seconds for one codebase")
    parser.add_argument("--one", choices=list(SPECS), help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument(
        "--smoke-seconds", type=int, default=6,
        help="--smoke's video (6: 24 frames, past the 21 frames their rolling caches hold)",
    )  # fmt: skip
    parser.add_argument(
        "--check", action="store_true", help="CPU, tiny: patched at full budget equals theirs"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    args.smoke |= args.check
    if args.smoke:
        args.layers, args.reps = 2, 1
    if args.one:
        print("ROW " + json.dumps(run_one(args.one, args)), flush=True)
        return
    rows = []
    for name in args.only:  # one process each: their packages share names
        argv = [
            sys.executable,
            __file__,
            "--theirs",
            args.theirs,
            "--layers",
            str(args.layers),
            "--reps",
            str(args.reps),
            "--smoke-seconds",
            str(args.smoke_seconds),
            "--one",
            name,
        ] + (["--check"] if args.check else ["--smoke"] if args.smoke else [])
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=args.child_timeout)
        except subprocess.TimeoutExpired:
            print(f"{name}: over {args.child_timeout} s, stopped", flush=True)
            rows.append(dict(codebase=name, error=f"over {args.child_timeout} s"))
            continue
        lines = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
        if done.returncode or not lines:
            print(f"{name}: failed (rc {done.returncode})\n{done.stderr[-3000:]}", flush=True)
            rows.append(dict(codebase=name, error=done.stderr[-3000:]))
            continue
        rows.append(json.loads(lines[-1]))
        print(lines[-1], flush=True)
    if args.check:
        print("\n| codebase | largest difference of a call's output / its largest value |\n|---|---|")
        for r in rows:
            print(f"| {r['codebase']} | {r.get('max_relative_difference', 'failed')} |")
        # bf16 outputs: one unit in the last place of the largest value is 2**-8 to 2**-7 of it
        if any(r.get("max_relative_difference", 1.0) > 2**-7 for r in rows):
            sys.exit("a patched model differs from theirs by more than a bf16 ulp of its output")
        return
    from codebases_gpu import report

    cuda = torch.cuda.is_available() and not args.smoke
    report(rows, cuda, "their model classes, one step at 60 s", args.json)


if __name__ == "__main__":
    main()
