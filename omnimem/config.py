"""Retrieval configuration: one frozen, validated dataclass shared by selection and backends."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

WindowExclusion = Literal["adaptive", "always", "never"]

WINDOW_EXCLUSION_MODES: tuple[str, ...] = ("adaptive", "always", "never")
BACKEND_NAMES: tuple[str, ...] = ("auto", "dense", "flex", "triton", "gather")


def _check_int(
    name: str, value: object, *, minimum: int, allow_none: bool = False, owner: str = "OmniMemConfig"
) -> None:
    if value is None and allow_none:
        return
    # bool is an int subclass; `top_k=True` is a bug, not a request for one block.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{owner}.{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum}, got {value}")


def _check_choice(name: str, value: object, choices: tuple[str, ...], *, owner: str) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {choices}, got {value!r}")


def _check_scale(scale: object, *, owner: str) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{owner}.scale must be a float, got {type(scale).__name__}")
    # Scores are float32: a scale beyond its range is +inf there, and every softmax NaN.
    if not (0 < scale <= torch.finfo(torch.float32).max):
        raise ValueError(f"{owner}.scale must be positive and finite in float32 (<= 3.4e38), got {scale}")


def _replace(config, changes: dict):
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(config)})
    if unknown:
        raise TypeError(f"unknown {type(config).__name__} field(s): {', '.join(unknown)}")
    return dataclasses.replace(config, **changes)


@dataclasses.dataclass(frozen=True)
class OmniMemConfig:
    """How a chunk retrieves history blocks ([Concepts](concepts.md#the-exact-rule)).

    Attributes:
        block_size: tokens per history block (the unit of retrieval). 128 is the triton
            kernel's key tile (whole blocks read unmasked); other sizes work on every backend.
            A block longer than a call's key buffer acts as one block of the whole buffer.
        top_k: retrieval budget: blocks selected per (batch, KV head, query group) on top of
            the always-attended sink and local-window blocks.
        sink_tokens: the first ``sink_tokens`` history tokens (rounded out to whole blocks)
            are always attended ("attention sink", e.g. the first latent frame).
        local_tokens: the last ``local_tokens`` history tokens (rounded out to whole blocks)
            are always attended: the dense local window of today's AR video models.
        exclusion_tokens: size of the recent region that Adaptive Window Exclusion keeps out
            of the budget; ``None`` means ``local_tokens``. Must be ``>= local_tokens``.
        window_exclusion: ``"adaptive"`` (OmniMem: far blocks first, recent blocks only fill
            a budget the far history cannot), ``"always"`` (far blocks only) or ``"never"``
            (recent blocks compete for the budget: the local-bias baseline).
        query_group_size: ``None`` shares one selection among all queries of the chunk;
            an int gives every run of that many queries its own selection (MoBA/NSA style).
        scale: softmax scale; ``None`` means ``head_dim ** -0.5``. Must be positive.
        backend: ``"auto"``, ``"triton"`` (CUDA), ``"flex"``, ``"gather"`` or ``"dense"``.
            ``"auto"`` lets the ``omnimem.use_backend`` context manager, then the
            ``OMNIMEM_BACKEND`` environment variable, then the inputs' device, dtype and head
            dim decide (see ``omnimem.resolve_backend``).
        compile: compile selection (on GPUs) and FlexAttention through ``torch.compile``.
            ``False`` runs both eagerly: exact, but eager FlexAttention touches every key like
            dense attention.

    Raises:
        ValueError: a field out of range (negative sizes, ``top_k < 1``,
            ``exclusion_tokens < local_tokens``, an unknown mode or backend, a non-positive scale).
        TypeError: a field of the wrong type.

    Example:
        >>> from omnimem import OmniMemConfig
        >>> cfg = OmniMemConfig(top_k=16, sink_tokens=1560, local_tokens=4680)
        >>> cfg.effective_exclusion_tokens
        4680
        >>> cfg.replace(top_k=8).top_k
        8
    """

    block_size: int = 128
    top_k: int = 32
    sink_tokens: int = 0
    local_tokens: int = 0
    exclusion_tokens: int | None = None
    window_exclusion: WindowExclusion = "adaptive"
    query_group_size: int | None = None
    scale: float | None = None
    backend: str = "auto"
    compile: bool = True

    def __post_init__(self) -> None:
        _check_int("block_size", self.block_size, minimum=1)
        _check_int("top_k", self.top_k, minimum=1)
        _check_int("sink_tokens", self.sink_tokens, minimum=0)
        _check_int("local_tokens", self.local_tokens, minimum=0)
        _check_int("exclusion_tokens", self.exclusion_tokens, minimum=0, allow_none=True)
        _check_int("query_group_size", self.query_group_size, minimum=1, allow_none=True)
        if self.exclusion_tokens is not None and self.exclusion_tokens < self.local_tokens:
            raise ValueError(
                "OmniMemConfig.exclusion_tokens must be >= local_tokens (the exclusion window "
                f"contains the local window), got {self.exclusion_tokens} < {self.local_tokens}"
            )
        _check_choice(
            "window_exclusion", self.window_exclusion, WINDOW_EXCLUSION_MODES, owner="OmniMemConfig"
        )
        _check_scale(self.scale, owner="OmniMemConfig")
        _check_choice("backend", self.backend, BACKEND_NAMES, owner="OmniMemConfig")
        if not isinstance(self.compile, bool):
            raise TypeError(f"OmniMemConfig.compile must be a bool, got {type(self.compile).__name__}")

    @classmethod
    def preset(cls, name: str, **changes: object) -> OmniMemConfig:
        """A named starting point (``PRESETS``), with ``changes`` applied.

        ``"wan2.1-1.3b"`` and ``"wan2.1-14b"``: Self-Forcing-family models at 480x832 (1,560
        tokens per latent frame, chunks of 3 frames): 128-token blocks, the first frame as
        sink, the last chunk as the local window, 32 retrieved blocks per head.

        Example:
            >>> OmniMemConfig.preset("wan2.1-1.3b", top_k=16).sink_tokens
            1560
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {tuple(PRESETS)}")
        return cls(**PRESETS[name]).replace(**changes)

    @classmethod
    def from_frames(
        cls,
        frame_tokens: int,
        *,
        sink_frames: int = 1,
        local_frames: int = 3,
        exclusion_frames: int | None = None,
        **fields: object,
    ) -> OmniMemConfig:
        """A config whose sink, local window and exclusion region are given in latent frames
        (Self-Forcing's units: ``sink_size``, ``local_attn_size``), ``frame_tokens`` tokens each
        (1,560 for Wan2.1 at 480x832); ``fields`` are the other settings.

        Example:
            >>> OmniMemConfig.from_frames(1560, sink_frames=1, local_frames=3, top_k=16).local_tokens
            4680
        """
        _check_int("frame_tokens", frame_tokens, minimum=1)
        for name, frames in (("sink_frames", sink_frames), ("local_frames", local_frames)):
            _check_int(name, frames, minimum=0)
        _check_int("exclusion_frames", exclusion_frames, minimum=0, allow_none=True)
        exclusion = None if exclusion_frames is None else exclusion_frames * frame_tokens
        return cls(
            sink_tokens=sink_frames * frame_tokens,
            local_tokens=local_frames * frame_tokens,
            exclusion_tokens=exclusion,
            **fields,
        )

    @property
    def effective_exclusion_tokens(self) -> int:
        """``exclusion_tokens``, with ``None`` resolved to ``local_tokens``."""
        return self.local_tokens if self.exclusion_tokens is None else self.exclusion_tokens

    def replace(self, **changes: object) -> OmniMemConfig:
        """A copy with ``changes`` applied (and validated); unknown names raise ``TypeError``."""
        return _replace(self, changes)


# Named starting points (docs/tuning.md, "Presets"): Wan2.1 at 480x832 has 1,560 tokens per
# latent frame; Self-Forcing-family models generate chunks of 3 frames.
WAN_FRAME_TOKENS = 1560
PRESETS: dict[str, dict[str, object]] = {
    "wan2.1-1.3b": dict(
        block_size=128, top_k=32, sink_tokens=WAN_FRAME_TOKENS, local_tokens=3 * WAN_FRAME_TOKENS
    ),
    "wan2.1-14b": dict(
        block_size=128, top_k=32, sink_tokens=WAN_FRAME_TOKENS, local_tokens=3 * WAN_FRAME_TOKENS
    ),
}
GATED_PRESETS: dict[str, dict[str, object]] = {
    "omnimem-wan2.1-1.3b": dict(),  # the authors' released model: GatedConfig's defaults
    "omnimem-wan2.1-1.3b-long": dict(top_k=12),  # their long-video checkpoints
}

GatedCandidates = Literal["chunks", "all", "awe"]
GATED_CANDIDATE_MODES: tuple[str, ...] = ("chunks", "all", "awe")
POOL_PRECISIONS: tuple[str, ...] = ("float32", "input")
GATED_BACKEND_NAMES: tuple[str, ...] = ("auto", "triton", "gather")


@dataclasses.dataclass(frozen=True)
class GatedConfig:
    """The gated three-branch OmniMem layer (``omnimem.gated_attention``; docs/gated.md).

    Defaults are the authors' released Wan2.1-1.3B model as their current code runs it
    (commit ``ca257ce``): blocks of 30 tokens (1 x 15 x 2 patches in their reordered token
    layout), groups of 15 queries, the top 16 blocks per (group, head), a 14,040-token
    (3-chunk) sliding window, and their window exclusion over chunks: from the fourth chunk
    on, the last 3 chunks (the current one included) are no candidates.

    Attributes:
        block_size: tokens per pooled block; blocks tile the whole sequence (history, then
            chunk), the last one may be partial.
        query_group_size: consecutive queries that share one selection (the last group may be
            short).
        top_k: blocks the selected branch attends per (batch, KV head, query group); fewer
            when fewer blocks are candidates.
        window_tokens: the sliding-window branch attends the last ``window_tokens`` positions
            ending at the chunk's end.
        candidates: ``"chunks"`` (the authors' rule, in chunks of the call's ``Lq`` queries:
            the call is chunk ``c = history_len // Lq``, block ``j`` lies in chunk
            ``j * block_size // Lq``; where the exclusion applies, blocks in the first
            ``exclude_sink_chunks`` chunks and in chunks ``c - exclude_window_chunks + 1 .. c``
            are no candidates), ``"all"`` (every block of history and chunk: their code
            before ``ca257ce``, where the chunk index was always 0) or ``"awe"`` (the paper's
            Adaptive Window Exclusion by budget: once at least ``top_k`` blocks lie entirely
            before the window, blocks that touch the window are no candidates).
        exclude_window_chunks: ``"chunks"``: the trailing chunks excluded (their
            ``exclude_window_chunks``; 3 in their released configs).
        exclude_sink_chunks: ``"chunks"``: the leading chunks excluded (theirs; 0).
        progressive_exclude: ``"chunks"``: ``True`` applies the exclusion only from chunk
            ``exclude_sink_chunks + exclude_window_chunks`` on (every block is a candidate
            before); ``False`` applies it at every chunk (theirs; ``True`` in their configs).
        pool_precision: ``"float32"`` (selection scores from float32 block means, the
            default) or ``"input"`` (block and query means rounded to the inputs' dtype
            first, as the authors' code does in bf16; near-ties may rank differently).
        scale: softmax and score scale; ``None`` means ``head_dim ** -0.5``.
        backend: ``"auto"`` (``"triton"`` on CUDA, else ``"gather"``), ``"triton"`` (the
            scattered selected-branch kernel) or ``"gather"`` (plain torch, any device).

    Example:
        >>> from omnimem import GatedConfig
        >>> GatedConfig().replace(top_k=12).top_k
        12
    """

    block_size: int = 30
    query_group_size: int = 15
    top_k: int = 16
    window_tokens: int = 14040
    candidates: GatedCandidates = "chunks"
    exclude_window_chunks: int = 3
    exclude_sink_chunks: int = 0
    progressive_exclude: bool = True
    pool_precision: str = "float32"
    scale: float | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("block_size", "query_group_size", "top_k", "window_tokens"):
            _check_int(name, getattr(self, name), minimum=1, owner="GatedConfig")
        for name in ("exclude_window_chunks", "exclude_sink_chunks"):
            _check_int(name, getattr(self, name), minimum=0, owner="GatedConfig")
        if not isinstance(self.progressive_exclude, bool):
            kind = type(self.progressive_exclude).__name__
            raise TypeError(f"GatedConfig.progressive_exclude must be a bool, got {kind}")
        _check_choice("candidates", self.candidates, GATED_CANDIDATE_MODES, owner="GatedConfig")
        _check_choice("pool_precision", self.pool_precision, POOL_PRECISIONS, owner="GatedConfig")
        _check_choice("backend", self.backend, GATED_BACKEND_NAMES, owner="GatedConfig")
        _check_scale(self.scale, owner="GatedConfig")

    @classmethod
    def preset(cls, name: str, **changes: object) -> GatedConfig:
        """A named configuration of the authors' models (``GATED_PRESETS``), with ``changes``.

        Example:
            >>> GatedConfig.preset("omnimem-wan2.1-1.3b-long").top_k
            12
        """
        if name not in GATED_PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {tuple(GATED_PRESETS)}")
        return cls(**GATED_PRESETS[name]).replace(**changes)

    def replace(self, **changes: object) -> GatedConfig:
        """A copy with ``changes`` applied (and validated); unknown names raise ``TypeError``."""
        return _replace(self, changes)
