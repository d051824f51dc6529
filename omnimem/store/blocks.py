"""``QuantizedBlocks``: a history's keys and values, whole blocks, in a quantized format on one
device or in (pinned) host memory (``omnimem.store.formats``). Blocks are written once, from
native keys and values; kernels read them in place (``backends/quantized_attention.py``);
``rows`` reads them back dequantized by block index (the reference path, docs/memory.md)."""

from __future__ import annotations

import math

import torch

from omnimem.store.disk import disk_zeros
from omnimem.store.formats import QuantizedKV, dequantize, quantize
from omnimem.store.host import host_zeros


class QuantizedBlocks:
    """Keys and values of ``capacity`` tokens in ``block_size``-token blocks, ``kv_format``.

    Storage (``[B, H, slots * block_size, ...]`` rows, slot-major scales), all on ``device``
    (``host=True``: in host memory, page-locked when ``device`` is a GPU):
    fp8: float8 e4m3 rows and one float32 scale per (batch, head, block) for keys and values;
    int4: packed rows, bfloat16 scale and minimum per (block, channel) for keys, per token for
    values. ``nbytes`` is what ``kv_cache_bytes(..., kv_format=...)`` counts for the history.
    ``disk``: a directory; the store lives in preallocated, unlinked files there instead
    (``omnimem.store.disk``).
    """

    def __init__(
        self,
        kv_format: str,
        *,
        batch: int,
        num_kv_heads: int,
        capacity: int,
        head_dim: int,
        block_size: int,
        device: torch.device | str,
        host: bool = False,
        disk: str | None = None,
    ) -> None:
        if kv_format not in ("fp8", "int4"):
            raise ValueError(f"QuantizedBlocks kv_format must be 'fp8' or 'int4', got {kv_format!r}")
        self.kv_format, self.block_size, self.head_dim = kv_format, block_size, head_dim
        self.disk = disk
        self.slots = math.ceil(capacity / block_size)
        rows = (batch, num_kv_heads, self.slots * block_size)

        device = torch.empty(0, device=device).device
        pin = device.type == "cuda"

        def zeros(shape: tuple[int, ...], dtype: torch.dtype, fill: float = 0.0) -> torch.Tensor:
            # host: the offloaded tier, page-locked so that copies to the device run asynchronously;
            # disk: a file mapping (omnimem.store.disk), staged through page-locked bounce rows
            if disk is not None:
                x = disk_zeros(shape, dtype, disk)
            elif host:
                x = host_zeros(shape, dtype, pin=pin)
            else:
                x = torch.zeros(shape, dtype=dtype, device=device)
            return x.fill_(fill) if fill else x

        if kv_format == "fp8":
            data = (*rows, head_dim)
            self.k, self.v = zeros(data, torch.float8_e4m3fn), zeros(data, torch.float8_e4m3fn)
            per_block = (batch, num_kv_heads, self.slots)
            self.k_scale = zeros(per_block, torch.float32, 1.0)
            self.v_scale = zeros(per_block, torch.float32, 1.0)
            self.k_min = self.v_min = None
        else:
            data = (*rows, math.ceil(head_dim / 2))
            self.k, self.v = zeros(data, torch.uint8), zeros(data, torch.uint8)
            per_channel = (batch, num_kv_heads, self.slots, head_dim)
            self.k_scale = zeros(per_channel, torch.bfloat16, 1.0)
            self.k_min = zeros(per_channel, torch.bfloat16)
            self.v_scale, self.v_min = zeros(rows, torch.bfloat16, 1.0), zeros(rows, torch.bfloat16)

    def __repr__(self) -> str:
        b, h = self.k.shape[:2]
        return (
            f"QuantizedBlocks({self.kv_format}, B={b}, H={h}, blocks={self.slots}, "
            f"block_size={self.block_size}, D={self.head_dim}, device={self.k.device})"
        )

    @property
    def nbytes(self) -> int:
        tensors = (self.k, self.v, self.k_scale, self.v_scale, self.k_min, self.v_min)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def pairs(self) -> list[tuple[tuple[torch.Tensor, torch.Tensor], int]]:
        """The store as ``((a, b), rows_per_block)`` pairs of ``[B, H, rows, C]`` tensors (``a`` and
        ``b`` of one shape; per-block or per-token scales get a unit last dim): block ``j`` is
        rows ``[j * rows_per_block, (j + 1) * rows_per_block)`` of each. What copying blocks
        between stores moves (``omnimem.store.staging.stage``)."""
        bs = self.block_size
        if self.kv_format == "fp8":  # bytes: kernels that copy rows need no float8 support
            data = (self.k.view(torch.uint8), self.v.view(torch.uint8))
            return [(data, bs), ((self.k_scale[..., None], self.v_scale[..., None]), 1)]
        return [
            ((self.k, self.v), bs),
            ((self.k_scale, self.k_min), 1),
            ((self.v_scale[..., None], self.v_min[..., None]), bs),
        ]

    def head(self, blocks: int) -> list[torch.Tensor]:
        """Views of the first ``blocks`` blocks of every stored tensor, in ``pairs`` order (what a
        ``state_dict`` saves: the bytes, scales included)."""
        return [x[:, :, : blocks * rows] for pair, rows in self.pairs() for x in pair]

    def copy_blocks_(self, src: QuantizedBlocks, first: int, src_first: int, count: int) -> None:
        """Blocks ``[src_first, src_first + count)`` of ``src`` into ``[first, first + count)``
        (asynchronous between pinned host and device memory on the current stream)."""
        for (dst_pair, rows), (src_pair, _) in zip(self.pairs(), src.pairs(), strict=True):
            for dst, source in zip(dst_pair, src_pair, strict=True):
                dst[:, :, first * rows : (first + count) * rows].copy_(
                    source[:, :, src_first * rows : (src_first + count) * rows], non_blocking=True
                )

    def write(self, first_block: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize ``k``, ``v`` ``[B, H, n * block_size, D]`` (whole blocks) into blocks
        ``first_block ..``."""
        bs = self.block_size
        blocks = k.shape[2] // bs
        lo, hi = first_block * bs, (first_block + blocks) * bs
        for role, x, data, scale, minimum in (
            ("key", k, self.k, self.k_scale, self.k_min),
            ("value", v, self.v, self.v_scale, self.v_min),
        ):
            q = quantize(x, self.kv_format, role=role, block_size=bs)
            data[:, :, lo:hi] = q.data
            if self.kv_format == "fp8" or role == "key":  # per block
                scale[:, :, first_block : first_block + blocks] = q.scale
                if minimum is not None:
                    minimum[:, :, first_block : first_block + blocks] = q.minimum
            else:  # int4 values: per token
                scale[:, :, lo:hi] = q.scale
                minimum[:, :, lo:hi] = q.minimum

    def rows(self, blocks: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``blocks [B, H, W]`` (block indices; any value for an unused slot
        in ``[0, slots)``), dequantized: ``[B, H, W * block_size, D]`` each, in ``dtype``."""
        bs = self.block_size
        tokens = (blocks[..., None] * bs + torch.arange(bs, device=blocks.device)).flatten(2)  # [B, H, W*bs]
        out = []
        for role, data, scale, minimum in (
            ("key", self.k, self.k_scale, self.k_min),
            ("value", self.v, self.v_scale, self.v_min),
        ):
            # gather on the bytes (torch gathers no float8 on every device), then reinterpret
            raw = data.view(torch.uint8).gather(2, tokens[..., None].expand(-1, -1, -1, data.shape[-1]))
            rows = raw.view(data.dtype)
            if self.kv_format == "fp8" or role == "key":
                index = blocks if scale.dim() == 3 else blocks[..., None].expand(-1, -1, -1, scale.shape[-1])
                picked = scale.gather(2, index)
                low = None if minimum is None else minimum.gather(2, index)
            else:
                picked, low = scale.gather(2, tokens), minimum.gather(2, tokens)
            q = QuantizedKV(self.kv_format, role, bs, self.head_dim, rows, picked, low)
            out.append(dequantize(q, dtype))
        return out[0], out[1]
