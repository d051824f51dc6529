"""Staging: copying whole blocks of a history into a small device buffer, the one mechanism
beneath both caches' offloaded and quantized tiers (``omnimem.sparse.offload``,
``omnimem.gated.offload``). A slot's block comes from one of three sources, named by the
``SOURCE_*`` codes: the previous call's staging, the blocks of the last commit, or the history
itself (host memory, read in place over PCIe). The kernel is ``omnimem.kernels.stage_blocks``;
``stage_blocks_reference`` is its plain-torch twin."""

from __future__ import annotations

import dataclasses

import torch

# Where a staging slot's block comes from (the ``source`` codes of the stage kernel).
SOURCE_NONE, SOURCE_PREVIOUS, SOURCE_FRESH, SOURCE_HOST = 0, 1, 2, 3


def stage_blocks_reference(
    dst: tuple[torch.Tensor, torch.Tensor],
    previous: tuple[torch.Tensor, torch.Tensor],
    fresh: tuple[torch.Tensor, torch.Tensor],
    host: tuple[torch.Tensor, torch.Tensor],
    source: torch.Tensor,
    source_block: torch.Tensor,
    block_size: int,
) -> None:
    """Plain-torch ``omnimem.kernels.stage_blocks.stage_blocks`` (CPU caches use it)."""
    num_slots, head_dim = source.shape[-1], dst[0].shape[-1]
    offsets = torch.arange(block_size, device=source.device)
    slot_source = source.repeat_interleave(block_size, dim=-1)[..., None]  # [B, H, W*bs, 1]
    for which in (0, 1):  # keys, values
        staged = dst[which][:, :, : num_slots * block_size]
        for code, pair in ((SOURCE_PREVIOUS, previous), (SOURCE_FRESH, fresh), (SOURCE_HOST, host)):
            block = torch.where(source == code, source_block, 0)
            # Slots of other sources read block 0, which a short buffer may not fill: clamp.
            tokens = (block[..., None] * block_size + offsets).flatten(-2).clamp(max=pair[which].shape[2] - 1)
            gathered = pair[which].gather(2, tokens[..., None].expand(-1, -1, -1, head_dim))
            staged.copy_(torch.where(slot_source == code, gathered, staged))


def stage(dst, previous, fresh, host, source, source_block, block_size) -> None:
    """``stage_blocks`` on GPUs (host sources read in place), its plain-torch twin on CPU."""
    if dst[0].device.type == "cuda":
        from omnimem.kernels.stage_blocks import stage_blocks

        stage_blocks(dst, previous, fresh, host, source, source_block, block_size)
    else:
        stage_blocks_reference(dst, previous, fresh, host, source, source_block, block_size)


@dataclasses.dataclass
class OffloadStats:
    """Staging traffic of an offloaded cache since creation (or ``reset``).

    ``requested``: blocks staged by all calls (per batch and KV head); ``hits``: those copied
    on the device (from the previous call or the last commit); ``fetched_bytes``: keys and
    values read from host memory for the others. ``hit_rate = hits / requested``.
    """

    requested: int = 0
    hits: int = 0
    fetched_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requested if self.requested else 1.0
