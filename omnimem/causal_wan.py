"""One call that puts omnimem into a loaded Self-Forcing-family ``CausalWanModel``.

Self-Forcing and the models built on its code (Krea Realtime's ``CausalInferencePipeline``;
CausVid, which it grew from, calls the same way with ``current_end`` in the last place and no
sink) share Wan2.1's causal DiT: each block's ``self_attn`` is called as ``forward(x, seq_lens,
grid_sizes, freqs, block_mask, kv_cache=None, current_start=0, cache_start=None)``, and their
inference pipeline passes each layer a dict of its own (``kv_cache1[i]``: a 32,760-token window
and two end indices) and calls the model at the chunk's ``current_start`` token for every
denoising pass and once more, at timestep 0, to cache the clean chunk. No call says which pass
is final, so the cache is position-addressed: ``OmniMemCache.attend_at`` writes each pass at
``current_start``; the first pass of the next chunk makes the previous chunk history.

The authors' OmniMem model (``CausalWanNSAModel``: three-branch ``CausalNSSelfAttention``
layers with learned gates) takes the same call: each such layer is replaced by
[`GatedWanSelfAttention`][omnimem.GatedWanSelfAttention], built with its constructor settings and
loaded with its weights (same parameter names and shapes), which their pipeline calls as before.

``patch_causal_wan(model, max_frames=...)`` replaces the cached inference path of every such
module (found by its attribute names; calls without a ``kv_cache`` keep the original forward,
e.g. training with a ``block_mask``). Each layer's ``OmniMemCache`` lives in the pipeline's own
dict, under ``"omnimem"``, so the pipeline's resets keep working: a write at ``current_start ==
0`` over a non-empty history starts a new video. The window buffers the pipeline allocated in
the dict are released on first use. ``unpatch_causal_wan`` restores the original forwards.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import sys
import types
import weakref
from collections.abc import Callable, MutableMapping

import torch
from torch import nn

from omnimem.config import GatedConfig, OmniMemConfig
from omnimem.gated.wan import GatedWanSelfAttention, reordered_rope, rope_table_for, spatial_rope_table
from omnimem.positions import RelativeTime, scaled_time_table, wan_time_table
from omnimem.sizing import host_history_bytes, kv_cache_bytes
from omnimem.sparse.cache import OmniMemCache
from omnimem.store.disk import check_disk_space
from omnimem.store.formats import check_kv_format
from omnimem.store.index import check_index_format
from omnimem.store.tiers import check_host_memory

logger = logging.getLogger("omnimem")

_ATTENTION_ATTRIBUTES = ("q", "k", "v", "o", "norm_q", "norm_k", "num_heads", "head_dim")
# Their CausalNSSelfAttention's constructor settings, read back from its attributes.
_NSA_SETTINGS = (
    "pool_f", "pool_h", "pool_w", "num_selected_blocks", "gate_mode", "layer_idx", "chunk_length",
    "group_q_size", "skip_module",
)  # fmt: skip
# Read too where their layer has them (their window exclusion; their GQA-style head pooling).
_NSA_OPTIONAL_SETTINGS = (
    "exclude_window_chunks",
    "exclude_sink_chunks",
    "progressive_exclude",
    "num_kv_head_groups",
)
_OMNIMEM_FIELDS = frozenset(f.name for f in dataclasses.fields(OmniMemConfig))
_GATED_FIELDS = frozenset(f.name for f in dataclasses.fields(GatedConfig))
_PATCH = "_omnimem_patch"
_ORIGINAL = "_omnimem_original"


def _forward_parameters(module: nn.Module) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return ()


def _is_causvid_attention(module: nn.Module) -> bool:
    """CausVid's ``CausalWanSelfAttention``: Self-Forcing's call with ``current_end`` in the
    place of ``cache_start`` and no sink (it attends the whole cache up to ``current_end``)."""
    parameters = _forward_parameters(module)
    return "current_start" in parameters and parameters[parameters.index("current_start") + 1 :][:1] == (
        "current_end",
    )


def _is_rolling_forcing_attention(module: nn.Module) -> bool:
    """Rolling Forcing's ``CausalWanSelfAttention``: Self-Forcing's call plus ``updating_cache``,
    a ``block_length`` it caches per call, no ``sink_size`` attribute (its anchor is the first
    block)."""
    return "updating_cache" in _forward_parameters(module) and hasattr(module, "block_length")


def _is_causal_wan_attention(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in _ATTENTION_ATTRIBUTES) and (
        hasattr(module, "sink_size") or _is_causvid_attention(module) or _is_rolling_forcing_attention(module)
    )


def _is_nsa_attention(module: nn.Module) -> bool:
    return not isinstance(module, GatedWanSelfAttention) and all(
        hasattr(module, name) for name in (*_ATTENTION_ATTRIBUTES, "g_proj", *_NSA_SETTINGS)
    )


def _gated_replacement(module: nn.Module, gated_settings: dict) -> GatedWanSelfAttention:
    """Their three-branch layer as ``GatedWanSelfAttention``: same settings, and their very
    projection and norm modules (shared, not copied: no second set of weights).
    ``gated_settings``: the patch's (``config``, ``overrides``, cache sizes, ``offload``)."""
    wan = {name: getattr(module, name) for name in ("window_size", "qk_norm", "eps") if hasattr(module, name)}
    settings = {name: getattr(module, name) for name in _NSA_SETTINGS}
    settings |= {name: getattr(module, name) for name in _NSA_OPTIONAL_SETTINGS if hasattr(module, name)}
    with torch.device("meta"):  # every weight is replaced by theirs below
        gated = GatedWanSelfAttention(
            dim=module.dim, num_heads=module.num_heads, **wan, **settings, config=gated_settings["config"],
            max_frames=gated_settings["max_frames"], max_chunk_frames=gated_settings["max_chunk_frames"],
            offload=gated_settings["offload"], kv_format=gated_settings["kv_format"],
            disk=gated_settings["disk"],
        )  # fmt: skip
    gated.config = gated.config.replace(**gated_settings["overrides"])
    expected = {name: tuple(t.shape) for name, t in gated.state_dict().items()}
    for name in ("q", "k", "v", "o", "norm_q", "norm_k", "g_proj"):
        setattr(gated, name, getattr(module, name))
    got = {name: tuple(t.shape) for name, t in gated.state_dict().items()}
    if got != expected or any(t.is_meta for t in gated.state_dict().values()):
        raise ValueError(
            f"{type(module).__name__}'s weights do not fit GatedWanSelfAttention: "
            f"expected {expected}, got {got}"
        )
    object.__setattr__(gated, _ORIGINAL, module)  # kept for unpatch, not registered as a child
    return gated


