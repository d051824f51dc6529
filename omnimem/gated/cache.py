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

import contextlib
import dataclasses
import math
import os
from typing import Literal

import torch

from omnimem.checks import check_attention_inputs, check_gates
from omnimem.config import GatedConfig
from omnimem.gated.attention import (
    fanout_backward,
    gated_attention,
    resolve_gated_backend,
    run_branches,
    select_groups_for,
)
from omnimem.gated.offload import GatedHostOffload, GatedQuantizedHistory, GatedQuantizedOffload
from omnimem.pooling import PooledKV, accumulation_dtype, block_means, key_bounds
from omnimem.selection import compact_numbering, gather_union_rows
from omnimem.sizing import host_history_bytes, kv_cache_bytes
from omnimem.store.disk import check_disk_space
from omnimem.store.formats import check_kv_format
from omnimem.store.tiers import check_device_memory, check_host_memory, native_history

Layout = Literal["bhld", "blhd"]


class GatedCache:
    """Preallocated keys/values of one gated attention layer, with their block means.

    Args:
        capacity: tokens the cache holds (history and the chunk being written).
        batch: batch size; num_kv_heads: key/value heads; head_dim: head dimension.
        config: the layer's [`GatedConfig`][omnimem.GatedConfig] (default: the authors').
        dtype: dtype of the key/value buffers (the attention dtype).
        device: where the buffers live (with ``offload``: where the layer computes).
        layout: ``"blhd"`` (``[B, L, H, D]``, the Wan/Self-Forcing cache layout, default) or
            ``"bhld"``; both are exposed as ``[B, H, L, D]`` views without copies.
        offload: keep the full keys/values in (pinned) host memory; the device holds the block
            means and the live region (window and chunk), and each call copies the history
            blocks its groups selected over PCIe (``omnimem/gated/offload.py``). Same results
            as resident, bit for bit.
        max_chunk_tokens: the longest chunk a write may bring (needed with ``offload`` or a
            quantized ``kv_format``: it sizes the device's live region).
        kv_format: ``"native"`` (``dtype``, default), ``"fp8"`` or ``"int4"`` (docs/memory.md):
            the history before the live region (the window, rounded down to a block, through
            the chunk) is kept as quantized blocks on the device, quantized once from the
            native keys/values when a new chunk starts after them; the live region and the
            block means stay native, so selection is unchanged. Results equal the layer over
            the history dequantized (``omnimem.store.formats.dequantize``) before the live
            region. With ``offload`` the quantized blocks live in host memory and each call
            stages the bytes of the blocks its groups selected. The triton backend's selected
            kernel reads the quantized bytes in place.
        disk: with ``offload``, a directory for the history's preallocated, unlinked files
            (``omnimem.store.disk``; native or quantized); the host gathers the blocks a call
            selected from them (one host synchronization per call).

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
        offload: bool = False,
        max_chunk_tokens: int | None = None,
        kv_format: str = "native",
        disk: str | os.PathLike | None = None,
        **overrides: object,
    ) -> None:
        if not isinstance(offload, bool):
            raise TypeError(f"GatedCache offload must be a bool, got {type(offload).__name__}")
        if disk is not None and not isinstance(disk, (str, os.PathLike)):
            raise TypeError(f"GatedCache disk must be a directory path or None, got {type(disk).__name__}")
        if disk is not None and not offload:
            raise ValueError("GatedCache(disk=...) keeps an offloaded history in a file: pass offload=True")
        check_kv_format(kv_format, owner="GatedCache kv_format")
        quantized = kv_format != "native"
        if (offload or quantized) and max_chunk_tokens is None:
            reason = "offload=True" if offload else f"kv_format={kv_format!r}"
            raise ValueError(
                f"GatedCache({reason}) needs max_chunk_tokens (the longest chunk a write brings)"
            )
        for name, value in (
            ("capacity", capacity),
            ("batch", batch),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            *((("max_chunk_tokens", max_chunk_tokens),) if max_chunk_tokens is not None else ()),
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
        self.device, self.dtype = torch.device(device), dtype
        self.max_chunk_tokens = max_chunk_tokens
        sizes = dict(
            num_kv_heads=num_kv_heads, head_dim=head_dim, batch=batch, dtype=dtype, config=self.config
        )
        self.kv_format = kv_format
        self.disk = None if disk is None else os.fspath(disk)
        if quantized:  # no native history buffer: a shape-only stand-in (no memory)
            need = kv_cache_bytes(
                capacity, **sizes, kv_format=kv_format, max_chunk_tokens=max_chunk_tokens, offload=offload
            )
            check_device_memory(need, self.device)
            if offload:  # the quantized history itself, in host memory (or on disk)
                history_bytes = host_history_bytes(
                    capacity, kv_format=kv_format, num_kv_heads=num_kv_heads, head_dim=head_dim, batch=batch,
                    block_size=self.config.block_size,
                )  # fmt: skip
                if disk is None:
                    check_host_memory(history_bytes)
                else:
                    check_disk_space(history_bytes, disk)
            self._k = torch.zeros((), dtype=dtype, device=device).expand(shape)
            self._v = self._k
        elif offload:
            if disk is None:  # (a disk history is checked against the disk's free space)
                check_host_memory(kv_cache_bytes(capacity, **sizes) - kv_cache_bytes(0, **sizes))
            live = kv_cache_bytes(capacity, **sizes, offload=True, max_chunk_tokens=max_chunk_tokens)
            check_device_memory(live, self.device)
            self._k, self._v = native_history(shape, dtype, self.device, offload=True, disk=disk)
        else:
            check_device_memory(kv_cache_bytes(capacity, **sizes), self.device)
            self._k, self._v = native_history(shape, dtype, self.device, offload=False)
        slots = math.ceil(capacity / self.config.block_size)
        pooled_shape = (batch, num_kv_heads, slots, head_dim)
        self.pooled = PooledKV(
            torch.zeros(pooled_shape, dtype=torch.float32, device=device),
            torch.zeros(pooled_shape, dtype=dtype, device=device),
            torch.zeros(pooled_shape, dtype=dtype, device=device),
            self.config.block_size,
            k_attn_rounded=True,  # update() casts the float32 means into k_attn
            k_bounds=(
                torch.zeros((batch, num_kv_heads, slots, 2), dtype=torch.float32, device=device)
                if dtype == torch.bfloat16
                else None
            ),
        )
        # Where the layer computes, with its index ("cuda" -> "cuda:0"): inputs are compared to it.
        self.device = self.pooled.k.device
        self.end = 0  # tokens written: the next chunk starts here (or the last one is rewritten)
        self.last_start = 0
        # The tier beneath the live region: host memory (offload), quantized blocks, or none.
        if quantized:
            tier = GatedQuantizedOffload if offload else GatedQuantizedHistory
            self._offload = tier(self, max_chunk_tokens, kv_format)
        else:
            self._offload = GatedHostOffload(self, max_chunk_tokens) if offload else None

    def __repr__(self) -> str:
        b, h, _, d = self.k.shape
        return (
            f"GatedCache(capacity={self.capacity}, end={self.end}, B={b}, Hkv={h}, D={d}, "
            f"dtype={self.dtype}, device={self.device}, layout={self.layout!r}"
            f"{', offload=True' if self.offloaded else ''}"
            f"{f', kv_format={self.kv_format!r}' if self.kv_format != 'native' else ''})"
        )

    @property
    def offloaded(self) -> bool:
        """Whether the history lives in host memory (``offload=True``)."""
        return isinstance(self._offload, GatedHostOffload) and (
            self.kv_format == "native" or isinstance(self._offload, GatedQuantizedOffload)
        )

    @property
    def k(self) -> torch.Tensor:
        """``[B, Hkv, capacity, D]`` view of the key buffer (in host memory when offloaded;
        the last chunk reaches it when the next chunk is written)."""
        return self._k.transpose(1, 2) if self.layout == "blhd" else self._k

    @property
    def v(self) -> torch.Tensor:
        """``[B, Hkv, capacity, D]`` view of the value buffer."""
        return self._v.transpose(1, 2) if self.layout == "blhd" else self._v

    def reset(self) -> None:
        """Forget everything (a new video, or a new prompt that re-caches from scratch)."""
        self.end = 0
        self.last_start = 0
        if self._offload is not None:
            self._offload.reset()

    def rewind(self, end: int) -> None:
        """Forget every position at or past ``end`` (``0 <= end <= self.end``): the next write
        starts there (re-caching from a point, e.g. a prompt switch). The block straddling
        ``end`` is recomputed by that write."""
        if isinstance(end, bool) or not isinstance(end, int):
            raise TypeError(f"end must be a Python int, got {type(end).__name__}")
        if not 0 <= end <= self.end:
            raise ValueError(f"end must lie in [0, {self.end}] (what has been written), got {end}")
        if self._offload is not None:
            self._offload.rewind(self, end)
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
            if x.dtype != self.dtype or x.device != self.device:
                raise TypeError(
                    f"{name} must be {self.dtype} on {self.device} like the cache, "
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
        if self._offload is not None and k.shape[2] > self.max_chunk_tokens:
            raise ValueError(
                f"k holds {k.shape[2]} tokens, more than the offloaded cache's max_chunk_tokens "
                f"{self.max_chunk_tokens}"
            )
        return start

    def _live_start(self, start: int, seq_len: int) -> int:
        """First position of the live region of a call over ``[0, seq_len)`` whose chunk starts
        at ``start``: the window's (or the chunk's) first block."""
        bs = self.config.block_size
        return min(max(0, seq_len - self.config.window_tokens), start) // bs * bs

    def write(self, k: torch.Tensor, v: torch.Tensor, *, start: int) -> None:
        """Write a chunk's keys/values ``[B, Hkv, L, D]`` at ``start`` and refresh the block
        means of the blocks it touches. ``start`` must be the end of what was written (a new
        chunk) or the start of the last write (the same chunk again)."""
        self._store(k, v, self._check_write(k, v, start))

    def _store(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        stop = start + k.shape[2]
        bs = self.config.block_size
        first = start // bs  # the block holding `start` may also hold earlier tokens
        # Values, never autograd graphs (a graph kept here would break the next backward).
        if self._offload is None:
            self.k[:, :, start:stop].copy_(k.detach())
            self.v[:, :, start:stop].copy_(v.detach())
            touched = (self.k[:, :, first * bs : stop], self.v[:, :, first * bs : stop])
        else:  # into the device's live region (the host gets it when the next chunk starts)
            self._offload.prepare(self, start, stop, self._live_start(start, stop))
            self._offload.write(k, v, start)
            touched = self._offload.rows(first * bs, stop)
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
        if self.pooled.k_bounds is not None:
            bounds = key_bounds(k_means, self.pooled.k_attn[:, :, first:last])
            self.pooled.k_bounds[:, :, first:last].copy_(bounds)
        self.last_start, self.end = start, stop

    def _attend_compact(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        gates: torch.Tensor,
        start: int,
        differentiable: bool,
    ) -> torch.Tensor:
        """The layer over compact keys: the history blocks the groups selected (``U`` slots,
        ascending) followed by the live region (from the window's or the chunk's first block
        to the chunk's end), with the table renumbered into them. Same tokens, same order:
        the stateless call's result.

        Two users: an offloaded cache (its history is in host memory; the live region is on
        the device), and training (``differentiable``: gradients through the chunk's q, k, v
        and gates, and through the block means it touches for the compressed branch; what
        autograd keeps must not be the buffers, which the next write changes, and should not
        be a copy of the whole history). When differentiable, the compressed branch reads the
        cache's block means before the chunk's first block and the chunk's blocks pooled afresh
        (so its gradient reaches the chunk's k and v); otherwise the cache's block means.
        """
        config, bs = self.config, self.config.block_size
        backend = resolve_gated_backend(config, q.device, q.dtype, self.kv_format)
        seq_len = start + k.shape[2]
        with torch.no_grad():
            selection = select_groups_for(q, self.pooled, seq_len, config, backend)
        live_start = self._live_start(start, seq_len)
        live_first = live_start // bs
        table = selection.block_idx.long()
        with torch.no_grad():
            parts_k, parts_v = [], []
            union, renumbered = compact_numbering(table.flatten(2), live_first)
            if union is not None:
                none = live_first + 1
                if self._offload is None:
                    buffers = (self.k, self.v)
                    k_rows, v_rows = gather_union_rows(union, none=none, block_size=bs, buffers=buffers)
                else:
                    k_rows, v_rows = self._offload.history_rows(self, union, none)
                parts_k, parts_v = [k_rows], [v_rows]
            if self._offload is None:
                live_k, live_v = self.k[:, :, live_start:start], self.v[:, :, live_start:start]
            else:
                live_k, live_v = self._offload.rows(live_start, start)
        if not differentiable:  # the chunk is in the buffers already (written by _store)
            k, v = self._live_chunk(start, seq_len)
        # Training on the triton backend: one autograd function attends the compact copy and
        # its backward makes only the chunk's dk/dv (SelectedAttentionFanout).
        fanout = fanout_backward(backend, differentiable)
        chunk_k, chunk_v = (k.detach(), v.detach()) if fanout else (k, v)
        keys = torch.cat([*parts_k, live_k, chunk_k], 2)
        values = torch.cat([*parts_v, live_v, chunk_v], 2)
        if differentiable:
            k_means, v_means = self._chunk_means(keys, values, k, v, start, fanout)
        else:
            k_means, v_means = self.pooled.k_attn, self.pooled.v_attn
        compact_len = keys.shape[2]
        compact_selection = dataclasses.replace(
            selection,
            block_idx=renumbered.view_as(table).int(),
            seq_len=torch.full((), compact_len, dtype=torch.int64, device=q.device),
        )
        return run_branches(
            q, k if fanout else keys, v if fanout else values, gates, compact_selection, seq_len=compact_len,
            k_means=k_means, v_means=v_means, num_blocks=math.ceil(seq_len / bs), config=config,
            backend=backend, scale=config.scale or q.shape[-1] ** -0.5, wants_grad=differentiable,
            fanout=fanout, compact=(keys, values) if fanout else None, k_start=start, means_seq_len=seq_len,
        )  # fmt: skip

    def _chunk_means(self, keys, values, k, v, start: int, fanout: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Block means for a differentiable call: the cache's before the chunk's first block,
        the chunk's blocks pooled afresh from ``k``/``v`` (so that the compressed branch's
        gradient reaches them; under ``fanout`` its backward spreads it instead). ``keys``/
        ``values`` end with the chunk and hold the tokens of its first block before it."""
        bs, acc = self.config.block_size, accumulation_dtype(self.dtype)
        first = start // bs
        touched = start + k.shape[2] - first * bs
        # The chunk's first block may start before it: those tokens end the live region.
        before_k = keys[:, :, keys.shape[2] - touched : keys.shape[2] - k.shape[2]].detach()
        before_v = values[:, :, values.shape[2] - touched : values.shape[2] - v.shape[2]].detach()
        with torch.no_grad() if fanout else contextlib.nullcontext():
            k_live = block_means(torch.cat([before_k, k], 2), touched, bs, dtype=acc)
            v_live = block_means(torch.cat([before_v, v], 2), touched, bs, dtype=acc)
        k_means = torch.cat([self.pooled.k_attn[:, :, :first], k_live.to(self.dtype)], 2)
        v_means = torch.cat([self.pooled.v_attn[:, :, :first], v_live.to(self.dtype)], 2)
        return k_means, v_means

    def _attend_quantized_differentiable(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, start: int
    ) -> torch.Tensor:
        """Training over a quantized history on the triton backend: the selected branch reads
        the history's blocks from the store's bytes in forward and backward (no native copy of
        them), the live region and the chunk natively; gradients reach ``q``, ``gates`` and
        the chunk's ``k``/``v`` (``SelectedAttentionFanout``'s one backward)."""
        config, bs = self.config, self.config.block_size
        seq_len = start + k.shape[2]
        live_start = self._live_start(start, seq_len)
        with torch.no_grad():
            selection = select_groups_for(q, self.pooled, seq_len, config, "triton")
            live_k, live_v = self._offload.rows(live_start, start)
            store, selection, live_first, compact_len = self._offload.selected_source(
                self, selection, live_start, seq_len
            )
        keys, values = torch.cat([live_k, k.detach()], 2), torch.cat([live_v, v.detach()], 2)
        k_means, v_means = self._chunk_means(keys, values, k, v, start, fanout=True)
        return run_branches(
            q, k, v, gates, selection, seq_len=compact_len, k_means=k_means, v_means=v_means,
            num_blocks=math.ceil(seq_len / bs), config=config, backend="triton",
            scale=config.scale or q.shape[-1] ** -0.5, wants_grad=True, fanout=True, compact=(keys, values),
            k_start=start, means_seq_len=seq_len, store=store, live_first=live_first,
        )  # fmt: skip

    def _backend(self, q: torch.Tensor) -> str:
        return resolve_gated_backend(self.config, q.device, q.dtype, self.kv_format)

    def _attend_quantized(
        self, q: torch.Tensor, gates: torch.Tensor, start: int, seq_len: int
    ) -> torch.Tensor:
        """A quantized cache on the triton backend: the selected branch reads the history's
        blocks before the live region from the store's bytes in place (no compact copy), the
        window and the chunk from the native tail, the compressed branch the block means."""
        config, bs = self.config, self.config.block_size
        selection = select_groups_for(q, self.pooled, seq_len, config, "triton")
        live_start = self._live_start(start, seq_len)
        keys, values = self._offload.rows(live_start, seq_len)
        store, selection, live_first, compact_len = self._offload.selected_source(
            self, selection, live_start, seq_len
        )
        return run_branches(
            q, keys, values, gates, selection, seq_len=compact_len, k_means=self.pooled.k_attn,
            v_means=self.pooled.v_attn, num_blocks=math.ceil(seq_len / bs), config=config, backend="triton",
            scale=config.scale or q.shape[-1] ** -0.5, wants_grad=False, store=store, live_first=live_first,
        )  # fmt: skip

    def _live_chunk(self, start: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk as stored (``[start, seq_len)``), device views."""
        if self._offload is None:
            return self.k[:, :, start:seq_len], self.v[:, :, start:seq_len]
        return self._offload.rows(start, seq_len)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, *, start: int
    ) -> torch.Tensor:
        """Write the chunk at ``start`` (see ``write``), then ``gated_attention`` of its
        queries over ``[0, start)`` plus the chunk: ``[B, Hq, L, D]`` in ``q.dtype``.

        Validation of ``q`` and ``gates`` happens before anything is written.
        """
        start = self._check_write(k, v, start)
        # An offloaded cache's buffers are on the host: check q against a device stand-in.
        buffer = self.k if self._offload is None else self._offload.stand_in
        check_attention_inputs(q, buffer, buffer, history_len=start, chunk_len=None)
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"q must hold the chunk's {k.shape[2]} queries (k's length), got {q.shape[2]}")
        check_gates(gates, q)
        backend = self._backend(q)  # refuses fp8 on triton where it cannot run, before the write
        self._store(k, v, start)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, gates)):
            quantized = isinstance(self._offload, GatedQuantizedHistory) and backend == "triton"
            if quantized and fanout_backward("triton", True):
                return self._attend_quantized_differentiable(q, k, v, gates, start)
            return self._attend_compact(q, k, v, gates, start, differentiable=True)
        if isinstance(self._offload, GatedQuantizedHistory) and backend == "triton":
            return self._attend_quantized(q, gates, start, start + k.shape[2])
        if self._offload is not None:
            return self._attend_compact(q, k, v, gates, start, differentiable=False)
        return gated_attention(
            q, self.k, self.v, gates, history_len=start, config=self.config, pooled=self.pooled
        )
