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
        k_attn_rounded: ``k_attn`` is ``k`` rounded to nearest in its dtype (``pool_kv`` and
            the caches guarantee it).
        k_bounds: ``[B, Hkv, NB, 2]`` float32 per block: ``|k|**2`` and ``|k_attn - k|**2``
            (``key_bounds``; ``pool_kv`` and the caches fill it for bfloat16). With it, a bfloat16
            ``k_attn`` serves the selection kernel's approximate first pass, whose error
            bound is computed from these norms; without it (a hand-built ``PooledKV``) the
            first pass scores the float32 means in tf32.

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
    k_attn_rounded: bool = False
    k_bounds: torch.Tensor | None = None

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
        return dataclasses.replace(
            self,
            k=self.k.to(device),
            k_attn=self.k_attn.to(device),
            v_attn=self.v_attn.to(device),
            k_bounds=None if self.k_bounds is None else self.k_bounds.to(device),
        )


def key_bounds(k: torch.Tensor, k_attn: torch.Tensor) -> torch.Tensor:
    """``[..., NB, 2]`` float32: each block's ``|k|**2`` and ``|k_attn - k|**2`` (float32 mean
    keys ``k`` and their attention-dtype copy ``k_attn``, both ``[..., NB, D]``): what the
    selection kernel's error bound needs to score ``k_attn`` in place of ``k``."""
    both = torch.stack([k, k_attn.float() - k], dim=-2)  # [..., NB, 2, D]: few launches per cache write
    return torch.linalg.vecdot(both, both)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the gated layer accumulates in: float32, or float64 for float64 inputs (exact
    gradients for ``gradcheck``)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_means(
    x: torch.Tensor,
    seq_len: int,
    block_size: int,
    num_slots: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Mean (in ``dtype``, float32 by default) of each ``block_size`` run of ``x[..., :seq_len,
    :]``: ``[B, H, L, D] -> [B, H, num_slots, D]`` (default ``ceil(seq_len / block_size)``
    slots; extra slots are 0)."""
    valid = math.ceil(seq_len / block_size)
    num_slots = valid if num_slots is None else num_slots
    out = torch.zeros((*x.shape[:2], num_slots, x.shape[-1]), dtype=dtype, device=x.device)
    if seq_len == 0:
        return out
    sums = segment_sums(x[:, :, :seq_len], block_size, dtype)
    # Device arithmetic only (no host-to-device copy): capturable in a CUDA graph.
    counts = (seq_len - torch.arange(valid, device=x.device) * block_size).clamp(max=block_size)
    out[:, :, :valid] = sums / counts[:, None]
    return out


def pool_kv(
    k: torch.Tensor, v: torch.Tensor, *, seq_len: int, block_size: int, num_slots: int | None = None
) -> PooledKV:
    """Block means of ``k`` and ``v`` ``[B, Hkv, L, D]`` over ``[0, seq_len)`` (see ``block_means``).

    Raises:
        TypeError: non-tensor ``k``/``v``, non-int sizes.
        ValueError: ``v`` not of ``k``'s shape, ``block_size < 1``, ``seq_len`` outside
            ``[0, L]``, or fewer ``num_slots`` than the blocks of ``seq_len``.
    """
    for name, x in (("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise TypeError(
                f"{name} must be a 4-D [B, Hkv, L, D] tensor, got {getattr(x, 'shape', type(x).__name__)}"
            )
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    for name, value in (("seq_len", seq_len), ("block_size", block_size), ("num_slots", num_slots)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if not 0 <= seq_len <= k.shape[2]:
        raise ValueError(f"seq_len must lie in [0, {k.shape[2]}] (k's length), got {seq_len}")
    if num_slots is not None and num_slots < math.ceil(seq_len / block_size):
        raise ValueError(
            f"num_slots must be >= ceil(seq_len / block_size) = {math.ceil(seq_len / block_size)}"
        )
    acc = accumulation_dtype(k.dtype)
    k_means = block_means(k, seq_len, block_size, num_slots)  # float32: what selection scores
    k_attn = k_means if acc == torch.float32 else block_means(k, seq_len, block_size, num_slots, acc)
    v_means = block_means(v, seq_len, block_size, num_slots, acc)
    k_attn = k_attn.to(k.dtype)
    rounded = acc == torch.float32
    return PooledKV(
        k_means,
        k_attn,
        v_means.to(v.dtype),
        block_size,
        k_attn_rounded=rounded,
        k_bounds=key_bounds(k_means.detach(), k_attn.detach()) if k_attn.dtype == torch.bfloat16 else None,
    )
