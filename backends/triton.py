"""Triton backend: per-head scattered KV access straight from the cache (no gathered copy).

On Hopper GPUs the call runs the warp-specialized Gluon kernel (``gluon_attention``) where it
applies (fp16/bf16, head_dim 64/128, one query group, TMA-compatible strides); everywhere else,
and for the other cases, the Triton-language kernel (``triton_attention``).

Planning turns the selection into one block table per (batch, KV head, 128-query tile): the
selection row itself when the chunk is one query group, else the sorted union of the tile's
groups (rows are then masked per group inside the kernel). Runs on CUDA; on CPU only under
``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

from omnimem.config import OmniMemConfig
from omnimem.selection import Selection, sorted_unique


def tile_tables(selection: Selection, *, q_len: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tile_block_idx [B, Hkv, M, W], tile_num_blocks [B, Hkv, M])`` for ``M`` query tiles
    (``M = 1`` when the chunk is one query group: all tiles share the selection row)."""
    table = selection.kv_block_idx
    num_tiles = math.ceil(q_len / block_m)
    num_groups, group_size = table.shape[2], selection.query_group_size
    if num_groups == 1:  # every tile reads the one row: no per-tile copy
        return table, selection.kv_num_blocks
    # Groups a tile touches: at most ceil(block_m / group_size) + 1 consecutive ones.
    span = math.ceil(block_m / group_size) + 1
    first = torch.arange(num_tiles, device=table.device) * block_m // group_size
    last = ((torch.arange(num_tiles, device=table.device) + 1) * block_m - 1).clamp(
        max=q_len - 1
    ) // group_size
    group = first[:, None] + torch.arange(span, device=table.device)  # [M, span]
    in_tile = group <= last[:, None]
    rows = table[:, :, group.clamp(max=num_groups - 1)]  # [B, Hkv, M, span, K]
    none = selection.num_history_blocks
    rows = torch.where(in_tile[..., None] & (rows >= 0), rows, none).flatten(-2)
    rows = sorted_unique(rows, none=none)
    is_block = rows < none
    return torch.where(is_block, rows, 0).int().contiguous(), is_block.sum(-1, dtype=torch.int32)


@functools.cache
def hopper_kernel() -> ModuleType | None:
    """The warp-specialized Gluon kernel, or ``None`` where this triton has no Gluon for Hopper
    (or a Gluon whose API moved: Gluon is experimental)."""
    try:
        from omnimem.backends import gluon_attention
    except (ImportError, AttributeError):
        return None
    return gluon_attention


@functools.cache
def _say_kernel(
    capability: tuple[int, int],
    dtype: torch.dtype,
    head_dim: int,
    block_size: int,
    grouped: bool,
    reason: str | None,
) -> None:
    """Once per shape class: which kernel runs, and why the faster one did not."""
    shape = f"sm_{capability[0]}{capability[1]}, {dtype}, head_dim {head_dim}, block_size {block_size}, " + (
        "query groups" if grouped else "one query group"
    )
    if reason is None:
        logging.getLogger("omnimem").info("triton backend (%s): the Hopper Gluon kernel", shape)
    else:
        logging.getLogger("omnimem").info(
            "triton backend (%s): the Triton-language kernel; the faster Hopper Gluon kernel is skipped: %s",
            shape,
            reason,
        )