def patch_causal_wan(
    model: nn.Module,
    config: OmniMemConfig | GatedConfig | None = None,
    *,
    max_frames: int,
    max_chunk_frames: int = 3,
    sink_frames: int | None = None,
    local_frames: int | None = None,
    offload: bool = False,
    kv_format: str = "native",
    positions: str = "absolute",
    disk: str | os.PathLike | None = None,
    index_format: str = "float32",
    **overrides: object,
) -> list[nn.Module]:
    """Make ``model``'s causal self-attention layers attend through omnimem, in place.

    Two kinds of layer are patched: Self-Forcing's ``CausalWanSelfAttention`` (through an
    ``OmniMemCache`` each) and the authors' three-branch ``CausalNSSelfAttention`` (replaced by
    ``GatedWanSelfAttention``, built from their settings: blocks, groups, ``top_k``, window
    exclusion). Every setting below reaches both kinds.

    Args:
        model: a loaded Self-Forcing-family ``CausalWanModel`` (or any module holding their
            ``CausalWanSelfAttention``-shaped layers: ``q``, ``k``, ``v``, ``o``, ``norm_q``,
            ``norm_k``, ``num_heads``, ``head_dim``, ``sink_size``), or the authors'
            ``CausalWanNSAModel``.
        config: an ``OmniMemConfig`` for Self-Forcing's layers (default
            ``OmniMemConfig.preset("wan2.1-1.3b")``: the first frame as sink, the last chunk as
            local window, 32 blocks per head) or a ``GatedConfig`` for the authors' layers (the
            fields their constructor settings do not set, e.g. ``backend``; default
            ``GatedConfig()``).
        max_frames: the longest video, in latent frames, the caches must hold (the history
            is kept whole: 60 s of Wan2.1 at 16 fps is 240 latent frames). Each layer's cache
            is allocated once, at its first call, after a check that every patched layer's
            cache fits the device (host memory with ``offload``).
        max_chunk_frames: the most frames one call writes (Self-Forcing: 3).
        sink_frames: the sink in latent frames (their unit: ``sink_size``); converted to tokens
            with the model's tokens per frame at the first call, overriding ``config``'s
            (Self-Forcing's layers).
        local_frames: the local window in latent frames (their ``local_attn_size``'s unit),
            likewise.
        offload: keep each layer's history in host memory (``OmniMemCache(offload=True)``,
            ``GatedCache(offload=True)``).
        kv_format: ``"native"``, ``"fp8"`` or ``"int4"``: every layer keeps its history quantized
            (``OmniMemCache(kv_format=...)``, ``GatedCache(kv_format=...)``; docs/memory.md):
            on the device, or with ``offload`` in host memory.
        positions: the frames RoPE sees (Self-Forcing's layers). ``"absolute"``: the model's
            own positions, its table extended past its end by Wan's formula. ``"relative"``:
            keys kept rotated in space only; each call places the chunk and local window at
            their true distances and the retrieved blocks right before them, in temporal
            order, so positions stay inside the table however long the video
            (``omnimem.positions``; docs/positions.md). Self-Forcing's layers only for now.
        disk: with ``offload``, a directory whose preallocated files hold each layer's history
            (``OmniMemCache(disk=...)``: the page cache is its host memory; docs/positions.md
            has the hour this is for). Both kinds of layer, native or quantized.
        index_format: ``"float32"`` or ``"int8"``: the block sums Self-Forcing's layers select
            from (``OmniMemCache(index_format=...)``: 0.26x the bytes, within a documented bound;
            the index an hour needs, docs/positions.md).
        **overrides: config fields to change: ``OmniMemConfig`` fields for Self-Forcing's
            layers, ``GatedConfig`` fields for the authors' (over their own settings), e.g.
            ``top_k=12`` (a field of both reaches both).

    Returns:
        The patched modules, in model order.

    Raises:
        ValueError: no such module in ``model``, an already patched one, or bad sizes.
        TypeError: a ``config`` of neither type, or one for layers the model does not have; an
            override that is a field of no config the model's layers use.

    Example:
        >>> from omnimem.causal_wan import patch_causal_wan, unpatch_causal_wan
        >>> # pipeline = CausalInferencePipeline(args, device)   # theirs, unmodified
        >>> # patch_causal_wan(pipeline.generator.model, max_frames=240, top_k=32)
        >>> # video = pipeline.inference(noise, text_prompts)     # runs as before
    """
    if config is not None and not isinstance(config, (OmniMemConfig, GatedConfig)):
        raise TypeError(f"config must be an OmniMemConfig or a GatedConfig, got {type(config).__name__}")
    if not isinstance(offload, bool):
        raise TypeError(f"offload must be a bool, got {type(offload).__name__}")
    check_kv_format(kv_format)
    check_index_format(index_format)
    if disk is not None and not isinstance(disk, (str, os.PathLike)):
        raise TypeError(f"disk must be a directory path or None, got {type(disk).__name__}")
    if disk is not None and not offload:
        raise ValueError("disk= needs offload=True (the offloaded history goes to the disk)")
    if positions not in ("absolute", "relative"):
        raise ValueError(f"positions must be 'absolute' or 'relative', got {positions!r}")
    for name, value, minimum in (
        ("max_frames", max_frames, 1),
        ("max_chunk_frames", max_chunk_frames, 1),
        ("sink_frames", sink_frames, 0),
        ("local_frames", local_frames, 0),
    ):
        if value is None and name in ("sink_frames", "local_frames"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if any(hasattr(m, _PATCH) or hasattr(m, _ORIGINAL) for m in model.modules()):
        raise ValueError("the model is already patched; call unpatch_causal_wan first")
    nsa_layers = [m for m in model.modules() if _is_nsa_attention(m)]
    modules = [m for m in model.modules() if _is_causal_wan_attention(m)]
    if not modules and not nsa_layers:
        raise ValueError(
            "patch_causal_wan found no CausalWanSelfAttention-like module in the model (looked for "
            f"modules with {', '.join(_ATTENTION_ATTRIBUTES)} and sink_size, or the authors' "
            "CausalNSSelfAttention with g_proj and pool sizes)"
        )
    if index_format != "float32" and nsa_layers:
        raise ValueError(
            f"index_format={index_format!r} applies to Self-Forcing's layers (OmniMemCache); the authors' "
            "three-branch layers select from block means: patch this model with index_format='float32'"
        )
    if positions == "relative" and nsa_layers:
        raise ValueError(
            "positions='relative' is not implemented for the authors' three-branch layers yet: "
            "patch this model with positions='absolute' (docs/positions.md)"
        )
    omnimem_config, gated_config, gated_overrides = _split_settings(
        config, overrides, sink_frames=sink_frames, local_frames=local_frames, sparse=bool(modules),
        gated=bool(nsa_layers),
    )  # fmt: skip
    gated_settings = dict(
        config=gated_config, overrides=gated_overrides, max_frames=max_frames,
        max_chunk_frames=max_chunk_frames, offload=offload, kv_format=kv_format, disk=disk,
    )  # fmt: skip
    replaced = _replace_nsa_layers(model, gated_settings)
    check_gated = _first_allocation_check(len(replaced), max_frames, offload, kv_format, disk)
    for layer in replaced:
        layer.before_allocation = lambda layer, sizes: check_gated(
            {**sizes, "config": layer.config}, sizes["capacity"] // max_frames
        )
    settings = dict(
        config=omnimem_config, max_frames=max_frames, max_chunk_frames=max_chunk_frames,
        sink_frames=sink_frames, local_frames=local_frames, offload=offload, kv_format=kv_format,
        check=_first_allocation_check(len(modules), max_frames, offload, kv_format, disk, index_format),
        positions=positions, disk=disk, index_format=index_format,
        model=weakref.ref(model), returns_update=callable(getattr(model, "_apply_cache_updates", None)),
    )  # fmt: skip
    for module in modules:
        original = module.forward
        setattr(module, _PATCH, original)
        call = {
            **settings,
            "current_end": _is_causvid_attention(module),
            "rolling": _is_rolling_forcing_attention(module),
            "their_rope": _their_scaled_rope(module),
        }
        module.forward = types.MethodType(_patched_forward(original, call), module)
    logger.info(
        "patch_causal_wan: %d attention layers attend through omnimem",
        len(modules) + len(replaced),
    )
    return sorted(modules + replaced, key=[*model.modules()].index)


def _split_settings(
    config: OmniMemConfig | GatedConfig | None,
    overrides: dict,
    *,
    sink_frames: int | None,
    local_frames: int | None,
    sparse: bool,
    gated: bool,
) -> tuple[OmniMemConfig | None, GatedConfig | None, dict]:
    """The patch's settings per kind of layer, validated before the model changes: Self-Forcing's
    ``OmniMemConfig``, the authors' base ``GatedConfig`` and the ``GatedConfig`` overrides
    (applied over their layers' own settings). Settings for a kind the model lacks are refused."""
    has = " and ".join(
        kind
        for kind, present in (("Self-Forcing's layers", sparse), ("the authors' gated layers", gated))
        if present
    )
    for name in overrides:
        if name not in _OMNIMEM_FIELDS | _GATED_FIELDS:
            raise TypeError(
                f"unknown setting {name!r}: neither an OmniMemConfig field (Self-Forcing's layers) nor a "
                "GatedConfig field (the authors' gated layers)"
            )
        if not ((sparse and name in _OMNIMEM_FIELDS) or (gated and name in _GATED_FIELDS)):
            owner = "an OmniMemConfig" if name in _OMNIMEM_FIELDS else "a GatedConfig"
            raise TypeError(f"{name!r} is {owner} field, which no layer of this model uses (it has {has})")
    if isinstance(config, GatedConfig) and not gated:
        raise TypeError(f"config is a GatedConfig, for the authors' gated layers; this model has {has}")
    if isinstance(config, OmniMemConfig) and not sparse:
        raise TypeError(f"config is an OmniMemConfig, for Self-Forcing's layers; this model has {has}")
    if not sparse and (sink_frames is not None or local_frames is not None):
        raise TypeError(f"sink_frames and local_frames set Self-Forcing's layers; this model has {has}")
    omnimem_config = gated_config = None
    if sparse:
        base = config if isinstance(config, OmniMemConfig) else OmniMemConfig.preset("wan2.1-1.3b")
        omnimem_config = base.replace(**{n: v for n, v in overrides.items() if n in _OMNIMEM_FIELDS})
    gated_overrides = {n: v for n, v in overrides.items() if n in _GATED_FIELDS}
    if gated:
        gated_config = config if isinstance(config, GatedConfig) else GatedConfig()
        gated_config.replace(**gated_overrides)  # validated now, applied over each layer's settings
    return omnimem_config, gated_config, gated_overrides if gated else {}


def _first_allocation_check(
    layers: int,
    max_frames: int,
    offload: bool,
    kv_format: str = "native",
    disk: str | None = None,
    index_format: str = "float32",
) -> Callable[[dict, int], None]:
    """A check, run before the first of ``layers`` caches is allocated, that all of them fit:
    the device (or, with ``offload``, the host for the history and the device for the rest).
    Its argument: one cache's ``kv_cache_bytes`` sizes (``capacity`` in tokens included)."""
    done = []

    def check(sizes: dict, frame_tokens: int) -> None:
        if done:
            return
        sizes = dict(sizes)
        capacity, device = sizes.pop("capacity"), torch.device(sizes.pop("device"))
        sizes = {
            k: sizes[k] for k in ("batch", "num_kv_heads", "head_dim", "dtype", "config", "max_chunk_tokens")
        }
        sizes["max_chunk_tokens"] = sizes["max_chunk_tokens"] or 0
        on_device = layers * kv_cache_bytes(
            capacity, **sizes, offload=offload, kv_format=kv_format, index_format=index_format
        )
        if offload:  # the history in host memory (or on disk)
            if kv_format != "native":
                names = ("batch", "num_kv_heads", "head_dim")
                block_size = (sizes["config"] or OmniMemConfig()).block_size
                full = host_history_bytes(
                    capacity, kv_format=kv_format, block_size=block_size, **{k: sizes[k] for k in names}
                )
            else:
                full = kv_cache_bytes(capacity, **sizes) - kv_cache_bytes(0, **sizes)
            if disk is None:
                check_host_memory(layers * full)
            else:
                check_disk_space(
                    layers * full, disk, what=f"the {layers} patched layers at max_frames={max_frames}"
                )
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if on_device > free:
                advice = (
                    "lower max_frames"
                    if offload
                    else "patch_causal_wan(..., offload=True) keeps the history in host memory, "
                    "kv_format='fp8' or 'int4' quantizes it on the device"
                )
                raise ValueError(
                    f"the caches of the {layers} patched layers at max_frames={max_frames} ({frame_tokens} "
                    f"tokens a frame) need {on_device / 2**30:.1f} GiB of GPU memory, but only "
                    f"{free / 2**30:.1f} GiB are free on {device}: {advice} (omnimem.kv_cache_bytes sizes "
                    "a model)"
                )
        done.append(True)

    return check


def _replace_nsa_layers(model: nn.Module, gated_settings: dict) -> list[nn.Module]:
    # Every replacement is built before any is installed: a layer that does not fit leaves the
    # model as it was.
    found = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if _is_nsa_attention(child)
    ]
    built = [(parent, name, _gated_replacement(child, gated_settings)) for parent, name, child in found]
    for parent, name, gated in built:
        setattr(parent, name, gated)
    return [gated for _, _, gated in built]


