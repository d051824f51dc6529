"""Pooled keys and values: the per-block means the gated layer's compressed branch attends and
its selection scores (docs/gated.md).

Blocks tile the whole sequence ``[0, seq_len)`` (history, then chunk) in ``block_size``-token
runs; the last block may be partial and is averaged over its valid tokens. Buffers have a
static number of block slots (``ceil(Lkv / block_size)``); slots at or past
``ceil(seq_len / block_size)`` are zero and never read.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from omnimem.selection import segment_sums


@dataclasses.dataclass(frozen=True)
class PooledKV:
    """Block means of a key/value buffer.

    Attributes:
        k: ``[B, Hkv, NB, D]`` float32 mean keys (selection scores read these).
        k_attn: the mean keys in the attention dtype (the compressed branch attends these).
        v_attn: the mean values in the attention dtype.
        block_size: tokens per block.

    Keeping the attention-dtype copies beside the float32 keys (a cache updates all three)
    spares every layer call two casts of the whole pooled history.

    ``NB`` is the static number of block slots; which are valid is decided by the call's
    sequence length.

    Example:
        >>> import torch
        >>> from omnimem.pooling import pool_kv
        >>> k = v = torch.ones(1, 2, 70, 8)
        >>> pool_kv(k, v, seq_len=65, block_size=30)
        PooledKV(B=1, Hkv=2, blocks=3, D=8, block_size=30, device=cpu)
    """

    k: torch.Tensor
    k_attn: torch.Tensor
    v_attn: torch.Tensor
    block_size: int

    def __repr__(self) -> str:
        b, h, n, d = self.k.shape
        return (
            f"PooledKV(B={b}, Hkv={h}, blocks={n}, D={d}, block_size={self.block_size}, "
            f"device={self.k.device})"
        )

    @property
    def num_slots(self) -> int:
        return self.k.shape[2]

    def to(self, device: torch.device | str) -> PooledKV:
        return PooledKV(self.k.to(device), self.k_attn.to(device), self.v_attn.to(device), self.block_size)


def block_means(x: torch.Tensor, seq_len: int, block_size: int, num_slots: int | None = None) -> torch.Tensor:
    """Float32 mean of each ``block_size`` run of ``x[..., :seq_len, :]``: ``[B, H, L, D] ->
    [B, H, num_slots, D]`` (default ``ceil(seq_len / block_size)`` slots; extra slots are 0)."""
    valid = math.ceil(seq_len / block_size)
    num_slots = valid if num_slots is None else num_slots
    out = torch.zeros((*x.shape[:2], num_slots, x.shape[-1]), dtype=torch.float32, device=x.device)
    if seq_len == 0:
        return out
    sums = segment_sums(x[:, :, :seq_len], block_size)
    # Device arithmetic only (no host-to-device copy): capturable in a CUDA graph.
    counts = (seq_len - torch.arange(valid, device=x.device) * block_size).clamp(max=block_size)
    out[:, :, :valid] = sums / counts[:, None]
    return out


def pool_kv(
    k: torch.Tensor, v: torch.Tensor, *, seq_len: int, block_size: int, num_slots: int | None = None
) -> PooledKV:
    """Block means of ``k`` and ``v`` over ``[0, seq_len)`` (see ``block_means``)."""
    k_means = block_means(k, seq_len, block_size, num_slots)
    v_means = block_means(v, seq_len, block_size, num_slots)
    return PooledKV(k_means, k_means.to(k.dtype), v_means.to(v.dtype), block_size)