class _ScatteredAttention(torch.autograd.Function):
    """The kernels' forward with its log-sum-exp saved, and ``scattered_backward``'s kernels
    for the gradients of q, k and v (the selection is a constant)."""

    @staticmethod
    def forward(ctx, q, k, v, selection, chunk_len, scale):
        out, lse = _attend(q, k, v, selection, chunk_len=chunk_len, scale=scale, return_lse=True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.selection, ctx.chunk_len, ctx.scale = selection, chunk_len, scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        from omnimem.backends.scattered_backward import scattered_attention_backward

        q, k, v, out, lse = ctx.saved_tensors
        selection = ctx.selection
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = scattered_attention_backward(
            q,
            k,
            v,
            out,
            lse,
            grad_out,
            block_idx=selection.kv_block_idx,
            num_blocks=selection.kv_num_blocks,
            limit=selection.history_len,
            block_size=selection.block_size,
            query_group_size=selection.query_group_size,
            chunk_len=ctx.chunk_len,
            scale=ctx.scale,
            grad_lse=grad_lse,
        )
        return dq, dk, dv, None, None, None


def check_inputs(q: torch.Tensor) -> None:
    """What the triton backend's kernels (and the quantized-history kernel) cannot run: a clear
    ``ValueError`` instead of a kernel crash or a wrong answer."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if q.device.type != "cuda" and not interpreted:
        raise ValueError(
            f"the triton backend needs CUDA tensors (got {q.device}); use backend='flex' or 'dense' "
            "(CPU runs it only under TRITON_INTERPRET=1, for tests)"
        )
    if interpreted and q.device.type != "cuda" and q.dtype == torch.bfloat16:
        raise ValueError(
            "the triton backend under TRITON_INTERPRET=1 cannot run bfloat16 (the interpreter's bf16 "
            "tl.dot is wrong): use float16 or float32 there, or backend='gather' or 'dense'"
        )
    if q.device.type == "cuda" and q.shape[-1] < 16:
        raise ValueError(f"q's head_dim must be >= 16 for the triton backend, got {q.shape[-1]}")


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: Selection,
    *,
    chunk_len: int,
    scale: float,
    return_lse: bool,
    config: OmniMemConfig,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    check_inputs(q)
    if selection.num_history_blocks == 1 and selection.block_size > k.shape[2]:
        # One block longer than the buffer: the same tokens as a block of the buffer's length,
        # without block arithmetic that overflows int32 in the kernel.
        selection = dataclasses.replace(selection, block_size=k.shape[2])
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        if q.dtype == torch.float64:
            raise ValueError(
                "the triton backend computes in float32 at most: for float64 gradients (gradcheck) "
                "use backend='gather' or 'dense'"
            )
        out, lse = _ScatteredAttention.apply(q, k, v, selection, chunk_len, scale)
        return out, (lse if return_lse else None)
    return _attend(q, k, v, selection, chunk_len=chunk_len, scale=scale, return_lse=return_lse)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: Selection,
    *,
    chunk_len: int,
    scale: float,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    from omnimem.backends.triton_attention import default_num_sms

    grouped = selection.kv_block_idx.shape[2] > 1
    hopper = hopper_kernel()
    reason = (
        "this triton has no Gluon for Hopper"
        if hopper is None
        else hopper.skip_reason(q, k, v, block_size=selection.block_size, grouped=grouped)
    )
    if q.device.type == "cuda":
        _say_kernel(
            torch.cuda.get_device_capability(q.device),
            q.dtype,
            q.shape[-1],
            selection.block_size,
            grouped,
            reason,
        )
    if reason is None:
        return hopper.scattered_attention(
            q,
            k,
            v,
            block_idx=selection.kv_block_idx,
            num_blocks=selection.kv_num_blocks,
            history_len=selection.history_len,
            chunk_len=chunk_len,
            block_size=selection.block_size,
            scale=scale,
            return_lse=return_lse,
            num_sms=default_num_sms(q.device),
        )
    return _triton_language(q, k, v, selection, chunk_len=chunk_len, scale=scale, return_lse=return_lse)


def rotating_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: Selection,
    *,
    chunk_len: int,
    scale: float,
    return_lse: bool,
    rotation,
    store=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The forward with keys rotated in time inside the Triton-language kernel
    (``triton_attention.KeyRotation``: relative positions, ``q`` already rotated): no rotated
    copy of the attended blocks. The Gluon kernel has no rotation: skipped, said once. With
    ``store`` (a quantized history) ``k``/``v`` hold the tokens from its partial last block on.
    No gradients (training takes the rotated-copy path)."""
    check_inputs(q)
    grouped = selection.kv_block_idx.shape[2] > 1
    if q.device.type == "cuda":
        _say_kernel(
            torch.cuda.get_device_capability(q.device), q.dtype, q.shape[-1], selection.block_size, grouped,
            "relative positions rotate the keys inside the Triton-language kernel",
        )  # fmt: skip
    return _triton_language(
        q,
        k,
        v,
        selection,
        chunk_len=chunk_len,
        scale=scale,
        return_lse=return_lse,
        store=store,
        rotation=rotation,
    )


def _triton_language(q, k, v, selection: Selection, *, chunk_len: int, scale: float, return_lse: bool,
                     store=None, rotation=None) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """The Triton-language kernel over ``selection``'s per-tile tables."""
    from omnimem.backends.triton_attention import scattered_attention

    grouped = selection.kv_block_idx.shape[2] > 1
    block_m = 128 if q.device.type == "cuda" else 16
    tile_block_idx, tile_num_blocks = tile_tables(selection, q_len=q.shape[2], block_m=block_m)
    return scattered_attention(
        q, k, v, block_idx=tile_block_idx, num_blocks=tile_num_blocks,
        block_attended=selection.attended_block_mask() if grouped else None,
        history_len=selection.history_len, chunk_len=chunk_len, block_size=selection.block_size,
        query_group_size=selection.query_group_size, scale=scale, return_lse=return_lse, block_m=block_m,
        store=store, rotation=rotation,
    )  # fmt: skip