def unpatch_causal_wan(model: nn.Module) -> int:
    """Restore the original forwards (and the authors' own three-branch layers); returns how
    many modules were restored. The layers' dicts no longer hold window buffers: let the
    pipeline re-create its caches (e.g. ``pipeline.kv_cache1 = None``) before running it
    unpatched."""
    restored = 0
    for module in model.modules():
        if hasattr(module, _PATCH):
            module.forward = getattr(module, _PATCH)
            delattr(module, _PATCH)
            restored += 1
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if hasattr(child, _ORIGINAL):
                setattr(parent, name, getattr(child, _ORIGINAL))
                restored += 1
    return restored


def _layer_cache(
    kv_cache: MutableMapping,
    module: nn.Module,
    k: torch.Tensor,
    frame_tokens: int,
    settings: dict,
    positions: Callable[[], RelativeTime] | None = None,
) -> OmniMemCache:
    """The layer's cache in its dict, made at the first call (``positions``: builds the
    ``RelativeTime`` then)."""
    cache = kv_cache.get("omnimem")
    if isinstance(cache, OmniMemCache) and cache.k.dtype == k.dtype and cache.device == k.device:
        return cache
    config = settings["config"]
    frames = {"sink_tokens": settings["sink_frames"], "local_tokens": settings["local_frames"]}
    config = config.replace(**{name: n * frame_tokens for name, n in frames.items() if n is not None})
    # Rolling Forcing attends whole windows of blocks: up to its max_attention_size at once.
    window = getattr(module, "max_attention_size", 0) if settings["rolling"] else 0
    max_chunk = max(settings["max_chunk_frames"] * frame_tokens, k.shape[1], window)
    sizes = dict(
        capacity=settings["max_frames"] * frame_tokens,
        max_chunk_tokens=max_chunk,
        batch=k.shape[0], num_kv_heads=module.num_heads, head_dim=module.head_dim, config=config,
        dtype=k.dtype, device=k.device,
    )  # fmt: skip
    settings["check"](sizes, frame_tokens)
    cache = OmniMemCache(
        settings["max_frames"] * frame_tokens,
        max_chunk_tokens=max_chunk,
        batch=k.shape[0], num_kv_heads=module.num_heads, head_dim=module.head_dim, config=config,
        dtype=k.dtype, device=k.device, layout="blhd", offload=settings["offload"],
        kv_format=settings["kv_format"], positions=None if positions is None else positions(),
        disk=settings["disk"],
        index_format=settings["index_format"],
    )  # fmt: skip
    for name in ("k", "v"):  # the pipeline's window buffers: never read once patched
        if isinstance(kv_cache.get(name), torch.Tensor):
            kv_cache[name] = kv_cache[name].new_empty(0)
    kv_cache["omnimem"] = cache
    return cache


