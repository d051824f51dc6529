"""Quantized formats of the KV history: what a history block costs in bytes, and its
quantize / dequantize pair (the reference every kernel that reads the bytes must equal).

Formats (``KV_FORMATS``; docs/memory.md says how they were chosen):

- ``"native"``: the cache's dtype, as written (bf16 for Wan-family models): no scales.
- ``"fp8"``: float8 e4m3 elements with one float32 scale per (batch, head, block), for keys and
  values alike: ``x ~ data * scale``, ``scale = amax(|x| over the block) / 448``. The scale's
  share is 4 bytes per block (1/4,096 of a 128-token block of 128 channels).
- ``"int4"``: 4-bit codes, two per byte (even channel in the low nibble), asymmetric (a scale
  and a minimum in bfloat16: the range of float32, so no key overflows them, and their 8
  significant bits move a code by at most 15 * 2**-9 of a step): keys per channel over each
  block's tokens, values per token over its channels (KIVI's split: key outliers live in
  channels, value errors average out per token). ``x ~ code * scale + minimum``,
  ``code = round((x - minimum) / scale)`` in [0, 15].

A block's bytes are quantized once, from the whole block, when it becomes history; selection
reads block sums or means taken from the keys *before* quantization, so it is unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from einops import rearrange

KVFormat = Literal["native", "fp8", "int4"]
KV_FORMATS: tuple[str, ...] = ("native", "fp8", "int4")
FP8_MAX = 448.0  # the largest finite float8 e4m3fn
INT4_LEVELS = 15  # codes 0..15
Role = Literal["key", "value"]


def check_kv_format(kv_format: object, *, owner: str = "kv_format") -> str:
    if kv_format not in KV_FORMATS:
        raise ValueError(f"{owner} must be one of {KV_FORMATS}, got {kv_format!r}")
    return kv_format


@dataclasses.dataclass(frozen=True)
class QuantizedKV:
    """Keys or values ``[B, H, L, D]`` in a quantized format.

    Attributes:
        kv_format: ``"fp8"`` or ``"int4"``.
        role: ``"key"`` or ``"value"`` (int4 scales keys per channel, values per token).
        block_size: tokens per block (scales per block; the last block may be partial).
        head_dim: ``D`` (int4 packs two channels a byte; an odd ``D`` pads one).
        data: fp8: ``[B, H, L, D]`` float8_e4m3fn; int4: ``[B, H, L, ceil(D / 2)]`` uint8.
        scale: fp8: ``[B, H, NB]`` float32; int4 keys ``[B, H, NB, D]``, values ``[B, H, L]``
            bfloat16.
        minimum: int4 only, ``scale``'s shape and dtype; fp8: ``None``.
    """

    kv_format: str
    role: str
    block_size: int
    head_dim: int
    data: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor | None = None

    def __repr__(self) -> str:
        b, h, length, _ = self.data.shape
        return (
            f"QuantizedKV({self.kv_format}, {self.role}, B={b}, H={h}, L={length}, D={self.head_dim}, "
            f"block_size={self.block_size}, device={self.data.device})"
        )

    @property
    def nbytes(self) -> int:
        """Bytes of data and scales."""
        tensors = (self.data, self.scale, self.minimum)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to(self, device: torch.device | str) -> QuantizedKV:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(
            self, data=move(self.data), scale=move(self.scale), minimum=move(self.minimum)
        )


def _blocks(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, int]:
    """``x [B, H, L, D]`` as ``[B, H, NB, block_size, D]`` padded by repeating its last token
    (a padded copy changes no block's minimum, maximum or absolute maximum), and ``L``."""
    length = x.shape[2]
    pad = -length % block_size
    if pad:
        x = torch.cat([x, x[:, :, -1:].expand(-1, -1, pad, -1)], dim=2)
    return rearrange(x, "b h (n t) d -> b h n t d", t=block_size), length


def quantize(x: torch.Tensor, kv_format: str, *, role: Role, block_size: int) -> QuantizedKV:
    """``x [B, H, L, D]`` (any float dtype; ``L >= 1``) in ``kv_format`` (``"fp8"``/``"int4"``)."""
    if kv_format not in ("fp8", "int4"):
        raise ValueError(f"kv_format must be 'fp8' or 'int4' to quantize, got {kv_format!r}")
    if role not in ("key", "value"):
        raise ValueError(f"role must be 'key' or 'value', got {role!r}")
    if x.dim() != 4 or x.shape[2] == 0:
        raise ValueError(f"x must be [B, H, L, D] with L >= 1, got {tuple(x.shape)}")
    head_dim = x.shape[3]
    blocks, length = _blocks(x.float(), block_size)
    if kv_format == "fp8":
        amax = blocks.abs().amax(dim=(3, 4))
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        data = (blocks / scale[..., None, None]).to(torch.float8_e4m3fn)
        data = rearrange(data, "b h n t d -> b h (n t) d")[:, :, :length]
        return QuantizedKV(kv_format, role, block_size, head_dim, data.contiguous(), scale)
    if role == "key":  # per channel over each block's tokens
        low, high = blocks.amin(dim=3), blocks.amax(dim=3)  # [B, H, NB, D]
        scale, minimum = _int4_scale(low, high)
        codes = (blocks - minimum[:, :, :, None].float()) / scale[:, :, :, None].float()
        codes = rearrange(codes, "b h n t d -> b h (n t) d")[:, :, :length]
    else:  # per token over its channels
        flat = x.float()
        scale, minimum = _int4_scale(flat.amin(dim=3), flat.amax(dim=3))  # [B, H, L]
        codes = (flat - minimum[..., None].float()) / scale[..., None].float()
    codes = codes.round().clamp(0, INT4_LEVELS).to(torch.uint8)
    if head_dim % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    data = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return QuantizedKV(kv_format, role, block_size, head_dim, data.contiguous(), scale, minimum)


def _int4_scale(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bfloat16 ``(scale, minimum)`` for codes 0..15 over ``[low, high]``: rounded to bfloat16
    first, so that quantizing and dequantizing use the same numbers."""
    minimum = low.to(torch.bfloat16)
    span = (high - minimum.float()).clamp(min=0)
    scale = (span / INT4_LEVELS).to(torch.bfloat16)
    # A constant group (or a span under bfloat16's range) still needs a positive scale.
    scale = torch.where(scale.float() > 0, scale, torch.ones_like(scale))
    return scale, minimum


def dequantize(q: QuantizedKV, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``[B, H, L, D]`` values ``q`` stands for, computed in float32, returned in ``dtype``."""
    length = q.data.shape[2]
    if q.kv_format == "fp8":
        scale = q.scale.repeat_interleave(q.block_size, dim=2)[:, :, :length]
        return (q.data.float() * scale[..., None]).to(dtype)
    codes = torch.stack([q.data & 0xF, q.data >> 4], dim=-1).flatten(-2)[..., : q.head_dim].float()
    if q.role == "key":
        scale = q.scale.float().repeat_interleave(q.block_size, dim=2)[:, :, :length]
        minimum = q.minimum.float().repeat_interleave(q.block_size, dim=2)[:, :, :length]
        return (codes * scale + minimum).to(dtype)
    return (codes * q.scale.float()[..., None] + q.minimum.float()[..., None]).to(dtype)


def token_bytes(kv_format: str, *, head_dim: int, block_size: int, itemsize: int = 2) -> float:
    """Bytes per token and head of keys plus values in ``kv_format``, scales included (the
    scale of a block spread over its ``block_size`` tokens). ``itemsize``: the native dtype's.

    Example:
        >>> from omnimem.store.formats import token_bytes
        >>> round(token_bytes("int4", head_dim=128, block_size=128) / token_bytes("native", head_dim=128,
        ...       block_size=128), 3)
        0.266
    """
    check_kv_format(kv_format)
    if kv_format == "native":
        return 2.0 * head_dim * itemsize
    if kv_format == "fp8":
        return 2.0 * (head_dim + 4 / block_size)
    packed = math.ceil(head_dim / 2)
    key = packed + 2 * 2 * head_dim / block_size  # bfloat16 scale and minimum per channel per block
    value = packed + 2 * 2  # bfloat16 scale and minimum per token
    return key + value
