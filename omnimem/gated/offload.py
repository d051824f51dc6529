"""Host offload for ``GatedCache(offload=True)``: full keys/values in host memory, the live
region and the block means on the device.

What a gated layer call reads at full resolution is the **live region** (the window branch's
last ``window_tokens`` positions, rounded down to a block, through the chunk: the same region
the training path keeps) and, for the selected branch, the history blocks its query groups
picked. So the device keeps:

- the block means (``PooledKV``: selection and the compressed branch read only these);
- the **tail**: one buffer holding the live region, re-based (a device-to-device copy) when a
  new chunk moves the window;

and each call copies the selected history blocks that lie before the live region out of the
pinned host memory, read in place over PCIe by one Triton kernel
(``omnimem.kernels.stage_blocks``), into a compact buffer in front of the live region, with
the selection renumbered into it (``GatedCache._attend_compact``). A chunk reaches the host
once, when the next chunk starts (its denoising rewrites stay on the device), on a side
stream; host reads wait for it with an event. No host sync, static shapes per chunk length.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from omnimem.selection import compact_numbering, gather_union_rows
from omnimem.sizing import staged_slots
from omnimem.store.blocks import QuantizedBlocks
from omnimem.store.staging import SOURCE_HOST, SOURCE_NONE, stage


class GatedHostOffload:
    """Device side of an offloaded ``GatedCache`` (see the module docstring)."""

    def __init__(self, cache, max_chunk_tokens: int) -> None:
        batch, heads, capacity, head_dim = cache.k.shape
        bs = cache.config.block_size
        # The live region spans at most max(window, chunk) tokens plus a partial block before.
        self.capacity = min(capacity, max(cache.config.window_tokens, max_chunk_tokens) + bs)
        self.device = cache.device
        if cache.layout == "bhld":
            shape = (batch, heads, self.capacity, head_dim)
            self._k = torch.zeros(shape, dtype=cache.dtype, device=self.device)
            self._v = torch.zeros_like(self._k)
        else:
            shape = (batch, self.capacity, heads, head_dim)
            self._k = torch.zeros(shape, dtype=cache.dtype, device=self.device).transpose(1, 2)
            self._v = torch.zeros(shape, dtype=cache.dtype, device=self.device).transpose(1, 2)
        # What input checks compare q with in place of the host buffers (no memory, made once).
        self.stand_in = torch.zeros((), dtype=cache.dtype, device=self.device).expand(cache.k.shape)
        self.start = 0  # the tail holds positions [start, cache.end)
        self.flushed = 0  # the host holds every position before this
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.copied: torch.cuda.Event | None = None

    def reset(self) -> None:
        self.wait_for_copies()
        self.start = self.flushed = 0

    def rows(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Device views of positions ``[lo, hi)``, which must lie in the tail."""
        lo, hi = lo - self.start, hi - self.start
        return self._k[:, :, lo:hi], self._v[:, :, lo:hi]

    def wait_for_copies(self) -> None:
        """Order the current stream after the last copy to the host (it reads the tail, and
        host readers need it)."""
        if self.copied is not None:
            torch.cuda.current_stream(self.device).wait_event(self.copied)
            self.copied = None

    def flush(self, cache, end: int) -> None:
        """Copy positions ``[flushed, end)`` from the tail to the host (a side stream on GPUs)."""
        if end <= self.flushed:
            self.flushed = min(self.flushed, end)
            return
        keys, values = self.rows(self.flushed, end)
        if self.copy_stream is None:
            cache.k[:, :, self.flushed : end].copy_(keys)
            cache.v[:, :, self.flushed : end].copy_(values)
        else:
            self.wait_for_copies()
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                cache.k[:, :, self.flushed : end].copy_(keys, non_blocking=True)
                cache.v[:, :, self.flushed : end].copy_(values, non_blocking=True)
                self.copied = torch.cuda.Event()
                self.copied.record(self.copy_stream)
        self.flushed = end

    def prepare(self, cache, start: int, stop: int, live_start: int) -> None:
        """Before writing ``[start, stop)``: the previous chunk to the host if this one is new,
        and the tail re-based so that it holds ``[live_start, start)`` with room up to ``stop``."""
        if start == cache.end:  # a new chunk: everything before it is final
            self.flush(cache, start)
        if self.start <= live_start and stop - self.start <= self.capacity:
            return
        self.wait_for_copies()  # the copy may still read the tail we are about to move
        keep = start - live_start
        if self.start <= live_start and start <= cache.end:  # in the tail: shift it down
            keys, values = (x.clone() for x in self.rows(live_start, start))
        else:  # after a rewind past the tail: from the host
            keys, values = cache.k[:, :, live_start:start], cache.v[:, :, live_start:start]
        self.start = live_start
        self._k[:, :, :keep].copy_(keys, non_blocking=True)
        self._v[:, :, :keep].copy_(values, non_blocking=True)

    def write(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        keys, values = self.rows(start, start + k.shape[2])
        keys.copy_(k.detach())
        values.copy_(v.detach())

    def rewind(self, cache, end: int) -> None:
        """Keep ``[0, end)``: what only the tail held there reaches the host first."""
        self.flush(cache, min(end, cache.end))
        self.flushed = min(self.flushed, end)

    def history_rows(self, cache, union: torch.Tensor, none: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens of the ``union [B, H, W]`` blocks (``none``: an empty slot) from the
        host: ``[B, H, W * block_size, D]`` each (empty slots are never written nor read)."""
        bs = cache.config.block_size
        if getattr(cache, "disk", None) is not None:
            # A file mapping: kernels cannot read it, so the host gathers the blocks (it must
            # know which: one synchronization) and they travel to the device.
            self.wait_for_copies()
            blocks = union.cpu()
            rows = gather_union_rows(blocks, none=none, block_size=bs, buffers=(cache.k, cache.v))
            return tuple(x.to(self.device, non_blocking=True) for x in rows)
        batch, heads, width = union.shape
        shape = (batch, heads, width * bs, cache.k.shape[-1])
        source = torch.where(union < none, SOURCE_HOST, SOURCE_NONE).int()
        block = torch.where(union < none, union, 0).long()
        self.wait_for_copies()  # the copy reads what the last flush sent to the host
        dst = tuple(torch.empty(shape, dtype=cache.dtype, device=self.device) for _ in range(2))
        stage(dst, dst, dst, (cache.k, cache.v), source, block, bs)  # only host sources
        return dst


class GatedQuantizedHistory(GatedHostOffload):
    """Device side of a ``GatedCache(kv_format="fp8" | "int4")``: the live region native in the
    tail, as offloaded, and the history before it as quantized blocks on the device
    (``omnimem.store.blocks.QuantizedBlocks``) instead of native rows in host memory.

    A block is quantized once, from the tail's native rows, when a new chunk starts after it
    (whole blocks only: a block the chunk starts in waits for the next). Selected history
    blocks before the live region are read back dequantized into the compact buffer (the
    reference path; kernels that read the bytes in place come next, docs/memory.md). Rewinding
    before the live region is refused: those tokens exist only quantized.
    """

    HOST = False  # where the store lives: the device here, pinned host memory when offloaded

    def __init__(self, cache, max_chunk_tokens: int, kv_format: str) -> None:
        super().__init__(cache, max_chunk_tokens)
        batch, heads, capacity, head_dim = cache.k.shape
        self.make = functools.partial(
            QuantizedBlocks, kv_format, batch=batch, num_kv_heads=heads, head_dim=head_dim,
            block_size=cache.config.block_size, device=self.device,
        )  # fmt: skip
        disk = getattr(cache, "disk", None) if self.HOST else None
        self.store = self.make(capacity=capacity, host=self.HOST, disk=disk)
        if not self.HOST:
            self.copy_stream = None  # quantized on the compute stream: nothing to wait for
        self.dtype = cache.dtype

    def selected_source(self, cache, selection, live_start: int, seq_len: int):
        """What the selected-branch kernel reads: ``(store, selection, live_first, seq_len)``,
        table entries below ``live_first`` being blocks of ``store`` (here the whole history's
        store, in its own numbering)."""
        return self.store, selection, live_start // cache.config.block_size, seq_len

    def flush(self, cache, end: int) -> None:
        """Quantize the whole blocks of ``[flushed, end)`` from the tail into the store."""
        bs = cache.config.block_size
        cut = end // bs * bs
        if cut <= self.flushed:
            self.flushed = min(self.flushed, cut)
            return
        keys, values = self.rows(self.flushed, cut)
        self.store.write(self.flushed // bs, keys, values)
        self.flushed = cut

    def prepare(self, cache, start: int, stop: int, live_start: int) -> None:
        if live_start < self.start and start > live_start:  # would re-read quantized history natively
            raise ValueError(
                f"the live region would start at {live_start}, before the native rows kept from "
                f"{self.start}: a quantized cache keeps only the live region natively"
            )
        super().prepare(cache, start, stop, live_start)

    def rewind(self, cache, end: int) -> None:
        if end < self.start:
            raise ValueError(
                f"rewind({end}) reaches before the live region (native from {self.start}): with "
                f"kv_format={self.store.kv_format!r} the history before it is kept only quantized; "
                "reset() and write the video again, or use kv_format='native'"
            )
        super().rewind(cache, end)
        self.flushed = min(self.flushed, end // cache.config.block_size * cache.config.block_size)

    def history_rows(self, cache, union: torch.Tensor, none: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``union [B, H, W]`` blocks (``none``: an empty slot, never read) dequantized."""
        return self.store.rows(torch.where(union < none, union, 0).long(), self.dtype)


class GatedQuantizedOffload(GatedQuantizedHistory):
    """Device side of a ``GatedCache(offload=True, kv_format="fp8" | "int4")``: the quantized
    blocks in pinned host memory. A block is quantized on the device once (into ``scratch``,
    when a new chunk starts after it) and copied to the host on a side stream; each call stages
    the bytes of the union of its groups' selected history blocks (scales included: the bus
    carries the format's bytes) into a device store of ``width`` slots, which the selected
    kernel reads in place, with the table renumbered into it (the compact numbering of
    ``GatedCache._attend_compact``)."""

    HOST = True

    def __init__(self, cache, max_chunk_tokens: int, kv_format: str) -> None:
        super().__init__(cache, max_chunk_tokens, kv_format)
        bs, config = cache.config.block_size, cache.config
        self.scratch = self.make(capacity=max_chunk_tokens + 2 * bs)  # what one flush quantizes
        self.staged = self.make(capacity=staged_slots(config, max_chunk_tokens) * bs)

    def flush(self, cache, end: int) -> None:
        """Quantize the whole blocks of ``[flushed, end)`` on the device, then copy them to the
        host store (a side stream on GPUs; ``wait_for_copies`` orders the readers)."""
        bs = cache.config.block_size
        cut = end // bs * bs
        if cut <= self.flushed:
            self.flushed = min(self.flushed, cut)
            return
        self.wait_for_copies()  # the previous copy reads the scratch store
        keys, values = self.rows(self.flushed, cut)
        first, count = self.flushed // bs, (cut - self.flushed) // bs
        self.scratch.write(0, keys, values)
        if self.copy_stream is None:
            self.store.copy_blocks_(self.scratch, first, 0, count)
        else:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                self.store.copy_blocks_(self.scratch, first, 0, count)
                self.copied = torch.cuda.Event()
                self.copied.record(self.copy_stream)
        self.flushed = cut

    def _stage_union(self, union: torch.Tensor, none: int) -> None:
        """The ``union [B, H, W]`` blocks' bytes from the host into slots ``[0, W)`` of ``staged``
        (on disk: gathered by the host from the file mapping, which kernels cannot read; one
        synchronization, as the native history on disk)."""
        if self.store.disk is not None:
            self.wait_for_copies()
            blocks = union.cpu()
            for (into, rows), (stored, _) in zip(self.staged.pairs(), self.store.pairs(), strict=True):
                gathered = gather_union_rows(blocks, none=none, block_size=rows, buffers=stored)
                for dst, got in zip(into, gathered, strict=True):
                    dst[:, :, : got.shape[2]].copy_(got, non_blocking=True)
            return
        source = torch.where(union < none, SOURCE_HOST, SOURCE_NONE).int()
        block = torch.where(union < none, union, 0).long()
        self.wait_for_copies()  # the staging reads what the last flush sent to the host
        for (into, rows), (host, _) in zip(self.staged.pairs(), self.store.pairs(), strict=True):
            stage(into, into, into, host, source, block, rows)  # only host sources

    def history_rows(self, cache, union: torch.Tensor, none: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``union [B, H, W]`` blocks, staged from the host, dequantized (the reference path)."""
        self._stage_union(union, none)
        slots = torch.arange(union.shape[-1], device=union.device).expand_as(union)
        return self.staged.rows(slots, self.dtype)

    def selected_source(self, cache, selection, live_start: int, seq_len: int):
        """The union of the selected history blocks staged into ``staged`` (slots ``[0, W)``),
        the table renumbered onto it (``omnimem.selection.compact_numbering``: live blocks
        follow at ``W``); ``seq_len`` the compact length."""
        bs = cache.config.block_size
        union, renumbered = compact_numbering(selection.block_idx.long().flatten(2), live_start // bs)
        width = 0 if union is None else union.shape[-1]
        if union is not None:
            self._stage_union(union, live_start // bs + 1)
        compact_len = width * bs + seq_len - live_start
        compact = dataclasses.replace(
            selection,
            block_idx=renumbered.view_as(selection.block_idx).int(),
            seq_len=torch.full((), compact_len, dtype=torch.int64, device=renumbered.device),
        )
        return self.staged, compact, width, compact_len
