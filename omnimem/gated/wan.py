"""A drop-in for the authors' ``CausalNSSelfAttention`` (their Wan2.1 NSA layer) on omnimem's ops.

``GatedWanSelfAttention`` takes the same constructor arguments and holds the same parameters
under the same names (``q``, ``k``, ``v``, ``o``, ``norm_q``, ``norm_k``, ``g_proj``), so a
checkpoint trained with their code loads unchanged; its ``forward`` takes their call
(``x, seq_lens, grid_sizes, freqs, start_frame, kv_cache, ...``) and runs the gated layer
through a [`GatedCache`][omnimem.GatedCache] (docs/gated.md, "Drop-in for the authors' model").
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Mapping, Sequence

import torch
from einops import rearrange
from torch import nn

from omnimem.config import GatedConfig
from omnimem.gated.cache import GatedCache
from omnimem.store.formats import check_kv_format


class RMSNorm(nn.Module):
    """Wan's RMS norm over the full projected width (float32 statistics), weight ``[dim]``."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def wan_rope_freqs(head_dim: int, positions: int = 1024, theta: float = 10000.0) -> torch.Tensor:
    """Wan's complex RoPE table ``[positions, head_dim / 2]`` (complex128): the time, height
    and width parts side by side, as ``reordered_rope`` reads them."""
    parts = []
    for size in (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6)):
        angles = torch.outer(
            torch.arange(positions), 1.0 / theta ** (torch.arange(0, size, 2).double() / size)
        )
        parts.append(torch.polar(torch.ones_like(angles), angles))
    return torch.cat(parts, dim=1)


# Wan's tables verified once per table tensor (forgotten when it is freed) and their extensions.
# A model that builds a new table every forward pays the check (a host sync) per call past it.
_CHECKED_TABLES: dict[tuple, bool] = {}
_EXTENDED_TABLES: dict[tuple, torch.Tensor] = {}


def _forget_table(key: tuple) -> None:
    _CHECKED_TABLES.pop(key, None)
    for cached in [k for k in _EXTENDED_TABLES if k[: len(key)] == key]:
        del _EXTENDED_TABLES[cached]


def _table_key(freqs: torch.Tensor) -> tuple:
    """A table tensor's cache key; its entries are forgotten when the tensor is freed."""
    key = (id(freqs), freqs.data_ptr(), tuple(freqs.shape), freqs.dtype, str(freqs.device))
    if key not in _CHECKED_TABLES and not any(k[: len(key)] == key for k in _EXTENDED_TABLES):
        weakref.finalize(freqs, _forget_table, key)  # another tensor may reuse its address
    return key


