"""Host offload for ``OmniMemCache(offload=True)``: the history in host memory, a block pool on the device.

Selection needs only the per-block key sums, which stay on the device; attention needs only the
blocks a chunk selects. So the full history lives in (pinned) host memory and the device holds:

- a **pool** of ``pool_blocks`` block slots per (batch, KV head), filled on demand from the host
  and kept across calls with least-recently-used replacement (denoising steps of one chunk
  select the same blocks: after the first step they are all hits);
- a **tail**: the history's partial last block followed by the current chunk.

Each call remaps the selection table from history blocks to pool slots, keeping its order, and
runs ``sparse_attention`` over ``[pool | tail]`` with that table: the same blocks in the same
order as the resident cache, so the triton and gather backends give bit-identical results.

This first version decides fetches on the host: it reads the (small) selection table back,
one device-to-host sync per call, and copies missing blocks one by one. GPU-side fetching
(a gather kernel over mapped host memory, overlapped with compute) is the next step.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from omnimem.api import sparse_attention
from omnimem.selection import block_key_sums


def check_host_memory(nbytes: int) -> None:
    """Refuse up front a host history larger than the host's available memory."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX host: cannot tell
        return
    if nbytes > available:
        raise ValueError(
            f"an offloaded history of this capacity needs {nbytes / 2**30:.1f} GiB of host memory, "
            f"but only {available / 2**30:.1f} GiB are available: lower the capacity"
        )


@dataclasses.dataclass
class OffloadStats:
    """Pool traffic since creation (or ``reset``): ``hit_rate = hits / requested``."""

    requested: int = 0
    hits: int = 0
    fetched_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requested if self.requested else 1.0


