"""Host offload for ``OmniMemCache(offload=True)``: the history in host memory, staged blocks on the device.

Selection needs only the per-block key sums, which stay on the device; attention needs only the
blocks a chunk selects. So the full history lives in (pinned) host memory, and each call
**stages** the blocks it needs into a device work buffer laid out as::

    [ staged whole blocks, ascending | the history's partial last block | the chunk ]

Each staged block comes from the cheapest place that holds it: the previous call's work buffer
(denoising steps of one chunk select nearly the same blocks; sink and local-window blocks are
needed by every call), the blocks of the last commit (kept on the device: the next chunk's local
window), or the host, read in place over PCIe by one Triton kernel
(``omnimem.kernels.stage_blocks``). Two work buffers alternate, so a call copies hits from the
other one. Deciding the sources is a handful of tensor ops on the device: no host sync, static
shapes.

Because staged blocks keep their ascending order, the selection table maps to the work buffer
monotonically (``kv_block_idx`` becomes positions in the staging), every backend visits the same
blocks in the same order as on the resident cache, and the triton and gather backends are
bit-identical to it, with or without query groups.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from omnimem.api import resolve_backend, sparse_attention
from omnimem.compile import compile_static
from omnimem.positions import buffer_positions
from omnimem.selection import sorted_unique
from omnimem.sizing import staging_sizes
from omnimem.store.disk import read_blocks
from omnimem.store.host import host_zeros
from omnimem.store.staging import SOURCE_FRESH, SOURCE_HOST, SOURCE_NONE, SOURCE_PREVIOUS, OffloadStats, stage


def staging_plan(
    table: torch.Tensor,
    previous_staged: torch.Tensor,
    bounds: torch.Tensor,
    num_staged: int,
    num_blocks: int,
) -> tuple[torch.Tensor, ...]:
    """What one call stages, from where, and the table remapped to the work buffer.

    Args:
        table: ``[B, H, G, K]`` the selection's ``kv_block_idx`` (history blocks, ``-1`` padded).
        previous_staged: ``[B, H, num_staged]`` the blocks the previous call staged (ascending;
            ``num_blocks`` marks an empty slot).
        bounds: ``[3]`` int64 on the device: whole history blocks, and the first and end block
            of the last commit kept on the device.

    Returns:
        ``(staged, source, source_block, remapped, counts)``: the ascending blocks to stage,
        their ``SOURCE_*`` and index in that source (``[B, H, num_staged]``), the table with
        history blocks replaced by staging positions (the partial block by ``num_staged``),
        and ``[requested, hits, fetched]`` block counts.
    """
    full_blocks, fresh_first, fresh_end = bounds[0], bounds[1], bounds[2]
    rows = table.flatten(2).long()  # every group's row: the staging holds their union
    whole = (rows >= 0) & (rows < full_blocks)  # the partial block lives after the staging
    staged = sorted_unique(torch.where(whole, rows, num_blocks), none=num_blocks)
    padding = num_staged - staged.shape[-1]
    if padding > 0:
        staged = torch.cat([staged, staged.new_full((*staged.shape[:2], padding), num_blocks)], -1)
    staged = staged[..., :num_staged].contiguous()  # past the union's size: only padding
    valid = staged < num_blocks
    position = torch.searchsorted(previous_staged, staged).clamp(max=num_staged - 1)
    from_previous = valid & (previous_staged.gather(-1, position) == staged)
    from_fresh = valid & ~from_previous & (staged >= fresh_first) & (staged < fresh_end)
    from_host = valid & ~from_previous & ~from_fresh
    source = torch.where(from_previous, SOURCE_PREVIOUS, SOURCE_NONE)
    source = torch.where(from_fresh, SOURCE_FRESH, source)
    source = torch.where(from_host, SOURCE_HOST, source).int()
    source_block = torch.where(from_previous, position, staged)
    source_block = torch.where(from_fresh, staged - fresh_first, source_block)
    source_block = torch.where(valid, source_block, 0)
    slot = torch.searchsorted(staged, rows.clamp(min=0))
    remapped = torch.where(whole, slot, torch.where(rows >= 0, num_staged, -1))
    counts = torch.stack([valid.sum(), (from_previous | from_fresh).sum(), from_host.sum()])
    return staged, source, source_block, remapped.view(table.shape).to(table.dtype), counts


@functools.cache
def _compiled_staging_plan():
    # ~30 small kernels eagerly: launch-bound on a GPU (measured 2.3x the attention's time).
    return compile_static(staging_plan)


class HostOffload:
    """Device side of an offloaded ``OmniMemCache`` (see the module docstring)."""

    NATIVE_STAGING = True  # staged blocks are native rows of the work buffers

    def __init__(self, cache) -> None:
        batch, heads, length, head_dim = cache.k.shape
        config, bs = cache.config, cache.config.block_size
        self.block_size = bs
        self.num_blocks = math.ceil(length / bs)  # the cache's block slots; also "no block"
        self.num_staged, work_len, fresh_len = staging_sizes(config, length, cache.max_chunk_tokens)
        # The work buffers' token numbering: staged blocks, then the history's partial block
        # (at partial_start) and the chunk. Native staging keeps all of it in the native
        # buffers; a quantized one stages into quantized stores and keeps only the tail
        # [partial | chunk] natively, from tail_start.
        self.partial_start = self.num_staged * bs
        self.tail_start = self.partial_start if self.NATIVE_STAGING else 0
        blocks_in_work = math.ceil(work_len / bs)  # of the numbering: the remapped table's width
        work_len -= self.partial_start - self.tail_start

        # Device buffers in the cache's layout: chunk writes and commit copies to the host are
        # then plain memory copies.
        def zeros(length: int) -> torch.Tensor:
            if cache.layout == "bhld":
                return torch.zeros(batch, heads, length, head_dim, dtype=cache.k.dtype, device=cache.device)
            shape = (batch, length, heads, head_dim)
            return torch.zeros(shape, dtype=cache.k.dtype, device=cache.device).transpose(1, 2)

        self.work = [(zeros(work_len), zeros(work_len)) for _ in range(2)]
        self.current = 0  # the work buffer the last call used
        # Blocks of the last commit, [partial | chunk]: the next chunk's local window.
        self.fresh = (zeros(fresh_len), zeros(fresh_len))
        # Commits copy to the host on a side stream, overlapped with whatever the model runs
        # next; the event orders later host reads and rewrites of `fresh` after the copy.
        self.device = cache.device
        self.copy_stream = torch.cuda.Stream(cache.device) if cache.device.type == "cuda" else None
        self.copied: torch.cuda.Event | None = None
        self.compiled = config.compile and cache.device.type == "cuda"
        # Device scalars, updated only by commits and restores (no per-call host-to-device
        # traffic): whole history blocks, first and end block of the last commit; the work
        # buffer's history length.
        self.bounds = torch.zeros(3, dtype=torch.long, device=cache.device)
        self.work_history = torch.full((), self.partial_start, dtype=torch.long, device=cache.device)
        self.no_fixed_blocks = torch.zeros(blocks_in_work, dtype=torch.bool, device=cache.device)
        # The last call's staged blocks (ascending; num_blocks = an empty slot).
        self.staged_block = torch.full(
            (batch, heads, self.num_staged), self.num_blocks, dtype=torch.long, device=cache.device
        )
        self.counters = torch.zeros(3, dtype=torch.long, device=cache.device)  # requested, hits, fetched
        self.block_bytes = 2 * bs * head_dim * cache.k.element_size()  # keys and values
        # A history on disk (omnimem.store.disk): the blocks a call fetches pass through these
        # page-locked rows, one slot per staging slot (kernels cannot read a file mapping).
        self.bounce = None
        if getattr(cache, "disk", None) is not None and self.NATIVE_STAGING:
            shape, pin = (batch, heads, self.num_staged * bs, head_dim), cache.device.type == "cuda"
            self.bounce = tuple(host_zeros(shape, cache.k.dtype, pin=pin) for _ in "kv")

    def _through_bounce(self, held, bounce, source: torch.Tensor, source_block: torch.Tensor):
        """The history's blocks this call fetches, read by the host from a disk mapping
        (``held``: ``pairs``-style ``[((a, b), rows_per_block)]``) into the page-locked
        ``bounce`` slots (slot ``s`` holds the ``s``-th fetched block's rows); returns the source
        blocks renumbered onto them. Synchronizes with the host: it must know which blocks to
        read (which also orders the previous call's reads of the bounce slots before these
        writes)."""
        slots = (source == SOURCE_HOST).cpu().nonzero()  # [n, 3]: batch, head, staging slot
        blocks = source_block.cpu()[tuple(slots.T)]
        for (stored, rows), (buffers, _) in zip(held, bounce, strict=True):
            for from_disk, into in zip(stored, buffers, strict=True):
                read_blocks(from_disk, into, blocks, slots, rows)
        slot = torch.arange(source.shape[-1], device=source.device).expand_as(source_block)
        return torch.where(source == SOURCE_HOST, slot, source_block)

    @property
    def stats(self) -> OffloadStats:
        requested, hits, fetched = self.counters.tolist()
        return OffloadStats(requested, hits, fetched * self.block_bytes)

    def reset(self) -> None:
        for pair in (*self.work, self.fresh):
            for buffer in pair:
                buffer.zero_()
        self.forget()
        self.counters.zero_()

    def forget(self, history_len: int = 0) -> None:
        """Drop what the device holds of the history (after a reset, restore or rewind to
        ``history_len`` tokens): nothing staged, no fresh blocks."""
        self.staged_block.fill_(self.num_blocks)
        self._set_bounds(history_len, 0, 0)

    def _set_bounds(self, history_len: int, fresh_first: int, fresh_end: int) -> None:
        self.bounds[0].fill_(history_len // self.block_size)
        self.bounds[1].fill_(fresh_first)
        self.bounds[2].fill_(fresh_end)
        self.work_history.fill_(self.partial_start + history_len % self.block_size)

    def _write_partial(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """The history's partial last block, into both work buffers."""
        end = self.tail_start + k.shape[2]
        for work_k, work_v in self.work:
            work_k[:, :, self.tail_start : end] = k
            work_v[:, :, self.tail_start : end] = v

    def load_tail(self, cache) -> None:
        """Copy the history's partial last block from the host (after a restore)."""
        self.forget(cache.history_len)
        start = cache.history_len // self.block_size * self.block_size
        if start < cache.history_len:
            self._write_partial(
                cache.k[:, :, start : cache.history_len].to(cache.device),
                cache.v[:, :, start : cache.history_len].to(cache.device),
            )

    def attend(self, cache, q: torch.Tensor, k_chunk: torch.Tensor, v_chunk: torch.Tensor, return_lse: bool):
        bs, history_len = self.block_size, cache.history_len
        partial = history_len % bs
        previous, dst = self.work[self.current], self.work[1 - self.current]
        chunk_start = self.partial_start + partial
        dst[0][:, :, chunk_start : chunk_start + k_chunk.shape[2]] = k_chunk
        dst[1][:, :, chunk_start : chunk_start + v_chunk.shape[2]] = v_chunk
        selection = cache.selection(q)
        self.wait_for_copies()  # the stage kernel may read what a commit copied to the host
        plan = _compiled_staging_plan() if self.compiled else staging_plan
        staged, source, source_block, remapped, counts = plan(
            selection.kv_block_idx, self.staged_block, self.bounds, self.num_staged, self.num_blocks
        )
        host = (cache.k, cache.v)
        if self.bounce is not None:
            source_block = self._through_bounce([(host, bs)], [(self.bounce, bs)], source, source_block)
            host = self.bounce
        stage(dst, previous, self.fresh, host, source, source_block, bs)
        self.staged_block, self.current = staged, 1 - self.current
        self.counters += counts
        remapped_selection = dataclasses.replace(
            selection,
            kv_block_idx=remapped,
            fixed_block_mask=self.no_fixed_blocks,
            history_len=self.work_history,
            num_history_blocks=self.no_fixed_blocks.shape[0],
            planned_history_len=None,  # remapped onto the staging buffer: its own history length
        )
        keys, values, chunk_len = dst[0], dst[1], k_chunk.shape[2]
        if cache.positions is not None:  # relative positions: the staged keys rotated in time
            key_pos, q_pos = buffer_positions(
                cache.positions, staged, self.num_blocks, selection.kv_block_idx, history=history_len,
                block_size=bs, local_tokens=cache.config.local_tokens, chunk_len=chunk_len,
                length=keys.shape[2],
            )  # fmt: skip
            q = cache.positions.rotate(q, q_pos)
            if reads_in_place(cache, q):  # by the kernel, where they lie in the staging buffer
                from omnimem.backends.triton import rotating_forward

                out, lse = rotating_forward(
                    q, keys, values, remapped_selection, chunk_len=chunk_len, return_lse=return_lse,
                    scale=cache.config.scale or q.shape[-1] ** -0.5, rotation=token_rotation(cache, key_pos),
                )  # fmt: skip
                return (out, lse) if return_lse else out
            keys = cache.positions.rotate(keys, key_pos)  # a rotated copy
        return sparse_attention(
            q,
            keys,
            values,
            history_len=chunk_start,
            chunk_len=chunk_len,
            config=cache.config,
            return_lse=return_lse,
            selection=remapped_selection,
        )

    def wait_for_copies(self) -> None:
        """Order the current stream after the last commit's copy to the host."""
        if self.copied is not None:
            torch.cuda.current_stream(self.device).wait_event(self.copied)

    def commit(self, cache, k_chunk: torch.Tensor, v_chunk: torch.Tensor) -> None:
        bs, start = self.block_size, cache.history_len
        end = start + k_chunk.shape[2]
        first, partial = start // bs, start % bs
        self.wait_for_copies()  # `fresh` is the source of the previous commit's copy
        fresh_k, fresh_v = self.fresh
        work_k, work_v = self.work[self.current]
        fresh_k[:, :, :partial] = work_k[:, :, self.tail_start : self.tail_start + partial]
        fresh_v[:, :, :partial] = work_v[:, :, self.tail_start : self.tail_start + partial]
        fresh_k[:, :, partial : partial + k_chunk.shape[2]] = k_chunk
        fresh_v[:, :, partial : partial + v_chunk.shape[2]] = v_chunk
        # The block-aligned slice the resident cache sums, from the device copy: the same bits.
        cache._refresh_block_sums(start, end, aligned_keys=fresh_k)
        self._keep(cache, start, end)
        self._set_bounds(end, first, end // bs)
        new_partial = end % bs
        if new_partial:
            at = (end // bs - first) * bs
            self._write_partial(fresh_k[:, :, at : at + new_partial], fresh_v[:, :, at : at + new_partial])

    def _completed(self, start: int, end: int) -> tuple[int, int, torch.Tensor, torch.Tensor]:
        """``(first, done, k, v)``: the blocks ``[first, done)`` a commit of ``[start, end)``
        completes, and their native rows (views of ``fresh``, which starts at block ``first``)."""
        first, done = start // self.block_size, end // self.block_size
        whole = (done - first) * self.block_size
        return first, done, self.fresh[0][:, :, :whole], self.fresh[1][:, :, :whole]

    def _keep(self, cache, start: int, end: int) -> None:
        """The committed ``[start, end)`` (in ``fresh`` from the start of its first block) into
        the history: device to host, from our own copy of the chunk (the caller may reuse its
        tensors), straight into the pinned history; host-side readers (state_dict) synchronize
        first."""
        partial = start % self.block_size
        fresh_k, fresh_v = self.fresh
        sources = (
            fresh_k[:, :, partial : partial + end - start],
            fresh_v[:, :, partial : partial + end - start],
        )
        if self.copy_stream is None:
            cache.k[:, :, start:end].copy_(sources[0])
            cache.v[:, :, start:end].copy_(sources[1])
        else:
            self.copy_stream.wait_stream(torch.cuda.current_stream(cache.device))
            with torch.cuda.stream(self.copy_stream):
                cache.k[:, :, start:end].copy_(sources[0], non_blocking=True)
                cache.v[:, :, start:end].copy_(sources[1], non_blocking=True)
                self.copied = torch.cuda.Event()
                self.copied.record(self.copy_stream)


def token_rotation(cache, key_pos: torch.Tensor):
    """A ``KeyRotation`` from per-token positions ``[B, H, L]`` of a staging buffer (its
    ``frame_tokens`` is 1: each token is its own entry)."""
    from omnimem.backends.triton_attention import KeyRotation

    cos, sin = cache.positions.cos_sin
    return KeyRotation(key_pos.to(torch.int32).contiguous(), cos, sin, 1)


def reads_in_place(cache, q: torch.Tensor) -> bool:
    """Whether ``q``'s call on ``cache`` runs on the triton backend (``resolve_backend``: config,
    ``use_backend``, ``OMNIMEM_BACKEND``, then ``auto``'s choice), whose kernel reads a quantized
    history's bytes in place."""
    return resolve_backend(cache.config, q.device, dtype=q.dtype, head_dim=q.shape[-1]) == "triton"


def quantized_run(
    cache, q, store, tail, selection, history_len: int, return_lse: bool, rotation=None, key_rotation=None
):
    """Attention of ``q`` over the whole blocks of ``store`` its ``selection`` names (block
    numbering of the store; ``history_len`` tokens, the partial block and the chunk in ``tail``):
    on the triton backend the kernel that reads the bytes in place, otherwise the reference path
    (``store`` dequantized, then the backend: callers pass a small staged store there).
    ``rotation``: relative positions, ``buffer_positions`` but for ``length`` (the dequantized
    keys' tokens): those keys and ``q`` rotated in time (the reference path). ``key_rotation``:
    a ``KeyRotation`` for the in-place kernel (``q`` already rotated)."""
    from omnimem.backends.quantized_attention import dequantized_history, quantized_attention
    from omnimem.backends.triton import check_inputs, tile_tables

    chunk_len = tail[0].shape[2] - history_len % store.block_size
    if rotation is not None or not reads_in_place(cache, q):
        k, v = dequantized_history(store, *tail, history_len=history_len, dtype=tail[0].dtype)
        pad = selection.num_history_blocks * store.block_size - k.shape[2]  # the table's numbering
        k, v = (torch.nn.functional.pad(x, (0, 0, 0, max(pad, 0))) for x in (k, v))
        if rotation is not None:
            key_pos, q_pos = rotation(length=k.shape[2])
            k, q = cache.positions.rotate(k, key_pos), cache.positions.rotate(q, q_pos)
        return sparse_attention(q, k, v, history_len=history_len, chunk_len=chunk_len, config=cache.config,
                                return_lse=return_lse, selection=selection)  # fmt: skip
    check_inputs(q)
    block_m = 128 if q.device.type == "cuda" else 16  # the tuned kernel's tile (backends.triton)
    block_idx, num_blocks = tile_tables(selection, q_len=q.shape[2], block_m=block_m)
    out, lse = quantized_attention(
        q, store, *tail, block_idx=block_idx, num_blocks=num_blocks,
        block_attended=selection.attended_block_mask() if selection.num_query_groups > 1 else None,
        history_len=history_len, chunk_len=chunk_len, query_group_size=selection.query_group_size,
        scale=cache.config.scale or q.shape[-1] ** -0.5, return_lse=return_lse, block_m=block_m,
        rotation=key_rotation,
    )  # fmt: skip
    return (out, lse) if return_lse else out


class QuantizedHistory(HostOffload):
    """Device side of an ``OmniMemCache(kv_format="fp8" | "int4")``: the history's whole blocks
    quantized once, when a commit completes them, in a ``QuantizedBlocks`` store on the device
    (``QuantizedOffload``: in pinned host memory); the history's partial last block and the
    chunk stay native in a small tail, and block sums come from the native keys, so selection is
    unchanged. The triton backend reads a resident store's bytes in place and stages nothing.
    Otherwise each call stages the bytes of the blocks it selected (scales included) into one of
    two small device stores, from the other one (the previous call's blocks), the last commit's
    blocks (``fresh_store``) or the store: the triton kernel reads the staged bytes, the other
    backends dequantize them (the reference path)."""

    NATIVE_STAGING = False
    HOST = False

    def __init__(self, cache, kv_format: str) -> None:
        super().__init__(cache)
        from omnimem.store.blocks import QuantizedBlocks
        from omnimem.store.formats import token_bytes

        batch, heads, _, head_dim = cache.k.shape
        bs = self.block_size
        make = functools.partial(
            QuantizedBlocks, kv_format, batch=batch, num_kv_heads=heads, head_dim=head_dim, block_size=bs,
            device=cache.device,
        )  # fmt: skip
        disk = getattr(cache, "disk", None) if self.HOST else None
        self.store = make(capacity=cache.capacity, host=self.HOST, disk=disk)
        # On disk: the blocks a call fetches pass through these page-locked slots (one a staging
        # slot), since kernels cannot read a file mapping.
        self.quantized_bounce = None if disk is None else make(capacity=self.num_staged * bs, host=True)
        self.stores = [make(capacity=self.num_staged * bs) for _ in range(2)]
        self.fresh_store = make(capacity=self.fresh[0].shape[2])
        self.block_bytes = round(token_bytes(kv_format, head_dim=head_dim, block_size=bs) * bs)
        if not self.HOST:
            self.copy_stream = None  # the store is written on the compute stream

    def attend(self, cache, q: torch.Tensor, k_chunk: torch.Tensor, v_chunk: torch.Tensor, return_lse: bool):
        from omnimem.backends.quantized_tiles import check_kernel_device

        in_place = reads_in_place(cache, q)
        if in_place:  # a GPU the kernels cannot decode on: refused before the write
            check_kernel_device(cache.kv_format, q.device)
        history_len, chunk_len = cache.history_len, k_chunk.shape[2]
        partial = history_len % self.block_size
        tail_k, tail_v = (t[:, :, : partial + chunk_len] for t in self.work[0])  # both hold the partial block
        tail_k[:, :, partial:] = k_chunk
        tail_v[:, :, partial:] = v_chunk
        selection = cache.selection(q)
        relative = cache.positions is not None  # keys rotated in time per call
        if not self.HOST and in_place:
            # The kernel reads the store in place; with relative positions it rotates each key
            # tile in time after decoding it.
            key_rotation = None
            if relative:
                table = selection.kv_block_idx if history_len else None
                key_rotation, q = cache.key_rotation(q, table, chunk_len)
            return quantized_run(
                cache, q, self.store, (tail_k, tail_v), selection, history_len, return_lse,
                key_rotation=key_rotation,
            )  # fmt: skip
        self.wait_for_copies()  # staging may read what a commit copied to the host
        plan = _compiled_staging_plan() if self.compiled else staging_plan
        staged, source, source_block, remapped, counts = plan(
            selection.kv_block_idx, self.staged_block, self.bounds, self.num_staged, self.num_blocks
        )
        previous, dst = self.stores[self.current], self.stores[1 - self.current]
        held = self.store
        if self.quantized_bounce is not None:
            bounce = self.quantized_bounce.pairs()
            source_block = self._through_bounce(held.pairs(), bounce, source, source_block)
            held = self.quantized_bounce
        for (into, rows), (prev, _), (fresh, _), (host, _) in zip(
            dst.pairs(), previous.pairs(), self.fresh_store.pairs(), held.pairs(), strict=True
        ):
            stage(into, prev, fresh, host, source, source_block, rows)
        self.staged_block, self.current = staged, 1 - self.current
        self.counters += counts
        remapped_selection = dataclasses.replace(
            selection, kv_block_idx=remapped, fixed_block_mask=self.no_fixed_blocks,
            history_len=self.work_history, num_history_blocks=self.no_fixed_blocks.shape[0],
            planned_history_len=None,
        )  # fmt: skip
        rotation = key_rotation = None
        if relative:
            rotation = functools.partial(
                buffer_positions, cache.positions, staged, self.num_blocks, selection.kv_block_idx,
                history=history_len, block_size=self.block_size, local_tokens=cache.config.local_tokens,
                chunk_len=chunk_len,
            )  # fmt: skip
            if reads_in_place(cache, q):  # the kernel rotates the staged keys after decoding them
                key_pos, q_pos = rotation(length=self.partial_start + partial + chunk_len)
                q, rotation = cache.positions.rotate(q, q_pos), None
                key_rotation = token_rotation(cache, key_pos)
        return quantized_run(
            cache,
            q,
            dst,
            (tail_k, tail_v),
            remapped_selection,
            self.partial_start + partial,
            return_lse,
            rotation,
            key_rotation=key_rotation,
        )

    def _keep(self, cache, start: int, end: int) -> None:
        """Quantize the blocks ``[start, end)`` completes into the fresh store, then copy them to
        the store (to the host on a side stream; ``wait_for_copies`` orders later readers)."""
        first, done, fresh_k, fresh_v = self._completed(start, end)
        if done == first:
            return
        self.fresh_store.write(0, fresh_k, fresh_v)
        if self.copy_stream is None:
            self.store.copy_blocks_(self.fresh_store, first, 0, done - first)
            return
        self.copy_stream.wait_stream(torch.cuda.current_stream(cache.device))
        with torch.cuda.stream(self.copy_stream):
            self.store.copy_blocks_(self.fresh_store, first, 0, done - first)
            self.copied = torch.cuda.Event()
            self.copied.record(self.copy_stream)


class QuantizedOffload(QuantizedHistory):
    """Device side of an ``OmniMemCache(offload=True, kv_format=...)``: ``QuantizedHistory``
    with the store in pinned host memory; every call stages (the bus carries the format's
    bytes), and commits copy to the host on a side stream."""

    HOST = True