def _reencode(cache: OmniMemCache, q, k, v, start: int, block_tokens: int) -> torch.Tensor:
    """Frames from ``start`` written again (a prompt switch's re-cache): the cache goes back to
    ``start``, then each block of ``block_tokens`` attends the history before it and itself
    (their block-causal mask) and becomes history when the next one is written."""
    if min(block_tokens, q.shape[2]) > cache.max_chunk_tokens:  # before anything changes
        raise ValueError(
            f"a re-encode in blocks of {block_tokens} tokens, but the cache takes chunks of at most "
            f"{cache.max_chunk_tokens}: pass patch_causal_wan(..., max_chunk_frames=) of at least the "
            "model's num_frame_per_block"
        )
    if start == 0 and cache.history_len > 0:  # everything again: any cache can reset
        cache.reset()
    elif start not in (cache.history_len, cache.history_len + cache.chunk_len):  # attend_at's own cases
        cache.rewind(start)
    outs = []
    for first in range(0, q.shape[2], block_tokens):
        part = slice(first, first + block_tokens)
        outs.append(cache.attend_at(q[:, :, part], k[:, :, part], v[:, :, part], start=start + first))
    return torch.cat(outs, dim=2)


_LONGLIVE2_ROPE = ("t_scale", "use_relative_rope", "method", "original_seq_len", "temporal_offset")


