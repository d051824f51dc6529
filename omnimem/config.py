"""Retrieval configuration: one frozen, validated dataclass shared by selection and backends."""

from __future__ import annotations

import dataclasses
from typing import Literal

WindowExclusion = Literal["adaptive", "always", "never"]

WINDOW_EXCLUSION_MODES: tuple[str, ...] = ("adaptive", "always", "never")
BACKEND_NAMES: tuple[str, ...] = ("auto", "dense", "flex", "triton", "gather")


def _check_int(name: str, value: object, *, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    # bool is an int subclass; `top_k=True` is a bug, not a request for one block.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"OmniMemConfig.{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"OmniMemConfig.{name} must be >= {minimum}, got {value}")


@dataclasses.dataclass(frozen=True)
class OmniMemConfig:
    """How a chunk retrieves history blocks (DESIGN.md section 2).

    Attributes:
        block_size: tokens per history block (the unit of retrieval). 128 is the triton
            kernel's key tile (whole blocks read unmasked); other sizes work on every backend.
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
        if self.window_exclusion not in WINDOW_EXCLUSION_MODES:
            raise ValueError(
                f"OmniMemConfig.window_exclusion must be one of {WINDOW_EXCLUSION_MODES}, "
                f"got {self.window_exclusion!r}"
            )
        if self.scale is not None:
            if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
                raise TypeError(f"OmniMemConfig.scale must be a float, got {type(self.scale).__name__}")
            if not self.scale > 0:
                raise ValueError(f"OmniMemConfig.scale must be positive, got {self.scale}")
        if self.backend not in BACKEND_NAMES:
            raise ValueError(f"OmniMemConfig.backend must be one of {BACKEND_NAMES}, got {self.backend!r}")
        if not isinstance(self.compile, bool):
            raise TypeError(f"OmniMemConfig.compile must be a bool, got {type(self.compile).__name__}")

    @property
    def effective_exclusion_tokens(self) -> int:
        """``exclusion_tokens``, with ``None`` resolved to ``local_tokens``."""
        return self.local_tokens if self.exclusion_tokens is None else self.exclusion_tokens

    def replace(self, **changes: object) -> OmniMemConfig:
        """A copy with ``changes`` applied (and validated); unknown names raise ``TypeError``."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown OmniMemConfig field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)
