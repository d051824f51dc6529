"""Copy whole KV blocks from three sources into the staging area of an offloaded cache.

One program stages one block slot of one (batch, KV head), keys and values: from the previous
call's staging buffer, from the last commit's blocks kept on the device, or from the history in
pinned host memory, read in place over PCIe (unified virtual addressing: no bounce buffer, no
host involvement, no sync). Which source, and which block of it, come from device tensors, so
the launch has static shapes. Reference: ``omnimem.store.staging.stage_blocks_reference``; the
source codes are ``omnimem.store.staging.SOURCE_*``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _copy_block(
    src_k,
    src_v,
    src_offset,
    src_stride_l,
    dst_k,
    dst_v,
    dst_offset,
    dst_stride_l,
    BLOCK_SIZE: tl.constexpr,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
):
    cols = tl.arange(0, D_PAD)
    for row_start in tl.static_range(0, BLOCK_SIZE, ROWS):
        rows = row_start + tl.arange(0, ROWS)
        mask = (rows[:, None] < BLOCK_SIZE) & (cols[None, :] < HEAD_DIM)
        src = src_offset + rows.to(tl.int64)[:, None] * src_stride_l + cols[None, :]
        dst = dst_offset + rows.to(tl.int64)[:, None] * dst_stride_l + cols[None, :]
        tl.store(dst_k + dst, tl.load(src_k + src, mask=mask), mask=mask)
        tl.store(dst_v + dst, tl.load(src_v + src, mask=mask), mask=mask)


@triton.jit
def _stage_blocks_kernel(
    dst_k,
    dst_v,
    prev_k,
    prev_v,
    fresh_k,
    fresh_v,
    host_k,
    host_v,
    source_ptr,
    block_ptr,
    num_heads,
    num_slots,
    stride_wb,
    stride_wh,
    stride_wl,
    stride_fb,
    stride_fh,
    stride_fl,
    stride_hb,
    stride_hh,
    stride_hl,
    BLOCK_SIZE: tl.constexpr,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
):
    slot = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    entry = batch_head.to(tl.int64) * num_slots + slot
    source = tl.load(source_ptr + entry)
    block = tl.load(block_ptr + entry).to(tl.int64)
    dst_offset = batch * stride_wb + head * stride_wh + slot.to(tl.int64) * BLOCK_SIZE * stride_wl
    if source == 1:  # SOURCE_PREVIOUS: the other work buffer (same shape and strides)
        src_offset = batch * stride_wb + head * stride_wh + block * BLOCK_SIZE * stride_wl
        _copy_block(
            prev_k, prev_v, src_offset, stride_wl, dst_k, dst_v, dst_offset, stride_wl,
            BLOCK_SIZE, ROWS, HEAD_DIM, D_PAD,
        )  # fmt: skip
    if source == 2:  # SOURCE_FRESH
        src_offset = batch * stride_fb + head * stride_fh + block * BLOCK_SIZE * stride_fl
        _copy_block(
            fresh_k, fresh_v, src_offset, stride_fl, dst_k, dst_v, dst_offset, stride_wl,
            BLOCK_SIZE, ROWS, HEAD_DIM, D_PAD,
        )  # fmt: skip
    if source == 3:  # SOURCE_HOST: pinned host memory, read over the bus
        src_offset = batch * stride_hb + head * stride_hh + block * BLOCK_SIZE * stride_hl
        _copy_block(
            host_k, host_v, src_offset, stride_hl, dst_k, dst_v, dst_offset, stride_wl,
            BLOCK_SIZE, ROWS, HEAD_DIM, D_PAD,
        )  # fmt: skip


def stage_blocks(
    dst: tuple[torch.Tensor, torch.Tensor],
    previous: tuple[torch.Tensor, torch.Tensor],
    fresh: tuple[torch.Tensor, torch.Tensor],
    host: tuple[torch.Tensor, torch.Tensor],
    source: torch.Tensor,
    source_block: torch.Tensor,
    block_size: int,
) -> None:
    """``dst[b, h, slot block] = <source>[b, h, source_block block]`` for every staging slot.

    ``dst``, ``previous``, ``fresh`` and ``host`` are ``(k, v)`` pairs of ``[B, H, L, D]`` views
    with a unit stride along ``D``; ``dst`` and ``previous`` share shape and strides; ``host``
    may live in pinned host memory; ``k`` and ``v`` of a pair share strides. ``source`` (int32,
    ``omnimem.store.staging.SOURCE_*``) and ``source_block``
    (int64) are ``[B, H, W]`` device tensors; slot ``w`` covers tokens ``[w*bs, (w+1)*bs)``.
    """
    batch, heads, num_slots = source.shape
    head_dim = dst[0].shape[-1]
    for x in (*dst, *previous, *fresh, *host):
        if x.stride(-1) != 1:
            raise ValueError("stage_blocks needs a unit stride along the head dimension")
    d_pad = triton.next_power_of_2(head_dim)
    rows = max(1, min(triton.next_power_of_2(block_size), 4096 // d_pad))
    _stage_blocks_kernel[(num_slots, batch * heads)](
        *dst,
        *previous,
        *fresh,
        *host,
        source.contiguous(),
        source_block.contiguous(),
        heads,
        num_slots,
        *dst[0].stride()[:3],
        *fresh[0].stride()[:3],
        *host[0].stride()[:3],
        BLOCK_SIZE=block_size,
        ROWS=rows,
        HEAD_DIM=head_dim,
        D_PAD=d_pad,
        num_warps=4,
    )
