"""Random attention inputs shaped like a chunk over a (possibly preallocated) KV buffer."""

from __future__ import annotations

import os

import torch

# Property tests run on CPU in CI; OMNIMEM_TEST_DEVICE=cuda runs the same tests on a GPU.
TEST_DEVICE = torch.device(os.environ.get("OMNIMEM_TEST_DEVICE", "cpu"))
POISON = 1.0e3  # finite junk in unwritten buffer space: must never reach an output
# Whether the tests run on a Hopper GPU, where the Gluon kernel (backends/gluon_attention.py) runs.
ON_HOPPER = TEST_DEVICE.type == "cuda" and torch.cuda.get_device_capability(TEST_DEVICE)[0] == 9


def make_inputs(
    *,
    batch: int = 1,
    q_heads: int = 2,
    kv_heads: int | None = None,
    q_len: int = 8,
    history_len: int = 32,
    chunk_len: int | None = None,
    head_dim: int = 16,
    unwritten: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = TEST_DEVICE,
    flash_layout: bool = False,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q [B, Hq, Lq, D]`` and ``k, v [B, Hkv, history + chunk + unwritten, D]``.

    With ``flash_layout`` the tensors are ``[B, L, H, D]`` storage viewed as ``[B, H, L, D]``.
    """
    kv_heads = q_heads if kv_heads is None else kv_heads
    chunk_len = q_len if chunk_len is None else chunk_len
    kv_len = history_len + chunk_len + unwritten
    gen = torch.Generator().manual_seed(seed)

    def rand(heads: int, length: int) -> torch.Tensor:
        x = torch.randn(batch, length, heads, head_dim, generator=gen)
        x = x if flash_layout else x.transpose(1, 2).contiguous()
        x = x.to(device=device, dtype=dtype)
        return x.transpose(1, 2) if flash_layout else x

    q, k, v = rand(q_heads, q_len), rand(kv_heads, kv_len), rand(kv_heads, kv_len)
    if unwritten:
        k[:, :, kv_len - unwritten :] = POISON
        v[:, :, kv_len - unwritten :] = POISON
    return q, k, v


def keys_scoring(block_scores: list[float], *, block_size: int, chunk_len: int, head_dim: int = 4):
    """``(q, k, v)`` whose history block ``j`` scores ``block_scores[j]`` (up to a positive factor).

    Every query is ``e0`` and every key of block ``j`` is ``block_scores[j] * e0``; the chunk's
    keys are huge so that any leak of chunk tokens into a block mean would change the ranking.
    """
    history_len = len(block_scores) * block_size
    q = torch.zeros(1, 1, chunk_len, head_dim)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, history_len + chunk_len, head_dim)
    k[0, 0, :history_len, 0] = torch.tensor(block_scores).repeat_interleave(block_size)
    k[0, 0, history_len:, 0] = 1.0e4
    v = torch.randn(1, 1, history_len + chunk_len, head_dim, generator=torch.Generator().manual_seed(0))
    return q, k, v


def exact_queries_and_keys(batch, q_heads, kv_heads, q_len, group_size, head_dim, kv_len, gen):
    """Small integers, and each query group's last row set so that the group's mean is an
    integer: every sum, mean and dot product of the scores is exact in float32, so any
    summation order gives the same scores bit for bit (ties included)."""
    q = torch.randint(-3, 4, (batch, q_heads, q_len, head_dim), generator=gen).float()
    for start in range(0, q_len, group_size):
        end = min(start + group_size, q_len)
        mean = torch.randint(-2, 3, (batch, q_heads, head_dim), generator=gen).float()
        q[:, :, end - 1] = mean * (end - start) - q[:, :, start : end - 1].sum(2)
    k = torch.randint(-2, 3, (batch, kv_heads, kv_len, head_dim), generator=gen).float()
    return q.to(TEST_DEVICE), k.to(TEST_DEVICE)