def _their_scaled_rope(module: nn.Module) -> Callable | None:
    """The ``causal_rope_apply`` of the module's own source file when it takes LongLive-2.0's
    options (``t_scale``, ``temporal_offset``), else None. LongLive-2.0 rotates in float32 with a
    Triton kernel by default (float64 under autograd): calling their function is the one way to
    match their bits on every path, so the patch rotates the chunk with it wherever their table
    reaches (absolute positions); past it, and for relative positions, omnimem's float64 rotation
    (their float64 path's bits)."""
    rope = getattr(sys.modules.get(type(module).__module__), "causal_rope_apply", None)
    if not callable(rope):
        return None
    try:
        names = inspect.signature(rope).parameters
    except (TypeError, ValueError):
        return None
    return rope if {"t_scale", "temporal_offset"} <= set(names) else None


def _longlive2_rope(extra: dict, settings: dict) -> tuple[float, float | torch.Tensor]:
    """LongLive-2.0's RoPE options, taken out of ``extra``: ``(t_scale, temporal_offset)`` for
    absolute positions (``(1.0, 0.0)`` without them). Checked: the linear method only; its
    window-relative rotation (``use_relative_rope=True``) needs ``positions="relative"``; one
    ``t_scale`` per patched model (the caches' time tables are built with it)."""
    if not any(name in extra for name in _LONGLIVE2_ROPE):
        return 1.0, 0.0
    t_scale = extra.pop("t_scale", 1.0)
    relative = extra.pop("use_relative_rope", False)
    method, original = extra.pop("method", "linear"), extra.pop("original_seq_len", None)
    offset = extra.pop("temporal_offset", 0.0)
    if method != "linear" or original is not None:
        raise ValueError(
            f"RoPE method={method!r}, original_seq_len={original!r}: only LongLive-2.0's linear temporal "
            "RoPE (method='linear', original_seq_len=None) is implemented"
        )
    if isinstance(t_scale, bool) or not isinstance(t_scale, int | float) or not t_scale > 0:
        raise ValueError(f"t_scale must be a positive number, got {t_scale!r}")
    if not isinstance(relative, bool):
        raise TypeError(f"use_relative_rope must be a bool, got {type(relative).__name__}")
    if relative and settings["positions"] != "relative":
        raise ValueError(
            "this model rotates its attended window at window-relative frames (use_relative_rope=True): "
            "patch it with patch_causal_wan(..., positions='relative'), omnimem's form of that rotation "
            "over the whole history"
        )
    if (torch.is_tensor(offset) and offset.ndim > 1) or isinstance(offset, list | tuple):
        raise ValueError(
            "temporal_offset per sample ([B] or [B, F]) is not supported: pass a number or [F] frames"
        )
    if settings.setdefault("t_scale", float(t_scale)) != float(t_scale):
        raise ValueError(
            f"t_scale changed from {settings['t_scale']} to {t_scale} mid-run: unpatch and patch the model "
            "again"
        )
    return float(t_scale), (0.0 if relative else offset)