class HostOffload:
    """Device-side pool and tail of an offloaded ``OmniMemCache`` (see the module docstring)."""

    def __init__(self, cache, pool_blocks: int) -> None:
        batch, heads, _, head_dim = cache.k.shape
        bs = cache.config.block_size
        self.block_size, self.pool_blocks = bs, pool_blocks
        self.tail_start = pool_blocks * bs
        # The tail holds a partial block, the chunk, and the block-aligned slice a commit sums.
        length = self.tail_start + 2 * bs + cache.max_chunk_tokens
        factory = dict(dtype=cache.k.dtype, device=cache.device)
        # The cache's storage layout: block sums then reduce over identically strided slices,
        # which keeps them bit-identical to the resident cache's.
        if cache.layout == "bhld":
            self.k = torch.zeros(batch, heads, length, head_dim, **factory)
        else:
            self.k = torch.zeros(batch, length, heads, head_dim, **factory).transpose(1, 2)
        self.v = torch.zeros_like(self.k)
        self.slot_block = torch.full((batch, heads, pool_blocks), -1, dtype=torch.long)
        self.slot_last_use = torch.zeros((batch, heads, pool_blocks), dtype=torch.long)
        self.calls = 0
        self.stats = OffloadStats()

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()
        self.slot_block.fill_(-1)
        self.slot_last_use.zero_()
        self.stats = OffloadStats()

    def write_tail(self, cache, offset: int, k: torch.Tensor, v: torch.Tensor) -> None:
        start = self.tail_start + offset
        self.k[:, :, start : start + k.shape[2]] = k
        self.v[:, :, start : start + v.shape[2]] = v

    def load_tail(self, cache) -> None:
        """Copy the history's partial last block from the host (after a restore)."""
        start = cache.history_len // self.block_size * self.block_size
        if start < cache.history_len:
            self.write_tail(
                cache,
                0,
                cache.k[:, :, start : cache.history_len].to(cache.device),
                cache.v[:, :, start : cache.history_len].to(cache.device),
            )

    def _make_resident(self, cache, table: torch.Tensor, partial_block: int) -> torch.Tensor:
        """Fetch the table's missing full blocks into pool slots; return the slot table."""
        bs = self.block_size
        self.calls += 1
        slots = torch.full_like(table, -1)
        for b in range(table.shape[0]):
            for h in range(table.shape[1]):
                rows = table[b, h]
                needed = [int(x) for x in rows.unique() if x >= 0 and x != partial_block]
                if len(needed) > self.pool_blocks:
                    raise ValueError(
                        f"the offload pool holds {self.pool_blocks} blocks per head but a call needs "
                        f"{len(needed)}: create the cache with a larger pool_blocks"
                    )
                resident = self.slot_block[b, h]
                slot_of = {int(blk): s for s, blk in enumerate(resident.tolist()) if blk >= 0}
                missing = [blk for blk in needed if blk not in slot_of]
                needed_set = set(needed)
                # Least recently used slots that this call does not need (empty slots first).
                free = sorted(
                    (s for s in range(self.pool_blocks) if int(resident[s]) not in needed_set),
                    key=lambda s: (int(resident[s]) >= 0, int(self.slot_last_use[b, h, s])),
                )
                for blk, s in zip(missing, free, strict=False):
                    old = int(resident[s])
                    if old >= 0:
                        del slot_of[old]
                    resident[s] = blk
                    slot_of[blk] = s
                    src, dst = slice(blk * bs, (blk + 1) * bs), slice(s * bs, (s + 1) * bs)
                    self.k[b, h, dst] = cache.k[b, h, src].to(cache.device, non_blocking=True)
                    self.v[b, h, dst] = cache.v[b, h, src].to(cache.device, non_blocking=True)
                for blk in needed:
                    self.slot_last_use[b, h, slot_of[blk]] = self.calls
                self.stats.requested += len(needed)
                self.stats.hits += len(needed) - len(missing)
                self.stats.fetched_bytes += 2 * len(missing) * bs * self.k.shape[-1] * self.k.element_size()
                slot_of[partial_block] = self.pool_blocks  # the tail: right before the chunk
                slots[b, h] = torch.tensor(
                    [[slot_of[x] if x >= 0 else -1 for x in row] for row in rows.tolist()]
                )
        return slots

    def attend(self, cache, q: torch.Tensor, chunk_len: int, return_lse: bool):
        bs, history_len = self.block_size, cache.history_len
        partial = history_len % bs
        selection = cache.selection(q)
        table = selection.kv_block_idx.cpu()  # the one device-to-host sync of a call
        slots = self._make_resident(cache, table.clone(), history_len // bs if partial else -1)
        work_history = self.tail_start + partial
        num_slots = math.ceil(self.k.shape[2] / bs)
        remapped = dataclasses.replace(
            selection,
            kv_block_idx=slots.to(device=cache.device, dtype=selection.kv_block_idx.dtype),
            fixed_block_mask=torch.zeros(num_slots, dtype=torch.bool, device=cache.device),
            history_len=torch.full((), work_history, dtype=torch.int64, device=cache.device),
            num_history_blocks=num_slots,
        )
        return sparse_attention(
            q,
            self.k,
            self.v,
            history_len=work_history,
            chunk_len=chunk_len,
            config=cache.config,
            return_lse=return_lse,
            selection=remapped,
        )

    def commit(self, cache, k_chunk: torch.Tensor, v_chunk: torch.Tensor) -> None:
        bs, start = self.block_size, cache.history_len
        end = start + k_chunk.shape[2]
        self.write_tail(cache, start % bs, k_chunk, v_chunk)
        first, last = start // bs, math.ceil(end / bs)
        # The same aligned-slice reduction as the resident cache: the same bits.
        keys = self.k[:, :, self.tail_start : self.tail_start + (last - first) * bs]
        local_history = torch.full((), end - first * bs, dtype=torch.int64, device=keys.device)
        cache.key_block_sums[:, :, first:last] = block_key_sums(keys, local_history, bs)
        # Device-to-host straight into the (pinned) history: stream-ordered before any later
        # fetch; host-side readers (state_dict) synchronize first.
        cache.k[:, :, start:end].copy_(k_chunk, non_blocking=True)
        cache.v[:, :, start:end].copy_(v_chunk, non_blocking=True)
        # The new partial block moves to the front of the tail.
        new_first, new_partial = end // bs, end % bs
        if new_partial:
            src = self.tail_start + (new_first - first) * bs
            for buffer in (self.k, self.v):
                buffer[:, :, self.tail_start : self.tail_start + new_partial] = buffer[
                    :, :, src : src + new_partial
                ].clone()
