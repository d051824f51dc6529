"""The KV cache of the AR loop: preallocated, block-aligned, with incremental block summaries.

One ``OmniMemCache`` per attention layer. It makes the Self-Forcing flow explicit:

- ``attend(q, k_chunk, v_chunk)`` during each denoising step: the chunk's keys/values are
  written into the scratch space right after the history and attended, but not kept;
- ``commit(k_chunk, v_chunk)`` once the chunk is final: its keys/values join the history and
  the per-block key sums of the blocks it touched are recomputed (so selection never re-reads
  the history, and the sums equal what a stateless call computes, bit for bit).

Buffers never change shape (capacity + one chunk of scratch), ``history_len`` is tracked on the
host (no ``.item()``) and mirrored in a device scalar that everything ``attend`` launches reads
(so a CUDA graph of an ``attend`` stays valid as the history grows), and every call runs
``omnimem.sparse_attention``'s path with the same shapes, so compiled backends compile once per
layer shape and never again.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import functools
import logging
import math
import os
from collections.abc import Iterator

import torch

from omnimem.api import _attend_checked, resolve_backend, select_blocks, sparse_attention
from omnimem.checks import Layout, check_attention_inputs
from omnimem.config import OmniMemConfig
from omnimem.positions import RelativeTime, buffer_positions, frame_positions, window_and_reserve
from omnimem.selection import RetrievalRules, Selection, block_key_sums, gather_block_union
from omnimem.sizing import host_history_bytes, kv_cache_bytes
from omnimem.sparse.offload import HostOffload, QuantizedHistory, QuantizedOffload
from omnimem.store.disk import check_disk_space
from omnimem.store.formats import check_kv_format
from omnimem.store.index import Int8BlockSums, check_index_format
from omnimem.store.staging import OffloadStats
from omnimem.store.tiers import check_device_memory, check_host_memory, native_history


class OmniMemCache:
    """Preallocated KV history of one attention layer, with per-block key sums.

    Args:
        capacity: history tokens the cache can hold (committing past it raises ``ValueError``).
        max_chunk_tokens: the largest chunk ``attend``/``commit`` accept (scratch space).
        batch: batch size of the layer's keys/values.
        num_kv_heads: key/value heads of the layer.
        head_dim: head dimension.
        config: retrieval configuration used by ``attend``.
        dtype: dtype of the key/value buffers.
        device: the compute device (the buffers' device unless offloaded).
        layout: storage order of the buffers: ``"bhld"`` (``[B, H, L, D]``, SDPA) or
            ``"blhd"`` (``[B, L, H, D]``, flash-attn/Wan). Both are exposed as ``[B, H, L, D]``
            views, without copies.
        offload: keep the history in host memory (pinned when ``device`` is CUDA). The device
            holds the block sums and, per call, the blocks that call selects, staged from the
            previous call's blocks, the last commit's, or the host (read over PCIe by a
            Triton kernel; no host sync). Same API and results (bit-identical with the triton
            and gather backends); ``offload_stats`` reports hits and bytes fetched.
        kv_format: ``"native"`` (``dtype``, default), ``"fp8"`` or ``"int4"`` (docs/memory.md):
            every whole history block is kept quantized on the device, quantized once when a
            commit completes it; the partial last block and the chunk stay native, and the block
            sums come from the native keys (selection unchanged). With ``offload`` the quantized
            blocks live in host memory and each call stages the bytes of the blocks it selects.
            The triton backend reads the quantized bytes in place; the others dequantize what
            they read. Results equal attention over the history with its whole blocks
            dequantized; ``state_dict`` saves the quantized bytes. Not with ``cuda_graphs`` or
            gradients yet; ``rewind`` to block boundaries or into the partial last block only.
        cuda_graphs: replay each ``attend`` from a CUDA graph captured on its first call per
            query shape (triton backend, resident CUDA caches): the host launches one graph
            instead of about a dozen kernels (~0.9 ms of Python per call on a slow host, ~0.05
            ms replayed). Same results, bit for bit. Costs one copy of ``q`` in and of the output
            out per call, and keeps a ``q``-sized input and output buffer per captured shape.
            Calls inside a capture of your own, under ``torch.compile`` or with gradients run as
            without it (docs/integration.md, "CUDA graphs").
        positions: an ``omnimem.positions.RelativeTime``: keys are stored rotated in space
            only, and each call rotates in time at relative positions that stay inside the RoPE
            table however long the video (docs/positions.md). Not with ``cuda_graphs``.
        disk: with ``offload``, a directory for the history's preallocated, unlinked files
            (``omnimem.store.disk``; the page cache is its host memory), native or quantized;
            each call synchronizes with the host once (docs/memory.md, "the disk tier").
        index_format: ``"float32"`` (default) or ``"int8"``: the block sums selection reads,
            in int8 with one step per block (``omnimem.store.index.Int8BlockSums``, 0.26x the
            bytes); the selection equals float32's wherever the documented bound separates the
            chosen blocks from the rest (docs/positions.md, "An index that stays small").

    Attributes:
        history_len: committed history tokens (``[0, history_len)`` of ``k``/``v``); grows with
            ``commit`` or ``attend_at``'s next chunk, set back by ``rewind``/``reset``.
        chunk_len: tokens of ``attend_at``'s current chunk, written after the history but not
            history yet (0 when there is none).
        capacity: the most history tokens the cache holds; ``k``/``v`` have one chunk more
            (``max_chunk_tokens`` of scratch for the chunk being attended).
        key_block_sums: float32 ``[B, Hkv, ceil((capacity + max_chunk_tokens) / block_size),
            D]`` sums of each block's history keys (an ``Int8BlockSums`` with
            ``index_format="int8"``), kept up to date by commits (selection reads them instead
            of the keys).

    Raises:
        ValueError: non-positive sizes, an unknown layout, or (offloaded) a capacity larger
            than the host's available memory.
        TypeError: non-int sizes, a non-bool ``offload`` or a config that is not an
            ``OmniMemConfig``.

    Example:
        >>> import torch
        >>> from omnimem import OmniMemConfig
        >>> from omnimem.sparse.cache import OmniMemCache
        >>> cache = OmniMemCache(capacity=64, max_chunk_tokens=16, batch=1, num_kv_heads=2,
        ...                      head_dim=8, config=OmniMemConfig(block_size=8, top_k=2, backend="dense"))
        >>> q = k = v = torch.randn(1, 2, 16, 8)
        >>> out = cache.attend(q, k, v)       # a denoising step: the chunk is not kept
        >>> cache.commit(k, v)                # the final chunk joins the history
        >>> cache.history_len
        16
    """

    def __init__(
        self,
        capacity: int,
        *,
        max_chunk_tokens: int,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        config: OmniMemConfig | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        layout: Layout = "bhld",
        offload: bool = False,
        cuda_graphs: bool = False,
        kv_format: str = "native",
        positions: RelativeTime | None = None,
        disk: str | os.PathLike | None = None,
        index_format: str = "float32",
    ) -> None:
        check_kv_format(kv_format, owner="OmniMemCache kv_format")
        check_index_format(index_format, owner="OmniMemCache index_format")
        quantized = kv_format != "native"
        if positions is not None:
            if not isinstance(positions, RelativeTime):
                raise TypeError(
                    f"OmniMemCache positions must be an omnimem.positions.RelativeTime or None, got "
                    f"{type(positions).__name__}"
                )
            if cuda_graphs:
                raise ValueError(
                    "OmniMemCache(positions=RelativeTime(...)) with cuda_graphs=True is not supported: a "
                    "call's positions are planned on the host (docs/positions.md)"
                )
        if quantized and cuda_graphs:
            raise ValueError(
                f"OmniMemCache(kv_format={kv_format!r}) with cuda_graphs=True is not supported yet: "
                "use cuda_graphs=False (a quantized history's call plans on the host)"
            )
        for name, value in (
            ("capacity", capacity),
            ("max_chunk_tokens", max_chunk_tokens),
            ("batch", batch),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"OmniMemCache {name} must be an int, got {type(value).__name__}")
            if value < (0 if name == "capacity" else 1):
                raise ValueError(f"OmniMemCache {name} must be positive, got {value}")
        if not isinstance(offload, bool):
            raise TypeError(f"OmniMemCache offload must be a bool, got {type(offload).__name__}")
        if disk is not None and not isinstance(disk, (str, os.PathLike)):
            raise TypeError(f"OmniMemCache disk must be a directory path or None, got {type(disk).__name__}")
        if disk is not None and not offload:
            raise ValueError("OmniMemCache(disk=...) keeps an offloaded history in a file: pass offload=True")
        if not isinstance(cuda_graphs, bool):
            raise TypeError(f"OmniMemCache cuda_graphs must be a bool, got {type(cuda_graphs).__name__}")
        if layout not in ("bhld", "blhd"):
            raise ValueError(f"OmniMemCache layout must be 'bhld' or 'blhd', got {layout!r}")
        if config is not None and not isinstance(config, OmniMemConfig):
            raise TypeError(f"OmniMemCache config must be an OmniMemConfig, got {type(config).__name__}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"OmniMemCache dtype must be a floating torch.dtype, got {dtype!r}")
        self.config = config or OmniMemConfig()
        self.capacity = capacity
        self.max_chunk_tokens = max_chunk_tokens
        self.layout = layout
        length = capacity + max_chunk_tokens
        shape = (
            (batch, num_kv_heads, length, head_dim)
            if layout == "bhld"
            else (batch, length, num_kv_heads, head_dim)
        )
        # Zeros, not empty: unwritten space is never attended but must be finite (0 * NaN = NaN).
        self.device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0": compared to inputs
        if cuda_graphs and (offload or self.device.type != "cuda"):
            raise ValueError(
                f"OmniMemCache cuda_graphs=True needs a resident CUDA cache, got device {self.device}"
                + (" with offload=True" if offload else "")
            )
        self.kv_format = kv_format
        self.disk = None if disk is None else os.fspath(disk)
        self.positions = None if positions is None else positions.to(self.device)
        if quantized:  # no native history buffer: a shape-only stand-in (no memory)
            sizes = dict(
                max_chunk_tokens=max_chunk_tokens, batch=batch, num_kv_heads=num_kv_heads, head_dim=head_dim,
                dtype=dtype, config=self.config, kv_format=kv_format,
            )  # fmt: skip
            check_device_memory(kv_cache_bytes(capacity, **sizes, offload=offload), self.device)
            if offload:  # the quantized history itself, in host memory (or on disk)
                history_bytes = host_history_bytes(
                    capacity, kv_format=kv_format, num_kv_heads=num_kv_heads, head_dim=head_dim, batch=batch,
                    block_size=self.config.block_size,
                )  # fmt: skip
                if disk is None:
                    check_host_memory(history_bytes)
                else:
                    check_disk_space(history_bytes, disk)
        elif disk is None:  # (a disk history is checked against the disk's free space)
            history_bytes = _history_bytes(capacity, max_chunk_tokens, batch, num_kv_heads, head_dim, dtype)
            (check_host_memory if offload else functools.partial(check_device_memory, device=self.device))(
                history_bytes
            )
        if quantized:
            self._k_storage = torch.zeros((), dtype=dtype, device=self.device).expand(shape)
            self._v_storage = self._k_storage
        else:  # on its tier (a file: the page cache is its host memory; host: the stage kernel reads it)
            self._k_storage, self._v_storage = native_history(
                shape, dtype, self.device, offload=offload, disk=disk
            )
        num_blocks = math.ceil(length / self.config.block_size)
        self.index_format = index_format
        if index_format == "int8":  # a quarter of the bytes, within a documented bound
            self.key_block_sums = Int8BlockSums.zeros(batch, num_kv_heads, num_blocks, head_dim, self.device)
        else:
            self.key_block_sums = torch.zeros(
                batch, num_kv_heads, num_blocks, head_dim, dtype=torch.float32, device=device
            )
        # history_len on the device as well: what the launched work reads, so that no position
        # is baked into it (a CUDA graph of an attend stays valid as the history grows).
        self._history = torch.zeros((), dtype=torch.int64, device=self.device)
        self._positions = torch.arange(max_chunk_tokens, device=self.device)
        self.history_len = 0
        # The history's tier: host memory (offload), quantized blocks on the device, or none.
        if quantized:
            self._offload = (QuantizedOffload if offload else QuantizedHistory)(self, kv_format)
        else:
            self._offload = HostOffload(self) if offload else None
        # cuda_graphs: (query shape, dtype, chunk, lse, storage) -> (graph, static q, static out);
        # head-slice views share it (their storage pointers tell them apart).
        self._graphs: dict | None = {} if cuda_graphs else None
        # Position-addressed use (attend_at): the current chunk, written at history_len but not
        # history yet; it becomes history when a write starts where it ends.
        self.chunk_len = 0
        self._chunk_copy: tuple[torch.Tensor, torch.Tensor] | None = None  # offloaded: its k, v

    @property
    def history_len(self) -> int:
        """Committed history tokens (``[0, history_len)`` of ``k``/``v``)."""
        return self._history_len

    @history_len.setter
    def history_len(self, value: int) -> None:
        self._history_len = value
        self._history.fill_(value)  # a fill kernel, no host sync; stream-ordered before later reads

    @property
    def offload_stats(self) -> OffloadStats | None:
        """Blocks staged, device hits and bytes fetched from the host (``None`` unless offloaded).

        Reading it synchronizes with the device (the counters live there).
        """
        return None if self._offload is None else self._offload.stats

    @property
    def k(self) -> torch.Tensor:
        """``[B, Hkv, capacity + max_chunk_tokens, D]`` view of the key buffer."""
        return self._k_storage if self.layout == "bhld" else self._k_storage.transpose(1, 2)

    @property
    def v(self) -> torch.Tensor:
        """``[B, Hkv, capacity + max_chunk_tokens, D]`` view of the value buffer."""
        return self._v_storage if self.layout == "bhld" else self._v_storage.transpose(1, 2)

    def _check_chunk(self, name: str, x: object) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        batch, heads, _, head_dim = self.k.shape
        if x.dim() != 4 or x.shape[0] != batch or x.shape[1] != heads or x.shape[3] != head_dim:
            raise ValueError(
                f"{name} must have shape [{batch}, {heads}, L, {head_dim}] ([B, Hkv, L, D]; "
                f"pass a [B, L, H, D] tensor as .transpose(1, 2)), got {tuple(x.shape)}"
            )
        if not 1 <= x.shape[2] <= self.max_chunk_tokens:
            raise ValueError(
                f"{name} must hold 1..{self.max_chunk_tokens} tokens (max_chunk_tokens), got {x.shape[2]}"
            )
        if x.dtype != self.k.dtype:
            raise TypeError(f"{name} must have the cache's dtype {self.k.dtype}, got {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"{name} must be on the cache's device {self.device}, got {x.device}")
        return x

    def _check_pair(self, k_chunk: torch.Tensor, v_chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_chunk, v_chunk = self._check_chunk("k_chunk", k_chunk), self._check_chunk("v_chunk", v_chunk)
        if k_chunk.shape != v_chunk.shape:
            raise ValueError(
                f"v_chunk must have k_chunk's shape {tuple(k_chunk.shape)}, got {tuple(v_chunk.shape)}"
            )
        return k_chunk, v_chunk

    def _write_chunk(self, k_chunk: torch.Tensor, v_chunk: torch.Tensor, *, on_device: bool = False) -> int:
        """Write the chunk right after the history. ``on_device``: at the device copy of the
        position (index_copy_), so that the launched copies hold no host position."""
        k_chunk, v_chunk = self._check_pair(k_chunk, v_chunk)
        chunk_len = k_chunk.shape[2]
        # The buffers hold values, never autograd graphs: a graph kept in them would grow with
        # every write and break the next backward (in-place writes to saved tensors).
        if on_device:
            index = self._history + self._positions[:chunk_len]
            self.k.index_copy_(2, index, k_chunk.detach())
            self.v.index_copy_(2, index, v_chunk.detach())
        else:
            end = self.history_len + chunk_len
            self.k[:, :, self.history_len : end] = k_chunk.detach()
            self.v[:, :, self.history_len : end] = v_chunk.detach()
        return chunk_len

    def _attend_differentiably(self, q, k_chunk, v_chunk, chunk_len: int, return_lse: bool):
        """``attend`` when gradients are wanted: this chunk (with its graph) after a compact copy
        of only the history blocks the chunk attends (constants), so that gradients reach q,
        k_chunk and v_chunk, and what autograd keeps for the backward is the attended blocks,
        not the whole history (at 60 s of Wan-1.3B: ~15k of 370k tokens per layer).

        The selection is planned on the cache as usual, then its table is renumbered into the
        compact copy (ascending; the partial last block last), so every backend attends exactly
        the tokens of the resident call, in the same order.
        """
        history = self.history_len
        if history == 0:
            call = dict(history_len=0, chunk_len=chunk_len, config=self.config, return_lse=return_lse)
            return sparse_attention(q, k_chunk, v_chunk, **call)
        with torch.no_grad():
            selection = select_blocks(
                q, self.k, history_len=history, chunk_len=chunk_len, config=self.config,
                key_block_sums=self.key_block_sums,
            )  # fmt: skip
            compact_k, compact_v, selection, _ = _compact_history(
                self.k, self.v, selection, history, chunk_len
            )
        keys = torch.cat([compact_k, k_chunk], dim=2)
        values = torch.cat([compact_v, v_chunk], dim=2)
        return sparse_attention(
            q, keys, values, history_len=compact_k.shape[2], chunk_len=chunk_len, config=self.config,
            return_lse=return_lse, selection=selection,
        )  # fmt: skip

    def _check_reach(self, history: int, chunk_len: int, q_len: int) -> None:
        """Relative positions: refuse, before anything changes, a chunk at ``history`` whose
        positions would pass the table. With the widest table selection can make (every query
        group, ``RetrievalRules.table_width``'s bound), so the call's own check cannot fail."""
        bs, tpf = self.config.block_size, self.positions.frame_tokens
        groups = math.ceil(q_len / self.config.query_group_size) if self.config.query_group_size else 1
        width = groups * RetrievalRules.from_config(self.config).table_width(math.ceil(self.k.shape[2] / bs))
        window, rank = window_and_reserve(
            history, table_width=width, block_size=bs, local_tokens=self.config.local_tokens, frame_tokens=tpf
        )
        self.positions.check_reach(
            rank + (history + chunk_len - 1) // tpf - window, what="the chunk's last frame"
        )

    def _rotates_in_kernel(self, q: torch.Tensor) -> bool:
        """Relative positions on the triton backend: its kernel rotates the keys it reads."""
        return resolve_backend(self.config, self.device, dtype=q.dtype, head_dim=q.shape[-1]) == "triton"

    def key_rotation(self, q: torch.Tensor, table: torch.Tensor | None, chunk_len: int):
        """``(KeyRotation, q rotated in time)`` for a call at ``history_len`` whose selection
        table is ``table`` (``None``: no history): what a kernel that rotates keys in place
        needs (``omnimem.positions.frame_positions``)."""
        from omnimem.backends.triton_attention import KeyRotation

        tpf = self.positions.frame_tokens
        history = self.history_len
        frame_pos, q_pos = frame_positions(
            self.positions, table, lead=(self.k.shape[0], self.k.shape[1]), history=history,
            block_size=self.config.block_size, local_tokens=self.config.local_tokens, chunk_len=chunk_len,
            num_frames=math.ceil((history + chunk_len) / tpf),
        )  # fmt: skip
        cos, sin = self.positions.cos_sin
        return KeyRotation(frame_pos, cos, sin, tpf), self.positions.rotate(q, q_pos)

    def _attend_rotating(self, q: torch.Tensor, chunk_len: int, return_lse: bool):
        """``attend`` with relative positions on the triton backend (the chunk already
        written): selection as ``_attend_relative`` makes it, then one kernel that reads the
        selected blocks where they lie and rotates each key tile in time after its load: no
        copy of the attended blocks, no rotated copy."""
        from omnimem.backends.triton import rotating_forward

        history = self.history_len
        selection = select_blocks(
            q, self.k, history_len=history, chunk_len=chunk_len, config=self.config,
            key_block_sums=self.key_block_sums,
        )  # fmt: skip
        rotation, q = self.key_rotation(q, selection.kv_block_idx if history else None, chunk_len)
        out, lse = rotating_forward(
            q, self.k, self.v, selection, chunk_len=chunk_len, scale=self.config.scale or q.shape[-1] ** -0.5,
            return_lse=return_lse, rotation=rotation,
        )  # fmt: skip
        return (out, lse) if return_lse else out

    def _attend_relative(self, q, k_chunk, v_chunk, chunk_len: int, return_lse: bool):
        """``attend`` with relative temporal positions (``omnimem.positions``): selection on the
        keys and queries as stored (rotated in space only), then a compact copy of the attended
        blocks (as ``_attend_differentiably`` makes), rotated in time at their relative
        positions with the chunk and the queries. Differentiable in q, k_chunk and v_chunk."""
        history, keys, values = self.history_len, k_chunk, v_chunk
        selection = table = None
        blocks, none = k_chunk.new_zeros(*k_chunk.shape[:2], 0, dtype=torch.long), 1  # no history
        if history:
            with torch.no_grad():
                selection = select_blocks(
                    q, self.k, history_len=history, chunk_len=chunk_len, config=self.config,
                    key_block_sums=self.key_block_sums,
                )  # fmt: skip
                table, none = selection.kv_block_idx, selection.num_history_blocks + 1  # _compact_history's
                compact_k, compact_v, selection, blocks = _compact_history(
                    self.k, self.v, selection, history, chunk_len
                )
            keys, values = torch.cat([compact_k, k_chunk], dim=2), torch.cat([compact_v, v_chunk], dim=2)
        key_pos, q_pos = buffer_positions(
            self.positions, blocks, none, table, history=history, block_size=self.config.block_size,
            local_tokens=self.config.local_tokens, chunk_len=chunk_len, length=keys.shape[2],
        )  # fmt: skip
        return sparse_attention(
            self.positions.rotate(q, q_pos), self.positions.rotate(keys, key_pos), values,
            history_len=keys.shape[2] - chunk_len, chunk_len=chunk_len, config=self.config,
            return_lse=return_lse, selection=selection,
        )  # fmt: skip

    def attend(
        self,
        q: torch.Tensor,
        k_chunk: torch.Tensor,
        v_chunk: torch.Tensor,
        *,
        return_lse: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attention of the current chunk over itself and the retrieved history (not stored).

        Args:
            q: ``[B, Hq, Lq, D]`` queries (``Hq`` a multiple of the cache's KV heads).
            k_chunk: ``[B, Hkv, chunk, D]`` the chunk's keys (after RoPE), in the cache's dtype
                and device; ``chunk <= max_chunk_tokens``.
            v_chunk: the chunk's values, like ``k_chunk``.
            return_lse: also return the float32 log-sum-exp ``[B, Hq, Lq]``.

        Returns:
            What ``omnimem.sparse_attention`` returns for the history plus this chunk.

        Raises:
            ValueError: chunk shapes other than ``[B, Hkv, 1..max_chunk_tokens, D]``, another
                device, or ``q`` that does not match (see ``sparse_attention``).
            TypeError: a chunk not in the cache's dtype.
        """
        training = torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k_chunk, v_chunk)
        )
        # Every check before the chunk is written: a refused call must not overwrite the chunk
        # an attend_at wrote (its chunk_len would then describe other data).
        k_chunk, v_chunk = self._check_pair(k_chunk, v_chunk)
        check_attention_inputs(q, k_chunk, v_chunk, history_len=0, chunk_len=k_chunk.shape[2])
        if not isinstance(return_lse, bool):
            raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
        if self.positions is not None:
            self._check_reach(self.history_len, k_chunk.shape[2], q.shape[2])
        if self._offload is not None:
            if training:
                raise ValueError(
                    "gradients through an offloaded or quantized cache are not supported: train with a "
                    "resident native cache (offload=False, kv_format='native'), or attend under "
                    "torch.no_grad()"
                )
            out = self._offload.attend(self, q, k_chunk, v_chunk, return_lse)
            self.chunk_len, self._chunk_copy = 0, None  # this write replaced attend_at's chunk
            return out
        if self.positions is not None and not training and self._rotates_in_kernel(q):
            chunk_len = self._write_chunk(k_chunk, v_chunk, on_device=True)
            out = self._attend_rotating(q, chunk_len, return_lse)
            self.chunk_len, self._chunk_copy = 0, None  # this write replaced attend_at's chunk
            return out
        if training or self.positions is not None:
            chunk_len = self._write_chunk(k_chunk, v_chunk)
            attend = self._attend_relative if self.positions is not None else self._attend_differentiably
            return attend(q, k_chunk, v_chunk, chunk_len, return_lse)
        chunk_len = self._write_chunk(k_chunk, v_chunk, on_device=True)
        if self._graphs is not None and may_replay():
            out = self._replay(q, chunk_len, return_lse)
        else:
            out = self._attend_resident(q, chunk_len, return_lse)
        self.chunk_len, self._chunk_copy = 0, None  # this write replaced attend_at's chunk
        return out

    def _attend_resident(self, q: torch.Tensor, chunk_len: int, return_lse: bool):
        """The chunk (already written) and its retrieved history, positions read on the device."""
        return _attend_checked(
            q, self.k, self.v, history_len=self.history_len, chunk_len=chunk_len, config=self.config,
            return_lse=return_lse, key_block_sums=self.key_block_sums, history=self._history,
        )  # fmt: skip

    def _replay(self, q: torch.Tensor, chunk_len: int, return_lse: bool):
        """``_attend_resident`` from a CUDA graph: captured on the first call per key (which runs
        eagerly, compiling what the graph holds), replayed after copying ``q`` in."""
        key = (tuple(q.shape), q.dtype, chunk_len, return_lse, self._k_storage.data_ptr())
        entry = self._graphs.get(key)
        if entry is None:
            backend = resolve_backend(self.config, self.device, dtype=q.dtype, head_dim=q.shape[-1])
            if backend != "triton":
                _say_no_graph(backend)
                self._graphs[key] = False
                return self._attend_resident(q, chunk_len, return_lse)
            (static_q,) = graph_inputs(q)
            # Eagerly first, on the graph's own input (its strides may differ from q's): whatever
            # these strides compile, compiles here, not inside the capture (which forbids it).
            out = self._attend_resident(static_q, chunk_len, return_lse)
            self._graphs[key] = self._capture(static_q, chunk_len, return_lse)
            return out
        if entry is False:
            return self._attend_resident(q, chunk_len, return_lse)
        graph, static_q, static_out = entry
        static_q.copy_(q)
        graph.replay()
        # Fresh tensors: the next replay overwrites the graph's own.
        return tuple(x.clone() for x in static_out) if return_lse else static_out.clone()

    def _capture(self, static_q: torch.Tensor, chunk_len: int, return_lse: bool):
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (NCCL's watchdog) may use CUDA while this one captures.
        with torch.cuda.graph(graph, pool=graph_pool(self.device), capture_error_mode="thread_local"):
            static_out = self._attend_resident(static_q, chunk_len, return_lse)
        return graph, static_q, static_out

    def attend_at(
        self,
        q: torch.Tensor,
        k_chunk: torch.Tensor,
        v_chunk: torch.Tensor,
        *,
        start: int,
        return_lse: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Position-addressed: write the chunk at token ``start`` and attend the history before
        it plus the chunk, as Self-Forcing-family models call attention (every denoising pass
        and the final clean pass write at the chunk's start; none says which pass is final).

        ``start`` must be either where the history ends (``history_len``: the current chunk
        is written again, replacing the previous write) or where the current chunk ends
        (``history_len + chunk_len``: the current chunk, as last written, becomes history and
        its block sums are computed now; the new chunk becomes current). Use ``rewind`` to go
        back, ``reset`` for a new video.

        Args:
            q: ``[B, Hq, Lq, D]`` the chunk's queries after RoPE.
            k_chunk: ``[B, Hkv, L, D]`` its keys after RoPE (RoPE at absolute positions).
            v_chunk: ``[B, Hkv, L, D]`` its values.
            start: the chunk's first token position.
            return_lse: also return the float32 log-sum-exp.

        Returns:
            What ``attend`` returns.

        Raises:
            ValueError: any other ``start``, a history that would exceed ``capacity``, or
                inputs ``attend`` refuses; nothing is changed then.
            TypeError: a non-int ``start``.

        Example:
            >>> import torch
            >>> from omnimem import OmniMemConfig
            >>> from omnimem.sparse.cache import OmniMemCache
            >>> cache = OmniMemCache(capacity=64, max_chunk_tokens=16, batch=1, num_kv_heads=2,
            ...                      head_dim=8, config=OmniMemConfig(block_size=8, backend="dense"))
            >>> q = k = v = torch.randn(1, 2, 16, 8)
            >>> for start in (0, 0, 0, 16, 16):  # chunk 0: three passes; chunk 1: two
            ...     out = cache.attend_at(q, k, v, start=start)
            >>> cache.history_len, cache.chunk_len
            (16, 16)
        """
        if isinstance(start, bool) or not isinstance(start, int):
            raise TypeError(f"start must be an int token position, got {type(start).__name__}")
        k_chunk, v_chunk = self._check_pair(k_chunk, v_chunk)
        chunk_end = self.history_len + self.chunk_len
        if start not in (self.history_len, chunk_end):
            raise ValueError(
                f"start must be {self.history_len} (rewrite the current chunk) or {chunk_end} (the next "
                f"chunk), got {start}; history_len={self.history_len}, chunk_len={self.chunk_len}. "
                "Call rewind(start) to go back or reset() for a new video"
            )
        promote = start == chunk_end and self.chunk_len > 0
        # Every check before the history changes: a refused call leaves the cache as it was.
        check_attention_inputs(q, k_chunk, v_chunk, history_len=0, chunk_len=k_chunk.shape[2])
        if self.positions is not None:
            self._check_reach(start, k_chunk.shape[2], q.shape[2])
        if promote and chunk_end > self.capacity:
            raise ValueError(
                f"the history would grow to {chunk_end} tokens, past the cache capacity of {self.capacity}; "
                "create the cache with a larger capacity"
            )
        if promote:
            if self._offload is not None:
                self.commit(*self._chunk_copy)
            else:
                self._refresh_block_sums(self.history_len, chunk_end)
                self.history_len = chunk_end
        out = self.attend(q, k_chunk, v_chunk, return_lse=return_lse)
        self.chunk_len = k_chunk.shape[2]
        if self._offload is not None:  # the offloaded history gets the chunk only when it is promoted
            self._chunk_copy = (k_chunk.clone(), v_chunk.clone())
        return out

    def rewind(self, end: int) -> None:
        """Drop the history from token ``end`` on (and the current chunk): the next
        ``attend_at`` starts at ``end``. E.g. re-encode the last frames under a new prompt.
        An ``end`` inside the current chunk (as ``attend_at`` last wrote it) keeps the chunk's
        tokens before ``end`` as history.

        Offloaded (host memory or disk) the cut block's sum is recomputed from the host's copy
        and the device's staging starts afresh. A quantized cache rewinds exactly to a block
        boundary or into its partial last block (kept natively); a block it keeps only
        quantized cannot be cut.

        Raises:
            ValueError: ``end`` outside ``[0, history_len + chunk_len]``, or (quantized) inside
                a block the cache keeps only quantized.
            TypeError: a non-int ``end``.
        """
        if isinstance(end, bool) or not isinstance(end, int):
            raise TypeError(f"end must be an int token position, got {type(end).__name__}")
        chunk_end = self.history_len + self.chunk_len
        if not 0 <= end <= chunk_end:
            raise ValueError(
                f"end must be in [0, history_len + chunk_len = {chunk_end}] "
                f"(history_len={self.history_len}), got {end}"
            )
        bs = self.config.block_size
        whole = self.history_len // bs * bs  # a quantized cache keeps the tokens from here natively
        if self.kv_format != "native" and end % bs and end < whole:
            raise ValueError(
                f"rewind({end}) cuts block {end // bs}, which a kv_format={self.kv_format!r} cache keeps "
                f"only quantized: rewind to a block boundary (a multiple of {bs}) or to {whole} or later; or "
                "reset() and write the video again"
            )
        if self._offload is not None:
            self._rewind_offloaded(end)
            return
        if end > self.history_len:  # the current chunk's head becomes history
            self._refresh_block_sums(self.history_len, end)
            self.history_len = end
        # The block `end` cuts keeps the sum of its kept tokens only; sums past the history are
        # never read, and later writes recompute every block they touch.
        self._refresh_block_sums(end - end % self.config.block_size, end)
        self.history_len, self.chunk_len, self._chunk_copy = end, 0, None

    def _rewind_offloaded(self, end: int) -> None:
        """``rewind`` of a history in host memory, on disk or quantized: the current chunk's
        head is committed if ``end`` lies in it; otherwise the history is cut at ``end``, the cut
        block's sum recomputed from its native tokens (the host's copy; a quantized cache's
        native partial block), and what the device staged forgotten."""
        if end > self.history_len:  # the current chunk's head becomes history
            k, v = self._chunk_copy
            keep = end - self.history_len
            self.commit(k[:, :, :keep], v[:, :, :keep])
            return
        self._sync_host()  # the last commit's copy to the host has landed
        bs = self.config.block_size
        if self.kv_format == "native":
            self.history_len, self.chunk_len, self._chunk_copy = end, 0, None
            self._refresh_block_sums(end - end % bs, end)
            self._offload.load_tail(self)
            return
        # Quantized: `end` is a block boundary or inside the partial block, whose tokens the
        # tail holds natively from its first row (rewind checked that).
        if end % bs:
            self._refresh_block_sums(end - end % bs, end, aligned_keys=self._offload.work[0][0])
        self.history_len, self.chunk_len, self._chunk_copy = end, 0, None
        self._offload.forget(end)

    def _head_slice(self, heads: slice) -> OmniMemCache:
        """A view of KV heads ``heads`` sharing this cache's storage and history, for attends
        (e.g. attending head groups one by one while others are in transit); commit through
        this cache, not the view."""
        if self._offload is not None:
            raise ValueError("head slices of an offloaded cache are not supported")
        view = copy.copy(self)
        head_dim = 1 if self.layout == "bhld" else 2
        view._k_storage = self._k_storage.narrow(head_dim, heads.start, heads.stop - heads.start)
        view._v_storage = self._v_storage.narrow(head_dim, heads.start, heads.stop - heads.start)
        view.key_block_sums = self.key_block_sums[:, heads]
        return view

    def selection(self, q: torch.Tensor) -> Selection:
        """The history blocks a chunk with queries ``q`` retrieves now (what ``attend`` uses).

        For inspection (heat maps, debugging retrieval): ``attend`` makes the same selection
        internally. Reads only the block sums, never the history.

        Args:
            q: ``[B, Hq, Lq, D]`` the chunk's queries (after RoPE), ``Lq <= max_chunk_tokens``.

        Returns:
            An [`omnimem.Selection`][omnimem.Selection] over the committed history.
        """
        if q.dim() != 4 or not 1 <= q.shape[2] <= self.max_chunk_tokens:
            raise ValueError(
                f"q must be [B, Hq, Lq, D] with 1 <= Lq <= {self.max_chunk_tokens}, got {tuple(q.shape)}"
            )
        # Offloaded, selection reads only the block sums: a zero-stride stand-in gives k's shape.
        keys = (
            self.k
            if self._offload is None
            else torch.zeros((), dtype=self.k.dtype, device=self.device).expand(self.k.shape)
        )
        return select_blocks(
            q,
            keys,
            history_len=self.history_len,
            chunk_len=q.shape[2],
            config=self.config,
            key_block_sums=self.key_block_sums,
        )

    def commit(self, k_chunk: torch.Tensor, v_chunk: torch.Tensor) -> None:
        """Append a finished chunk's keys/values to the history and update the block sums.

        Raises:
            ValueError: the chunk would exceed ``capacity`` (nothing is truncated), or has the
                wrong shape, dtype or device.
        """
        k_chunk = self._check_chunk("k_chunk", k_chunk)
        if self.history_len + k_chunk.shape[2] > self.capacity:
            raise ValueError(
                f"committing {k_chunk.shape[2]} tokens would exceed the cache capacity of {self.capacity} "
                f"tokens (history holds {self.history_len}); create the cache with a larger capacity"
            )
        if self._offload is not None:
            k_chunk, v_chunk = self._check_pair(k_chunk, v_chunk)
            self._offload.commit(self, k_chunk, v_chunk)
            self.history_len += k_chunk.shape[2]
        else:
            chunk_len = self._write_chunk(k_chunk, v_chunk)
            self._refresh_block_sums(self.history_len, self.history_len + chunk_len)
            self.history_len += chunk_len
        self.chunk_len, self._chunk_copy = 0, None  # an explicit commit ends attend_at's chunk

    def _refresh_block_sums(
        self, start: int, new_history_len: int, aligned_keys: torch.Tensor | None = None
    ) -> None:
        # Recompute the touched blocks with the stateless function on an aligned slice: the
        # same reduction over the same tokens, hence the same bits as a stateless call.
        # `aligned_keys`: those tokens from another buffer (offload: its device copy of them),
        # starting at the first touched block; by default read from the history.
        if new_history_len == start:
            return
        bs = self.config.block_size
        first, last = start // bs, math.ceil(new_history_len / bs)
        if aligned_keys is None:
            keys = self.k[:, :, first * bs : last * bs].to(self.device)
        else:
            keys = aligned_keys[:, :, : (last - first) * bs]
        local_history = torch.full((), new_history_len - first * bs, dtype=torch.int64, device=keys.device)
        self.key_block_sums[:, :, first:last] = block_key_sums(keys, local_history, bs)

    def reset(self) -> None:
        """Forget the history (buffers are kept, zeroed)."""
        self._sync_host()
        self._k_storage.zero_()
        self._v_storage.zero_()
        self.key_block_sums.zero_()
        self.history_len, self.chunk_len, self._chunk_copy = 0, 0, None
        if self._offload is not None:
            self._offload.reset()

    def _sync_host(self) -> None:
        """Wait for pending device-to-host commits before the host touches an offloaded history."""
        if self._offload is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the compute and the copy streams

    def state_dict(self) -> dict[str, object]:
        """The committed history (``[B, Hkv, history_len, D]`` clones) and its length. A
        quantized cache saves what it holds instead: its whole blocks' bytes (scales included),
        its partial last block (native) and its block sums (the native keys are gone)."""
        self._sync_host()
        if self.kv_format != "native":
            return self._quantized_state()
        return {
            "k": self.k[:, :, : self.history_len].clone(),
            "v": self.v[:, :, : self.history_len].clone(),
            "history_len": self.history_len,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore a ``state_dict()``; the block sums are recomputed from the keys.

        Everything is checked before the cache is touched: a refused state leaves it as it was.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        if self.kv_format != "native" or "kv_format" in state:
            self._load_quantized_state(state)
            return
        missing = [name for name in ("k", "v", "history_len") if name not in state]
        if missing:
            raise ValueError(f"state lacks {missing} (expected the keys of state_dict(): k, v, history_len)")
        k, v, history_len = state["k"], state["v"], state["history_len"]
        if isinstance(history_len, bool) or not isinstance(history_len, int):
            raise TypeError(f"state['history_len'] must be an int, got {type(history_len).__name__}")
        if not 0 <= history_len <= self.capacity:
            raise ValueError(
                f"state['history_len'] must be an int in [0, {self.capacity}], got {history_len!r}"
            )
        staged = [_copy_beside(name, x, self.k[:, :, :history_len]) for name, x in (("k", k), ("v", v))]
        self.reset()
        self.k[:, :, :history_len] = staged[0]
        self.v[:, :, :history_len] = staged[1]
        self._refresh_block_sums(0, history_len)
        self.history_len = history_len
        if self._offload is not None:
            self._offload.load_tail(self)

    def _quantized_state(self) -> dict[str, object]:
        n = self.history_len
        targets = self._quantized_targets(n)
        return {"kv_format": self.kv_format, "history_len": n,
                **{name: [t.clone() for t in ts] for name, ts in targets.items()}}  # fmt: skip

    def _quantized_targets(self, n: int) -> dict[str, list[torch.Tensor]]:
        """What a quantized cache at ``n`` history tokens saves, as views of its buffers: its
        whole blocks' bytes (scales included), its native partial block, its block sums."""
        bs = self.config.block_size
        sums = self.key_block_sums[:, :, : -(-n // bs)]
        return {
            "blocks": self._offload.store.head(n // bs),
            "partial": [t[:, :, : n % bs] for t in self._offload.work[0]],
            "key_block_sums": [sums.codes, sums.step] if isinstance(sums, Int8BlockSums) else [sums],
        }

    def _load_quantized_state(self, state: dict) -> None:
        """``load_state_dict`` of a quantized cache's ``state_dict``: checked and copied beside the
        cache first (a refused state changes nothing), then written in."""
        if state.get("kv_format") != self.kv_format:
            raise ValueError(
                f"state has kv_format={state.get('kv_format', 'native')!r}, this cache "
                f"{self.kv_format!r}: load a state_dict() of a cache with the same kv_format"
            )
        targets = self._quantized_targets(0)
        missing = [name for name in ("history_len", *targets) if name not in state]
        if missing:
            raise ValueError(f"state lacks {missing} (expected the keys of a quantized cache's state_dict())")
        n = state["history_len"]
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.capacity:
            raise ValueError(f"state['history_len'] must be an int in [0, {self.capacity}], got {n!r}")
        targets = self._quantized_targets(n)  # views: reset() below keeps the buffers
        staged = {}
        for name, views in targets.items():
            given = state[name]
            if not isinstance(given, list | tuple) or len(given) != len(views):
                raise ValueError(f"state[{name!r}] must be a list of {len(views)} tensors")
            staged[name] = [_copy_beside(name, x, view) for x, view in zip(given, views, strict=True)]
        self.reset()
        for name in ("blocks", "key_block_sums"):
            for view, x in zip(targets[name], staged[name], strict=True):
                view.copy_(x)
        self.history_len = n
        self._offload.forget(n)
        self._offload._write_partial(*staged["partial"])  # into both work buffers

    @classmethod
    def for_layers(cls, num_layers: int, capacity: int, **kwargs) -> list[OmniMemCache]:
        """One cache per attention layer, all alike (``kwargs`` as for the constructor).

        The memory of all the layers (host memory offloaded, else the GPU's) is checked before
        any is allocated.
        """
        sizes = [capacity] + [
            kwargs.get(name) for name in ("max_chunk_tokens", "batch", "num_kv_heads", "head_dim")
        ]
        dtype = kwargs.get("dtype", torch.float32)
        if all(isinstance(x, int) for x in sizes) and isinstance(
            dtype, torch.dtype
        ):  # else the constructor says
            total = num_layers * _history_bytes(*sizes, dtype)
            kv_format = kwargs.get("kv_format", "native")
            offload = kwargs.get("offload") is True
            if kv_format in ("fp8", "int4"):  # quantized: the device holds what kv_cache_bytes counts
                names = ("max_chunk_tokens", "batch", "num_kv_heads", "head_dim")
                per_layer = dict(zip(names, sizes[1:], strict=True), config=kwargs.get("config"))
                total = num_layers * kv_cache_bytes(
                    capacity, **per_layer, dtype=dtype, kv_format=kv_format, offload=offload
                )
                if offload:  # the quantized history in host memory; the device's share per layer
                    check_device_memory(total, torch.device(kwargs.get("device", "cpu")))
                    block_size = (kwargs.get("config") or OmniMemConfig()).block_size
                    total = num_layers * host_history_bytes(
                        capacity, kv_format=kv_format, num_kv_heads=sizes[3], head_dim=sizes[4],
                        batch=sizes[2], block_size=block_size,
                    )  # fmt: skip
            disk = kwargs.get("disk")
            if offload and isinstance(disk, (str, os.PathLike)):  # (else the constructor says)
                check_disk_space(total, disk, what=f"the histories of {num_layers} layers")
            elif offload:
                check_host_memory(total)
            else:
                check_device_memory(total, torch.device(kwargs.get("device", "cpu")))
        return [cls(capacity, **kwargs) for _ in range(num_layers)]


def _copy_beside(name: str, x: object, like: torch.Tensor) -> torch.Tensor:
    """``state[name]`` checked against ``like`` (shape, dtype) and copied into a scratch tensor
    beside the cache: a tensor that cannot be copied (on the meta device, say) fails here,
    before ``reset()`` has forgotten the history."""
    if not isinstance(x, torch.Tensor) or x.shape != like.shape:
        raise ValueError(f"state[{name!r}] must be a tensor of shape {tuple(like.shape)}")
    if x.dtype != like.dtype:
        raise TypeError(f"state[{name!r}] must have the cache's dtype {like.dtype}, got {x.dtype}")
    scratch = torch.empty_like(like)
    try:
        scratch.copy_(x)
    except (RuntimeError, NotImplementedError) as error:
        raise ValueError(
            f"state[{name!r}] cannot be copied into the cache ({x.device} -> {like.device}): {error}"
        ) from error
    return scratch


_replaying = contextvars.ContextVar("omnimem_replaying", default=True)


def may_replay() -> bool:
    """Whether a ``cuda_graphs`` cache replays its graphs now: not inside a capture (the
    caller's, or a larger one of omnimem's: a graph cannot launch inside one), not while dynamo
    traces, not inside ``no_replay``."""
    capturing = torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling()
    return _replaying.get() and not capturing


@contextlib.contextmanager
def no_replay() -> Iterator[None]:
    """Attends inside run eagerly and capture nothing of their own (a step that captures them
    into its own graph, e.g. ``ulysses_attention``'s)."""
    token = _replaying.set(False)
    try:
        yield
    finally:
        _replaying.reset(token)


@functools.cache
def graph_pool(device: torch.device) -> tuple[int, int]:
    """The memory pool of every omnimem graph on ``device``. Shared, so that what one graph
    uses only during its replay (selection workspaces, exchange buffers) is memory the next
    can use: graphs replay one after another on one stream, and each graph's output is cloned
    right after its replay, before another can overwrite it."""
    return torch.cuda.graph_pool_handle()


def graph_inputs(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Static input buffers of a graph: copies of ``xs`` in their memory order, dense."""
    return tuple(torch.empty_like(x).copy_(x) for x in xs)


@functools.cache
def _say_no_graph(backend: str) -> None:
    logging.getLogger("omnimem").info(
        "OmniMemCache(cuda_graphs=True): backend %r runs eagerly (graphs are captured for the triton "
        "backend only)",
        backend,
    )


def _history_bytes(
    capacity: int, max_chunk_tokens: int, batch: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Bytes of one cache's key and value buffers (history + one chunk of scratch)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * (capacity + max_chunk_tokens) * batch * num_kv_heads * head_dim * itemsize


def _compact_history(
    k: torch.Tensor, v: torch.Tensor, selection: Selection, history_len: int, chunk_len: int
) -> tuple[torch.Tensor, torch.Tensor, Selection]:
    """The history blocks ``selection`` attends, copied into ``[B, Hkv, U * bs + rem, D]`` (``U``
    slots for the whole blocks any group attends, ascending, zeros where a head attends fewer;
    then the ``rem`` tokens of a partial last block), and the selection renumbered to match a
    call on that copy followed by ``chunk_len`` chunk tokens. Only what the backends read is
    renumbered (``kv_block_idx``, the history length, the slot count): the result's
    ``selected_block_idx`` keeps the cache's numbering and it marks no sink or local blocks.
    Also returns the copied blocks ``[B, Hkv, U]`` (``num_history_blocks + 1``: an empty slot)."""
    bs = selection.block_size
    whole = history_len // bs
    rem = history_len - whole * bs
    table = selection.kv_block_idx.long()  # [B, Hkv, G, K]
    none = selection.num_history_blocks + 1
    flat = table.flatten(2)
    is_whole = (flat >= 0) & (flat < whole)
    width = max(1, min(flat.shape[-1], whole))
    union, (k_rows, v_rows) = gather_block_union(
        flat, is_whole, width=width, none=none, block_size=bs, buffers=(k, v)
    )
    position = torch.searchsorted(union, torch.where(is_whole, flat, none).contiguous())
    renumbered = torch.where(is_whole, position, torch.where(flat == whole, width, -1))
    new_idx = renumbered.view_as(table).int()
    slots = math.ceil((width * bs + rem + chunk_len) / bs)  # block slots of the compact keys
    compact_sel = dataclasses.replace(
        selection,
        kv_block_idx=new_idx,
        fixed_block_mask=torch.zeros(slots, dtype=torch.bool, device=k.device),
        history_len=torch.full((), width * bs + rem, dtype=selection.history_len.dtype, device=k.device),
        num_history_blocks=slots,
        planned_history_len=width * bs + rem,
    )
    partial = slice(whole * bs, history_len)
    compact_k = torch.cat([k_rows, k[:, :, partial]], dim=2)
    compact_v = torch.cat([v_rows, v[:, :, partial]], dim=2)
    return compact_k, compact_v, compact_sel, union
