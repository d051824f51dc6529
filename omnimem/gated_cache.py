"""The gated layer's KV cache: full keys/values plus their block means, position-addressed.

One ``GatedCache`` per attention layer, driven the way the Self-Forcing family calls attention:
every model call writes its chunk's keys/values at a start position and attends everything
before that position plus the chunk. The denoising passes and the final (commit) pass of a
chunk all write at the same start, so nothing has to know which pass is the last: a later
write at the same start replaces the earlier one. The block means of the blocks a write
touches are recomputed from the buffer, so they always equal what a stateless
``gated_attention`` call computes from the same keys/values (bit for bit).

Buffers never change shape; the write position is tracked on the host (no ``.item()``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch

from omnimem.checks import check_attention_inputs, check_gates
from omnimem.config import GatedConfig
from omnimem.gated import gated_attention, resolve_gated_backend, run_branches, select_groups_for
from omnimem.offload import check_device_memory
from omnimem.pooling import PooledKV, accumulation_dtype, block_means
from omnimem.selection import gather_block_union
from omnimem.sizing import kv_cache_bytes

Layout = Literal["bhld", "blhd"]


class GatedCache:
    """Preallocated keys/values of one gated attention layer, with their block means.

    Args:
        capacity: tokens the cache holds (history and the chunk being written).
        batch: batch size; num_kv_heads: key/value heads; head_dim: head dimension.
        config: the layer's [`GatedConfig`][omnimem.GatedConfig] (default: the authors').
        dtype: dtype of the key/value buffers (the attention dtype).
        device: where the buffers live.
        layout: ``"blhd"`` (``[B, L, H, D]``, the Wan/Self-Forcing cache layout, default) or
            ``"bhld"``; both are exposed as ``[B, H, L, D]`` views without copies.

    Memory: ``2 * capacity * H * D`` elements for the keys/values, plus per block of
    ``block_size`` tokens one float32 mean key and one mean key and value in ``dtype``
    (``1/30`` of the data at the default block size, in float32 and ``dtype``).

    Example:
        >>> import torch
        >>> from omnimem import GatedCache
        >>> cache = GatedCache(120, batch=1, num_kv_heads=2, head_dim=8, top_k=2, window_tokens=60)
        >>> q = k = v = torch.randn(1, 2, 30, 8)
        >>> gates = torch.full((1, 2, 30, 3), 0.5)
        >>> out = cache.attend(q, k, v, gates, start=0)  # a denoising pass of chunk 0
        >>> out = cache.attend(q, k, v, gates, start=0)  # its commit pass: same start, replaced
        >>> out = cache.attend(q, k, v, gates, start=30)  # chunk 1 attends chunk 0 + itself
        >>> cache.end
        60
    """

    def __init__(
        self,
        capacity: int,
        *,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        config: GatedConfig | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        layout: Layout = "blhd",
        **overrides: object,
    ) -> None:
        for name, value in (
            ("capacity", capacity),
            ("batch", batch),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"GatedCache {name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"GatedCache {name} must be positive, got {value}")
        if layout not in ("bhld", "blhd"):
            raise ValueError(f"GatedCache layout must be 'bhld' or 'blhd', got {layout!r}")
        if config is not None and not isinstance(config, GatedConfig):
            raise TypeError(f"GatedCache config must be a GatedConfig, got {type(config).__name__}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"GatedCache dtype must be a floating torch.dtype, got {dtype!r}")
        config = config or GatedConfig()
        self.config = config.replace(**overrides) if overrides else config
        self.capacity = capacity
        self.layout = layout
        shape = (
            (batch, capacity, num_kv_heads, head_dim)
            if layout == "blhd"
            else (batch, num_kv_heads, capacity, head_dim)
        )
        check_device_memory(
            kv_cache_bytes(
                capacity, num_kv_heads=num_kv_heads, head_dim=head_dim, batch=batch, dtype=dtype,
                config=self.config,
            ),
            torch.device(device),
        )  # fmt: skip
        # Zeros, not empty: unwritten space is never read, but finite is the safe default.
        self._k = torch.zeros(shape, dtype=dtype, device=device)
        self._v = torch.zeros_like(self._k)
        slots = math.ceil(capacity / self.config.block_size)
        pooled_shape = (batch, num_kv_heads, slots, head_dim)
        self.pooled = PooledKV(
            torch.zeros(pooled_shape, dtype=torch.float32, device=device),
            torch.zeros(pooled_shape, dtype=dtype, device=device),
            torch.zeros(pooled_shape, dtype=dtype, device=device),
            self.config.block_size,
        )
        self.end = 0  # tokens written: the next chunk starts here (or the last one is rewritten)
        self.last_start = 0

    def __repr__(self) -> str:
        b, h, _, d = self.k.shape
        return (
            f"GatedCache(capacity={self.capacity}, end={self.end}, B={b}, Hkv={h}, D={d}, "
            f"dtype={self.k.dtype}, device={self.k.device}, layout={self.layout!r})"
        )

    @property
    def k(self) -> torch.Tensor:
        """``[B, Hkv, capacity, D]`` view of the key buffer."""
        return self._k.transpose(1, 2) if self.layout == "blhd" else self._k

    @property
    def v(self) -> torch.Tensor:
        """``[B, Hkv, capacity, D]`` view of the value buffer."""
        return self._v.transpose(1, 2) if self.layout == "blhd" else self._v

    def reset(self) -> None:
        """Forget everything (a new video, or a new prompt that re-caches from scratch)."""
        self.end = 0
        self.last_start = 0

    def rewind(self, end: int) -> None:
        """Forget every position at or past ``end`` (``0 <= end <= self.end``): the next write
        starts there (re-caching from a point, e.g. a prompt switch). The block straddling
        ``end`` is recomputed by that write."""
        if isinstance(end, bool) or not isinstance(end, int):
            raise TypeError(f"end must be a Python int, got {type(end).__name__}")
        if not 0 <= end <= self.end:
            raise ValueError(f"end must lie in [0, {self.end}] (what has been written), got {end}")
        self.end = self.last_start = end

    def _check_write(self, k: torch.Tensor, v: torch.Tensor, start: object) -> int:
        if isinstance(start, bool) or not isinstance(start, int):
            raise TypeError(f"start must be a Python int, got {type(start).__name__}")
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            b, h, _, d = self.k.shape
            if x.dim() != 4 or (x.shape[0], x.shape[1], x.shape[3]) != (b, h, d):
                raise ValueError(
                    f"{name} must be the chunk's [B, Hkv, L, D] = [{b}, {h}, L, {d}] "
                    f"(a [B, L, H, D] tensor passed as .transpose(1, 2)), got {tuple(x.shape)}"
                )
            if x.dtype != self.k.dtype or x.device != self.k.device:
                raise TypeError(
                    f"{name} must be {self.k.dtype} on {self.k.device} like the cache, "
                    f"got {x.dtype} on {x.device}"
                )
        if v.shape != k.shape:
            raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
        if start not in (self.end, self.last_start):
            raise ValueError(
                f"start must be {self.end} (the next chunk, right after the history) or "
                f"{self.last_start} (rewriting the current chunk), got {start}"
            )
        if start + k.shape[2] > self.capacity:
            raise ValueError(
                f"the chunk [{start}, {start + k.shape[2]}) does not fit the cache's capacity {self.capacity}"
            )
        return start

    def write(self, k: torch.Tensor, v: torch.Tensor, *, start: int) -> None:
        """Write a chunk's keys/values ``[B, Hkv, L, D]`` at ``start`` and refresh the block
        means of the blocks it touches. ``start`` must be the end of what was written (a new
        chunk) or the start of the last write (the same chunk again)."""
        self._store(k, v, self._check_write(k, v, start))

    def _store(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        stop = start + k.shape[2]
        # Values, never autograd graphs (a graph kept here would break the next backward).
        self.k[:, :, start:stop].copy_(k.detach())
        self.v[:, :, start:stop].copy_(v.detach())
        bs = self.config.block_size
        first = start // bs  # the block holding `start` may also hold earlier tokens
        touched = (self.k[:, :, first * bs : stop], self.v[:, :, first * bs : stop])
        acc = accumulation_dtype(self.k.dtype)
        k_means = block_means(touched[0], stop - first * bs, bs)  # float32: what selection scores
        k_attn = (
            k_means if acc == torch.float32 else block_means(touched[0], stop - first * bs, bs, dtype=acc)
        )
        v_means = block_means(touched[1], stop - first * bs, bs, dtype=acc)
        last = first + k_means.shape[2]
        self.pooled.k[:, :, first:last].copy_(k_means)
        self.pooled.k_attn[:, :, first:last].copy_(k_attn)
        self.pooled.v_attn[:, :, first:last].copy_(v_means)
        self.last_start, self.end = start, stop

    def _attend_differentiably(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, start: int
    ) -> torch.Tensor:
        """``attend`` with gradients through the chunk (q, k, v, gates; through the block means
        it touches, the compressed branch too), the history a constant.

        What autograd keeps must not be the buffers (the next write changes them), and should
        not be a copy of the whole history: the selection is made on the cache as usual, then
        the layer runs on compact keys, the history blocks the groups selected (``U`` slots,
        ascending) followed by the live region (from the window's or the chunk's first block to
        the chunk's end, the chunk with its graph), with the table renumbered into them; the
        compressed branch reads the cache's block means before the chunk's first block and the
        chunk's blocks pooled afresh. Same tokens, same order: the stateless call's result.
        """
        config, bs = self.config, self.config.block_size
        backend = resolve_gated_backend(config, q.device, q.dtype)
        seq_len = start + k.shape[2]
        with torch.no_grad():
            selection = select_groups_for(q, self.pooled, seq_len, config, backend)
        first = start // bs  # the first block holding chunk tokens
        live_first = min(max(0, seq_len - config.window_tokens), first * bs) // bs
        live_start = live_first * bs
        table = selection.block_idx.long()
        flat = table.flatten(2)
        in_history = (flat >= 0) & (flat < live_first)
        width = min(flat.shape[-1], live_first)  # static slots for the selected history blocks
        renumbered = torch.where(flat >= live_first, width + flat - live_first, -1)
        with torch.no_grad():
            parts_k, parts_v = [], []
            if width:
                none = live_first + 1
                union, (k_rows, v_rows) = gather_block_union(
                    flat, in_history, width=width, none=none, block_size=bs, buffers=(self.k, self.v)
                )
                position = torch.searchsorted(union, torch.where(in_history, flat, none).contiguous())
                renumbered = torch.where(in_history, position, renumbered)
                parts_k, parts_v = [k_rows], [v_rows]
        keys = torch.cat([*parts_k, self.k[:, :, live_start:start], k], 2)
        values = torch.cat([*parts_v, self.v[:, :, live_start:start], v], 2)
        acc = accumulation_dtype(self.k.dtype)
        touched = seq_len - first * bs
        k_live = block_means(torch.cat([self.k[:, :, first * bs : start], k], 2), touched, bs, dtype=acc)
        v_live = block_means(torch.cat([self.v[:, :, first * bs : start], v], 2), touched, bs, dtype=acc)
        k_means = torch.cat([self.pooled.k_attn[:, :, :first], k_live.to(self.k.dtype)], 2)
        v_means = torch.cat([self.pooled.v_attn[:, :, :first], v_live.to(self.v.dtype)], 2)
        compact_len = keys.shape[2]
        compact = dataclasses.replace(
            selection,
            block_idx=renumbered.view_as(table).int(),
            seq_len=torch.full((), compact_len, dtype=torch.int64, device=q.device),
        )
        return run_branches(
            q, keys, values, gates, compact, seq_len=compact_len, k_means=k_means, v_means=v_means,
            num_blocks=math.ceil(seq_len / bs), config=config, backend=backend,
            scale=config.scale or q.shape[-1] ** -0.5, wants_grad=True,
        )  # fmt: skip

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, *, start: int
    ) -> torch.Tensor:
        """Write the chunk at ``start`` (see ``write``), then ``gated_attention`` of its
        queries over ``[0, start)`` plus the chunk: ``[B, Hq, L, D]`` in ``q.dtype``.

        Validation of ``q`` and ``gates`` happens before anything is written.
        """
        start = self._check_write(k, v, start)
        check_attention_inputs(q, self.k, self.v, history_len=start, chunk_len=None)
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"q must hold the chunk's {k.shape[2]} queries (k's length), got {q.shape[2]}")
        check_gates(gates, q)
        self._store(k, v, start)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, gates)):
            return self._attend_differentiably(q, k, v, gates, start)
        return gated_attention(
            q, self.k, self.v, gates, history_len=start, config=self.config, pooled=self.pooled
        )