def _patched_forward(original: Callable, settings: dict) -> Callable:
    def forward(
        self: nn.Module,
        x: torch.Tensor,
        seq_lens: object,
        grid_sizes: torch.Tensor,
        freqs: torch.Tensor,
        block_mask: object,
        kv_cache: MutableMapping | None = None,
        current_start: int = 0,
        cache_start: int | None = None,
        sink_recache_after_switch: bool | None = None,
        **extra: object,
    ) -> torch.Tensor:
        # CausVid's call: the eighth argument is current_end (the chunk's end), not cache_start.
        current_end = None
        if settings["rolling"]:
            # Rolling Forcing writes a window at its start, then the window's clean first block at
            # the same start (updating_cache=True); the next window starts one block later. That
            # is attend_at's own rewrite-then-promote: the flag changes nothing here.
            updating = extra.pop("updating_cache", False)
            if not isinstance(updating, bool):
                raise TypeError(f"updating_cache must be a bool, got {type(updating).__name__}")
        if settings["current_end"]:
            current_end = extra.pop("current_end", cache_start)
            cache_start = None
        # LongLive's 1.3B layer at its last version (7b56712) takes a ninth argument: whether a
        # re-cache after a prompt switch rewrites the sink too (else it keeps the first prompt's).
        if sink_recache_after_switch is not None and not isinstance(sink_recache_after_switch, bool):
            raise TypeError(
                f"sink_recache_after_switch must be a bool, got {type(sink_recache_after_switch).__name__}"
            )
        t_scale, offset = _longlive2_rope(extra, settings)
        if extra:
            # Arguments Self-Forcing's call does not have change what attention computes: not
            # ours to drop.
            raise TypeError(
                f"this model calls self-attention with {', '.join(sorted(extra))}, which the Self-Forcing "
                "call that patch_causal_wan implements does not have: its attention works differently "
                "(e.g. LongLive-2.0's RoPE options); patch it by "
                "hand (docs/integration.md, sections 1-4) or unpatch_causal_wan(model)"
            )
        if kv_cache is None:  # training / teacher forcing: their path, untouched
            last = current_end if settings["current_end"] else cache_start
            more = () if sink_recache_after_switch is None else (sink_recache_after_switch,)
            return original(x, seq_lens, grid_sizes, freqs, block_mask, kv_cache, current_start, last, *more)
        if not isinstance(kv_cache, MutableMapping):
            raise TypeError(f"kv_cache must be the pipeline's per-layer dict, got {type(kv_cache).__name__}")
        batch, length = x.shape[:2]
        frames, height, width = (int(n) for n in grid_sizes[0].tolist())  # host values, as their RoPE
        frame_tokens = height * width
        start = int(current_start)
        if frames * frame_tokens != length or start % frame_tokens:
            raise ValueError(
                f"x holds {length} tokens at current_start={start}; grid_sizes {frames}x{height}x{width} "
                "describe whole frames of another size"
            )
        if current_end is not None and int(current_end) != start + length:
            raise ValueError(
                f"current_end={int(current_end)} but the chunk of {length} tokens at current_start={start} "
                f"ends at {start + length}: CausVid's call writes and attends exactly "
                "[current_start, current_end)"
            )
        if start and not isinstance(kv_cache.get("omnimem"), OmniMemCache):
            # Checked before anything is allocated or their buffers released.
            raise ValueError(
                f"current_start={start} on a KV cache dict that holds no omnimem history yet: a video's "
                "history starts at token 0. The pipeline created new cache dicts mid-video (Krea "
                "Realtime's recompute_kv_cache re-encodes a window of recent frames into fresh caches "
                "every block, at positions relative to that window). omnimem keeps the whole history "
                "itself: create the caches once and call the model at absolute positions, as their "
                "CausalInferencePipeline.inference does (docs/integration.md, section 0)"
            )
        n, d = self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(batch, length, n, d)
        k = self.norm_k(self.k(x)).view(batch, length, n, d)
        v = self.v(x).view(batch, length, n, d)
        # Their RoPE: float64 tables, float32 result, then the model's dtype (same bits). A model
        # with its own scaled RoPE (LongLive-2.0) rotates with it wherever its table reaches.
        grid, start_frame = (frames, height, width), start // frame_tokens
        theirs = (
            settings["their_rope"] is not None
            and settings["positions"] != "relative"
            and start_frame + frames <= freqs.shape[0]
        )
        time = None
        if settings["positions"] == "relative":  # space only; the cache rotates in time per call
            table = freqs  # the time table is built once, when the layer's cache is
            time = lambda: RelativeTime(  # noqa: E731
                scaled_time_table(table, table.shape[0], 0, t_scale, 0.0), frame_tokens
            )
            freqs, start_frame = spatial_rope_table(freqs), 0
        elif not theirs:
            freqs = rope_table_for(freqs, start_frame + frames)  # past their 1,024 frames: extended
            if t_scale != 1.0 or torch.is_tensor(offset) or float(offset) != 0.0:  # LongLive-2.0's options
                freqs = freqs.clone()
                freqs[start_frame : start_frame + frames, : wan_time_table(freqs).shape[1]] = (
                    scaled_time_table(freqs, frames, start_frame, t_scale, offset)
                )
        if theirs:  # as their layer calls it
            rope, grid_py = settings["their_rope"], [grid] * batch
            q, k = (
                rope(
                    t, grid_py, freqs, start_frame=start_frame, t_scale=t_scale, temporal_offset=offset
                ).type_as(v)
                for t in (q, k)
            )
        else:
            q = reordered_rope(q.float(), grid, freqs, start_frame=start_frame).type_as(v)
            k = reordered_rope(k.float(), grid, freqs, start_frame=start_frame).type_as(v)
        sink_tokens = getattr(self, "sink_size", 0) * frame_tokens
        if sink_recache_after_switch is None:  # LongLive at d69a1fa: kv_cache['global_sink']
            keeps_sink, how = bool(kv_cache.get("global_sink")), "kv_cache['global_sink'] set"
        else:  # at 7b56712: a re-cache after frame 0 keeps the sink unless told to rewrite it
            keeps_sink, how = not sink_recache_after_switch and start > 0, "sink_recache_after_switch=False"
        if block_mask is not None and keeps_sink and start < sink_tokens:
            # Checked before anything is allocated or changed.
            raise ValueError(
                f"a re-encode from current_start={start} with {how} starts inside the sink ({sink_tokens} "
                "tokens), whose keys LongLive keeps from the first prompt: not supported yet; switch "
                "prompts after the sink and the re-cached window, or let the re-cache rewrite the sink "
                "(unset global_sink / sink_recache_after_switch=True)"
            )
        cache = _layer_cache(kv_cache, self, k, frame_tokens, settings, time)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        if block_mask is not None:  # a block-causal re-encode of frames already generated
            model = settings["model"]()
            block_frames = getattr(model, "num_frame_per_block", None) or settings["max_chunk_frames"]
            out = _reencode(cache, q, k, v, start, block_frames * frame_tokens)
        else:
            if start == 0 and cache.history_len > 0:  # the pipeline reset its caches: a new video
                cache.reset()
            out = cache.attend_at(q, k, v, start=start)
        out = self.o(out.transpose(1, 2).flatten(2))
        if settings["returns_update"]:
            # LongLive's layers return the cache update their model applies after all blocks;
            # omnimem has written it already: only the end indices remain to be set.
            return out, (start + length, start + length, None)
        return out

    return forward