def spatial_rope_table(freqs: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE table with its temporal columns at angle 0 (rotating rows and columns only:
    the keys of relative positions, ``omnimem.positions``); made once per table tensor."""
    key = (*_table_key(freqs), "spatial")
    spatial = _EXTENDED_TABLES.get(key)
    if spatial is None:
        half = freqs.shape[1]
        spatial = freqs.clone()
        spatial[:, : half - 2 * (half // 3)] = 1
        _EXTENDED_TABLES[key] = spatial
    return spatial


def rope_table_for(freqs: torch.Tensor, frames: int) -> torch.Tensor:
    """A RoPE table that reaches ``frames`` latent frames: ``freqs`` itself when it is long
    enough; past its end, Wan's own table extended with Wan's formula (``wan_rope_freqs``:
    absolute positions keep growing, as the model already extrapolates past its ~21 trained
    frames up to its table's 1,024), after checking once that ``freqs`` is Wan's table.

    Raises:
        ValueError: ``freqs`` is shorter than ``frames`` and is not Wan's table (another theta
            or layout): it cannot be extended faithfully.
    """
    if frames <= freqs.shape[0]:
        return freqs
    key = _table_key(freqs)
    if key not in _CHECKED_TABLES:  # one host comparison per table tensor, never again
        head_dim = 2 * freqs.shape[1]
        wan = wan_rope_freqs(head_dim, positions=freqs.shape[0])
        _CHECKED_TABLES[key] = freqs.dtype == wan.dtype and torch.allclose(
            freqs.cpu(), wan, rtol=0, atol=1e-12
        )
    if not _CHECKED_TABLES[key]:
        raise ValueError(
            f"latent frame {frames - 1} is past the model's RoPE table of {freqs.shape[0]} frames, and the "
            "table is not Wan's (theta 10000, float64), so omnimem cannot extend it: keep max_frames <= "
            f"{freqs.shape[0]}"
        )
    size = 1 << (frames - 1).bit_length()  # extended in powers of two: a few tables per video
    extended = _EXTENDED_TABLES.get((*key, size))
    if extended is None:
        extended = wan_rope_freqs(2 * freqs.shape[1], positions=size).to(freqs.device)
        _EXTENDED_TABLES[(*key, size)] = extended
    return extended


def reordered_rope(
    x: torch.Tensor,
    grid: tuple[int, int, int],
    freqs: torch.Tensor,
    *,
    start_frame: int = 0,
    pool: tuple[int, int, int] = (1, 1, 1),
) -> torch.Tensor:
    """Wan's 3-D rotary embedding of ``x [B, S, H, D]`` for tokens in the pooled block order.

    ``freqs`` is Wan's complex table ``[positions, D / 2]`` (time, height and width parts of
    ``D/2 - 2 * (D/2 // 3)``, ``D/2 // 3`` and ``D/2 // 3`` frequencies); token order is
    ``(f / pf, h / ph, w / pw, pf, ph, pw)``: each ``pf x ph x pw`` block of patches is
    contiguous. Frames are numbered from ``start_frame``. Computed in float64, returned in
    ``x``'s dtype.
    """
    frames, height, width = grid
    half = x.shape[-1] // 2
    f_time, f_height, f_width = freqs.split([half - 2 * (half // 3), half // 3, half // 3], dim=1)
    table = torch.cat(
        [
            f_time[start_frame : start_frame + frames]
            .view(frames, 1, 1, -1)
            .expand(frames, height, width, -1),
            f_height[:height].view(1, height, 1, -1).expand(frames, height, width, -1),
            f_width[:width].view(1, 1, width, -1).expand(frames, height, width, -1),
        ],
        dim=-1,
    )
    pf, ph, pw = pool
    table = rearrange(table, "(f fs) (h hs) (w ws) c -> (f h w fs hs ws) c", fs=pf, hs=ph, ws=pw)
    rotated = torch.view_as_complex(x.double().reshape(*x.shape[:-1], half, 2)) * table[None, :, None, :]
    return torch.view_as_real(rotated).flatten(-2).type_as(x)


class GatedWanSelfAttention(nn.Module):
    """The authors' three-branch NSA self-attention layer, running ``omnimem.gated_attention``.

    Constructor arguments are theirs (``CausalNSSelfAttention``): ``dim``, ``num_heads``,
    ``window_size``, ``qk_norm``, ``eps`` (positionally or by name, as Wan's self-attention),
    ``pool_f/h/w`` (block = ``pool_f * pool_h * pool_w`` tokens), ``num_selected_blocks``
    (``top_k``), ``gate_mode`` (``"sigmoid"`` or ``"softmax"``), ``group_q_size`` (queries per
    selection group), ``chunk_length``, ``skip_module`` (``"cmp"`` or ``"slc"`` drops that
    branch), ``exclude_window_chunks``, ``exclude_sink_chunks`` and ``progressive_exclude``
    (their window exclusion over chunks: ``candidates="chunks"``, docs/gated.md), and
    ``num_kv_head_groups`` (``None`` or ``num_heads``: the others pool heads before selecting,
    which is not implemented and refused); ``tf`` is accepted and ignored (their
    teacher-forcing layout, a training path). omnimem's own, keyword-only: ``window_tokens``
    (default ``3 * chunk_length``, else 14,040), ``candidates`` (``"chunks"``, theirs since
    commit ``ca257ce``; ``"all"`` for code before it), ``config`` (a ``GatedConfig`` for the
    fields their arguments do not set), and the module's own cache: ``cache_capacity`` (tokens)
    or ``max_frames`` (latent frames, converted at the first call), ``max_chunk_frames``,
    ``offload`` (``GatedCache(offload=True)``; with ``disk``, the history in a file) and
    ``kv_format`` (``GatedCache(kv_format=...)``: the history quantized, docs/memory.md).

    ``forward(x, seq_lens, grid_sizes, freqs, start_frame=0, kv_cache=None, ...)``: ``x [B, S,
    C]`` is one chunk in the pooled-block token order. Its keys/values are written at token
    ``start_frame * H * W`` of a ``GatedCache``: ``kv_cache`` when it is one (or a sequence or
    mapping of them, indexed by ``layer_idx``), else the module's own, allocated once at the
    first call (``cache_capacity`` tokens or ``max_frames`` frames; a longer video is a
    ``ValueError``; with neither, sized by the call and grown by doubling, which copies the
    history) and reset when ``start_frame`` is 0.

    Example:
        >>> import torch
        >>> layer = GatedWanSelfAttention(dim=32, num_heads=2, pool_h=3, pool_w=2,
        ...                               num_selected_blocks=2, group_q_size=3, chunk_length=12)
        >>> print(*sorted(layer.state_dict())[:4])
        g_proj.bias g_proj.weight k.bias k.weight
    """

    def __init__(
        self,
        pool_f: int = 1,
        pool_h: int = 1,
        pool_w: int = 1,
        num_selected_blocks: int = 10,
        gate_mode: str = "sigmoid",
        layer_idx: int = 0,
        chunk_length: int | None = None,
        group_q_size: int = 1,
        exclude_window_chunks: int = 0,
        exclude_sink_chunks: int = 0,
        progressive_exclude: bool = False,
        num_kv_head_groups: int | None = None,
        skip_module: str | None = None,
        tf: bool = False,
        *args: object,
        window_tokens: int | None = None,
        candidates: str = "chunks",
        cache_capacity: int | None = None,
        config: GatedConfig | None = None,
        max_frames: int | None = None,
        max_chunk_frames: int = 3,
        offload: bool = False,
        kv_format: str = "native",
        disk: str | os.PathLike | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__()
        names = ("dim", "num_heads", "window_size", "qk_norm", "eps")
        if len(args) > len(names):
            raise TypeError(
                f"GatedWanSelfAttention takes at most {len(names)} positional Wan arguments {names}"
            )
        wan = (
            dict(zip(names[: len(args)], args, strict=True)) | kwargs
        )  # WanSelfAttention(dim, num_heads, ...)
        unknown = sorted(set(wan) - set(names))
        if unknown or "dim" not in wan or "num_heads" not in wan:
            raise TypeError(
                f"GatedWanSelfAttention takes Wan's {names}; missing dim/num_heads or unknown {unknown}"
            )
        dim, num_heads = wan["dim"], wan["num_heads"]
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be a multiple of num_heads ({num_heads})")
        if gate_mode not in ("sigmoid", "softmax"):
            raise ValueError(f"gate_mode must be 'sigmoid' or 'softmax', got {gate_mode!r}")
        if skip_module not in (None, "cmp", "slc"):
            raise ValueError(f"skip_module must be None, 'cmp' or 'slc', got {skip_module!r}")
        if num_kv_head_groups not in (None, num_heads):
            raise ValueError(
                f"num_kv_head_groups={num_kv_head_groups} pools {num_heads} heads into fewer selections "
                "before the top-k; GatedWanSelfAttention implements one selection per head "
                f"(num_kv_head_groups None or {num_heads}) only"
            )
        for name, value, minimum in (
            ("max_frames", max_frames, 1),
            ("max_chunk_frames", max_chunk_frames, 1),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < minimum
            ):
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        if not isinstance(offload, bool):
            raise TypeError(f"offload must be a bool, got {type(offload).__name__}")
        check_kv_format(kv_format)
        if (offload or kv_format != "native") and cache_capacity is None and max_frames is None:
            what = "offload=True" if offload else f"kv_format={kv_format!r}"
            raise ValueError(f"{what} needs the cache's size up front: max_frames or cache_capacity")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.pool = (pool_f, pool_h, pool_w)
        self.gate_mode, self.skip_module, self.layer_idx = gate_mode, skip_module, layer_idx
        eps = wan.get("eps", 1e-6)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        qk_norm = wan.get("qk_norm", True)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.g_proj = nn.Linear(dim, 3 * num_heads)
        if window_tokens is None:
            window_tokens = 3 * chunk_length if chunk_length else 14040
        self.config = (config or GatedConfig()).replace(
            block_size=pool_f * pool_h * pool_w,
            query_group_size=group_q_size,
            top_k=num_selected_blocks,
            window_tokens=window_tokens,
            candidates=candidates,
            exclude_window_chunks=exclude_window_chunks,
            exclude_sink_chunks=exclude_sink_chunks,
            progressive_exclude=progressive_exclude,
        )
        self.cache_capacity, self.max_frames, self.max_chunk_frames = (
            cache_capacity,
            max_frames,
            max_chunk_frames,
        )
        self.offload, self.kv_format, self.disk = offload, kv_format, disk
        # Called with the first cache's size before it is allocated (patch_causal_wan checks
        # that every patched layer's cache fits, before the first one is allocated).
        self.before_allocation: Callable[[GatedWanSelfAttention, dict], None] | None = None
        self._cache: GatedCache | None = None

    def initialize_gate(self) -> None:
        """The authors' initialisation: every gate starts at 0.5."""
        nn.init.normal_(self.g_proj.weight, mean=0.0, std=1.0e-3)
        nn.init.constant_(self.g_proj.bias, 0.0)  # sigmoid(0) = 0.5

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, S, 3]`` activated gates (compressed, selected, window) from ``x [B, S, C]``."""
        g = self.g_proj(x).unflatten(-1, (self.num_heads, 3)).clamp(-10.0, 10.0)
        g = g.sigmoid() if self.gate_mode == "sigmoid" else g.softmax(-1)
        if self.skip_module is not None:  # the dropped branch contributes nothing
            keep = torch.ones(3, dtype=g.dtype, device=g.device)
            keep[0 if self.skip_module == "cmp" else 1] = 0
            g = g * keep
        return g.transpose(1, 2)

    def _layer_cache(
        self, kv_cache: object, x: torch.Tensor, needed: int, start: int, frame_tokens: int
    ) -> GatedCache:
        if isinstance(kv_cache, GatedCache):
            return kv_cache
        if isinstance(kv_cache, (Sequence, Mapping)) and not isinstance(kv_cache, str):
            chosen = kv_cache[self.layer_idx]
            if not isinstance(chosen, GatedCache):
                raise TypeError(f"kv_cache[{self.layer_idx}] must be an omnimem.GatedCache")
            return chosen
        cache = self._cache
        fixed = self.cache_capacity or (self.max_frames and self.max_frames * frame_tokens)
        if fixed and needed > fixed:  # sized once: never grown (a growth copies the history)
            unit = (
                f"cache_capacity={self.cache_capacity} tokens"
                if self.cache_capacity
                else (f"max_frames={self.max_frames} latent frames")
            )
            raise ValueError(
                f"the chunk ends at token {needed} (frame {needed // frame_tokens}), past the layer's "
                f"{unit}: size it for the whole video (patch_causal_wan(..., max_frames=...))"
            )
        fresh_needed = cache is None or cache.k.dtype != x.dtype or cache.device != x.device
        if fresh_needed or cache.capacity < needed:
            capacity = fixed or max(needed, 2 * (cache.capacity if cache is not None else 0))
            sizes = dict(
                capacity=capacity, batch=x.shape[0], num_kv_heads=self.num_heads, head_dim=self.head_dim,
                config=self.config, dtype=x.dtype, device=x.device, offload=self.offload,
                kv_format=self.kv_format, disk=self.disk,
                max_chunk_tokens=(
                    max(self.max_chunk_frames * frame_tokens, x.shape[1])
                    if self.offload or self.kv_format != "native"
                    else None
                ),
            )  # fmt: skip
            if self.before_allocation is not None:
                self.before_allocation(self, sizes)
            self._cache = None  # the old buffers go before the new ones come
            fresh = GatedCache(sizes.pop("capacity"), **sizes)
            if cache is not None and not fresh_needed and start > 0 and cache.end:  # keep the history
                fresh.write(cache.k[:, :, : cache.end], cache.v[:, :, : cache.end], start=0)
                fresh.last_start = cache.last_start
            self._cache = cache = fresh
        if start == 0:
            cache.reset()
        return cache

    def forward(
        self,
        x: torch.Tensor,
        seq_lens: torch.Tensor,
        grid_sizes: torch.Tensor,
        freqs: torch.Tensor,
        start_frame: int = 0,
        kv_cache: object = None,
        layer_idx: int | None = None,
        block_mask: object = None,
        temb: object = None,
        timestep: object = None,
    ) -> torch.Tensor:
        if block_mask is not None:
            raise NotImplementedError(
                "GatedWanSelfAttention runs the cached path (block_mask=None): their teacher-forcing "
                "path (the whole video under one block_mask) is not supported; train through the "
                "cached path instead (a Self-Forcing rollout: gradients flow through each chunk)"
            )
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(
                f"x must be [B, S, {self.dim}] (one chunk's tokens), got {getattr(x, 'shape', x)}"
            )
        if isinstance(start_frame, bool) or int(start_frame) != start_frame or start_frame < 0:
            raise ValueError(f"start_frame must be a non-negative integer, got {start_frame!r}")
        batch, length, _ = x.shape
        frames, height, width = (int(n) for n in grid_sizes[0].tolist())  # host values, as Wan's RoPE
        if frames * height * width != length:
            raise ValueError(
                f"x holds {length} tokens, grid_sizes {frames}x{height}x{width} describe another"
            )
        if frames % self.pool[0] or height % self.pool[1] or width % self.pool[2]:
            raise ValueError(
                f"grid_sizes {frames}x{height}x{width} must divide into the pooled blocks "
                f"{self.pool[0]}x{self.pool[1]}x{self.pool[2]} (pool_f, pool_h, pool_w)"
            )
        start_frame = int(start_frame)
        n, d = self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(batch, length, n, d)
        k = self.norm_k(self.k(x)).view(batch, length, n, d)
        v = self.v(x).view(batch, length, n, d)
        grid = (frames, height, width)
        freqs = rope_table_for(freqs, start_frame + frames)  # past Wan's 1,024 frames: extended
        q = reordered_rope(q, grid, freqs, start_frame=start_frame, pool=self.pool)
        k = reordered_rope(k, grid, freqs, start_frame=start_frame, pool=self.pool)
        start = start_frame * height * width
        if layer_idx is not None:
            self.layer_idx = layer_idx
        cache = self._layer_cache(kv_cache, x, start + length, start, height * width)
        out = cache.attend(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.gates(x).to(q.dtype), start=start
        )
        return self.o(out.transpose(1, 2).flatten(2))


def gated_wan_caches(num_layers: int, capacity: int, **cache_kwargs: object) -> list[GatedCache]:
    """One ``GatedCache`` per layer, to pass as ``kv_cache`` (indexed by ``layer_idx``)."""
    return [GatedCache(capacity, **cache_kwargs) for _ in range(num_layers)]
