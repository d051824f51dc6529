"""Input validation shared by the public entry points: clear errors instead of kernel crashes."""

from __future__ import annotations

from typing import Literal

import torch

Layout = Literal["bhld", "blhd"]
LAYOUTS: tuple[str, ...] = ("bhld", "blhd")
LAYOUT_HINT = (
    "omnimem takes [B, H, L, D] tensors; pass [B, L, H, D] (flash-attn/Wan layout) ones with "
    "layout='blhd' or as x.transpose(1, 2)"
)


def layout_of(layout: object) -> str:
    """``layout`` checked: ``"bhld"`` (``[B, H, L, D]``) or ``"blhd"`` (``[B, L, H, D]``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'bhld' ([B, H, L, D]) or 'blhd' ([B, L, H, D]), got {layout!r}")
    return layout


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D [B, H, L, D], got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must have a floating dtype in {SUPPORTED_DTYPES}, got {x.dtype}")
    return x


def _check_length(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__}")
    return value


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    *,
    history_len: int | None,
    chunk_len: int | None,
) -> tuple[int, int]:
    """Validate one attention call and resolve ``(history_len, chunk_len)``.

    Raises:
        TypeError: a non-tensor input, an unsupported or mismatched dtype, a non-int length.
        ValueError: wrong rank, mismatched batch/head/length/head-dim, ``Hq % Hkv != 0``,
            inputs on different devices, empty queries, or lengths outside the key buffer.
    """
    _check_tensor("q", q)
    _check_tensor("k", k)
    tensors = {"q": q, "k": k}
    if v is not None:
        tensors["v"] = _check_tensor("v", v)
        if v.shape != k.shape:
            raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    for name, x in tensors.items():
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")
    batch, q_heads, q_len, head_dim = q.shape
    k_batch, kv_heads, kv_len, k_dim = k.shape
    if k_batch != batch:
        raise ValueError(f"k must have q's batch size {batch}, got {k_batch} (shape {tuple(k.shape)})")
    if k_dim != head_dim:
        raise ValueError(
            f"k must have q's head_dim {head_dim}, got {k_dim} (shape {tuple(k.shape)}); {LAYOUT_HINT}"
        )
    if kv_heads == 0:
        raise ValueError(f"k must have at least one head, got shape {tuple(k.shape)}; {LAYOUT_HINT}")
    if q_heads % kv_heads:
        raise ValueError(
            f"q heads ({q_heads}) must be a multiple of k heads ({kv_heads}) for MHA/GQA; {LAYOUT_HINT}"
        )
    if q_len == 0 or head_dim == 0:
        raise ValueError(f"q must hold at least one query and one feature, got shape {tuple(q.shape)}")

    if chunk_len is None:
        chunk_len = q_len
    chunk_len = _check_length("chunk_len", chunk_len)
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be >= 1 (every query attends its chunk), got {chunk_len}")
    if history_len is None:
        history_len = kv_len - chunk_len
        if history_len < 0:
            raise ValueError(
                f"k holds {kv_len} tokens, fewer than chunk_len={chunk_len}; pass history_len explicitly"
            )
    history_len = _check_length("history_len", history_len)
    if history_len < 0 or history_len + chunk_len > kv_len:
        raise ValueError(
            f"history_len must lie in [0, {kv_len - chunk_len}] so that history + chunk "
            f"(chunk_len={chunk_len}) fits k's {kv_len} tokens, got {history_len}"
        )
    return history_len, chunk_len


def check_key_block_sums(key_block_sums: object, k: torch.Tensor, block_size: int) -> None:
    """``key_block_sums`` must be float32 ``[B, Hkv, ceil(Lkv / block_size), D]`` on k's device,
    or an ``omnimem.store.index.Int8BlockSums`` of that shape."""
    from omnimem.store.index import Int8BlockSums

    if key_block_sums is None:
        return
    if not isinstance(key_block_sums, torch.Tensor | Int8BlockSums):
        raise TypeError(
            f"key_block_sums must be a torch.Tensor or an Int8BlockSums, got {type(key_block_sums).__name__}"
        )
    batch, heads, length, head_dim = k.shape
    expected = (batch, heads, -(-length // block_size), head_dim)
    if tuple(key_block_sums.shape) != expected:
        raise ValueError(
            f"key_block_sums must have shape {expected} ([B, Hkv, ceil(Lkv / block_size), D]), "
            f"got {tuple(key_block_sums.shape)}"
        )
    if isinstance(key_block_sums, torch.Tensor) and key_block_sums.dtype != torch.float32:
        raise TypeError(f"key_block_sums must be float32, got {key_block_sums.dtype}")
    if key_block_sums.device != k.device:
        raise ValueError(f"key_block_sums must be on k's device {k.device}, got {key_block_sums.device}")


def check_selection(
    selection: object, q: torch.Tensor, k: torch.Tensor, block_size: int, history_len: int | None = None
) -> None:
    """A precomputed selection must index ``k``'s blocks for ``q``'s batch and ``k``'s heads,
    and have been planned for this call's ``history_len`` (when it knows its own)."""
    from omnimem.selection import Selection

    if not isinstance(selection, Selection):
        raise TypeError(f"selection must be an omnimem.Selection, got {type(selection).__name__}")
    slots = -(-k.shape[2] // block_size)
    table = selection.kv_block_idx
    if (
        selection.block_size != block_size
        or selection.num_history_blocks != slots
        or tuple(table.shape[:2]) != (q.shape[0], k.shape[1])
        or table.device != q.device
    ):
        raise ValueError(
            f"selection must index k's {slots} blocks of {block_size} tokens for batch {q.shape[0]} and "
            f"{k.shape[1]} KV heads on {q.device}; got block_size {selection.block_size}, "
            f"{selection.num_history_blocks} blocks, table {tuple(table.shape)} on {table.device}"
        )
    planned = selection.planned_history_len
    if history_len is not None and planned is not None and planned != history_len:
        raise ValueError(
            f"selection was planned for history_len={planned}, but this call has history_len={history_len}: "
            "plan it again with select_blocks for this history"
        )


def check_gates(gates: object, q: torch.Tensor) -> None:
    """The gated layer's ``gates``: floating ``[B, Hq, Lq, 3]`` on ``q``'s device."""
    if not isinstance(gates, torch.Tensor):
        raise TypeError(f"gates must be a torch.Tensor, got {type(gates).__name__}")
    expected = (*q.shape[:3], 3)
    if tuple(gates.shape) != expected:
        raise ValueError(
            f"gates must have shape {expected} ([B, Hq, Lq, 3]: compressed, selected, window), "
            f"got {tuple(gates.shape)}"
        )
    if not gates.is_floating_point():
        raise TypeError(f"gates must be a floating tensor, got {gates.dtype}")
    if gates.device != q.device:
        raise ValueError(f"gates must be on q's device {q.device}, got {gates.device}")
