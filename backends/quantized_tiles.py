"""Tiles of a quantized history (``omnimem.store``), decoded in registers by the attention kernels.

The scattered kernel (``triton_attention``, ``store=``) and the gated selected-branch kernel
(``selected_attention``, ``store=``) read a whole history block's bytes in place with these;
their plain-torch twin is ``omnimem.store.formats.dequantize``.

- fp8 e4m3: the codes convert exactly to the compute dtype (bf16, fp16 and fp32 hold every e4m3
  value); the block's key scale multiplies the scores and its value scale the block's
  probabilities before ``p @ v`` (one scalar each), so the tensor cores see exact operands.
- int4: two codes a byte (the even channel in the low nibble), read once and split into both
  nibbles in registers; keys are ``code * scale + minimum`` per (block, channel), values per
  token, in float32, rounded once to the compute dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def int4_codes_f32(codes):
    """Codes 0..15 (``uint8``) as float32, exactly: the code ORed into the mantissa of 2**23
    (``0x4B000000``) is ``2**23 + code``, and subtracting ``2**23`` is exact. A bit operation and
    an add instead of an integer-to-float conversion per element: the int4 sparse call went from
    1.833 to 1.704 ms (H100, 2026-12-07, ``benchmarks/kv_formats_gpu.py --quick``)."""
    return (codes.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def fp8_codes(codes, dtype: tl.constexpr):
    """e4m3 codes in ``dtype`` (exact: bf16, fp16 and fp32 hold every e4m3 value). To bf16
    through float32: a direct conversion measured slower (1.458 against 1.198 ms, same run). To
    fp16 directly (one instruction a pair on Hopper)."""
    if dtype == tl.float16:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
        out = codes.to(tl.float16)
    else:
        out = codes.to(tl.float32).to(dtype)
    return out


@triton.jit
def codes_tile(base, start, limit, stride_l, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               HEAD_DIM: tl.constexpr, INT4: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """Codes of rows ``[start, start + BLOCK_N)``: fp8 e4m3 values (unscaled, ``float8e4nv``)
    or int4 codes 0..15 (``uint8``, one a channel); with ``MASKED``, rows ``>= limit`` read 0."""
    tokens = start + tl.arange(0, BLOCK_N)
    row = base + tokens[:, None].to(tl.int64) * stride_l
    # One return, after a constexpr branch: the compiler (unlike the interpreter) also types an
    # early return's fall-through and rejects the two code types as inconsistent.
    if INT4:
        HALF: tl.constexpr = BLOCK_D // 2
        cols = tl.arange(0, HALF)
        if MASKED or HEAD_DIM != BLOCK_D:
            mask = (tokens[:, None] < limit) & (cols[None, :] < (HEAD_DIM + 1) // 2)
            raw = tl.load(row + cols[None, :], mask=mask, other=0)
        else:
            raw = tl.load(row + cols[None, :])
        # [BLOCK_N, HALF, 2] -> [BLOCK_N, BLOCK_D]: channel 2c from the low nibble of byte c.
        codes = tl.reshape(tl.join(raw & 0xF, raw >> 4), (BLOCK_N, BLOCK_D))
    else:
        cols = tl.arange(0, BLOCK_D)
        if MASKED or HEAD_DIM != BLOCK_D:
            mask = (tokens[:, None] < limit) & (cols[None, :] < HEAD_DIM)
            raw = tl.load(row + cols[None, :], mask=mask, other=0)
        else:
            raw = tl.load(row + cols[None, :])
        codes = raw.to(tl.float8e4nv, bitcast=True)
    return codes


@triton.jit
def key_tile(codes_base, scale_ptr, min_ptr, scales, block, start, limit, stride_l, stride_sn,
             dtype: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
             INT4: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """Keys of rows ``[start, start + BLOCK_N)`` of whole block ``block`` in ``dtype``, and the
    factor of their scores (fp8: the block's scale; int4: 1). ``scales``: the (batch, head)
    offset into the scale and minimum buffers."""
    codes = codes_tile(codes_base, start, limit, stride_l, BLOCK_N, BLOCK_D, HEAD_DIM, INT4, MASKED)
    if INT4:
        dims = tl.arange(0, BLOCK_D)
        channel = scales + block.to(tl.int64) * stride_sn + dims
        scale = tl.load(scale_ptr + channel, mask=dims < HEAD_DIM, other=0.0).to(tl.float32)
        low = tl.load(min_ptr + channel, mask=dims < HEAD_DIM, other=0.0).to(tl.float32)
        keys = (int4_codes_f32(codes) * scale[None, :] + low[None, :]).to(dtype)
        mult = tl.full([], 1.0, tl.float32)
    else:
        keys = fp8_codes(codes, dtype)
        mult = tl.load(scale_ptr + scales + block.to(tl.int64) * stride_sn).to(tl.float32)
    return keys, mult


@triton.jit
def value_tile(codes_base, scale_ptr, min_ptr, scales, block, start, limit, stride_l, stride_sn,
               dtype: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
               INT4: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """Values of rows ``[start, start + BLOCK_N)`` of whole block ``block`` in ``dtype`` (rows
    ``>= limit`` are 0 when ``MASKED``), and the factor of their probabilities (fp8: the
    block's scale; int4: 1)."""
    codes = codes_tile(codes_base, start, limit, stride_l, BLOCK_N, BLOCK_D, HEAD_DIM, INT4, MASKED)
    if INT4:
        tokens = start + tl.arange(0, BLOCK_N)
        per_token = scales + tokens.to(tl.int64) * stride_sn
        if MASKED:  # scale and minimum 0: rows past the limit are exactly 0
            scale = tl.load(scale_ptr + per_token, mask=tokens < limit, other=0.0).to(tl.float32)
            low = tl.load(min_ptr + per_token, mask=tokens < limit, other=0.0).to(tl.float32)
        else:
            scale = tl.load(scale_ptr + per_token).to(tl.float32)
            low = tl.load(min_ptr + per_token).to(tl.float32)
        values = int4_codes_f32(codes) * scale[:, None] + low[:, None]
        if HEAD_DIM != BLOCK_D:  # padding channels stay 0
            values = tl.where((tl.arange(0, BLOCK_D) < HEAD_DIM)[None, :], values, 0.0)
        values = values.to(dtype)
        mult = tl.full([], 1.0, tl.float32)
    else:
        values = fp8_codes(codes, dtype)
        mult = tl.load(scale_ptr + scales + block.to(tl.int64) * stride_sn).to(tl.float32)
    return values, mult


@triton.jit
def decoded_tile(codes_base, scale_ptr, min_ptr, scales, block, start, limit, stride_l, stride_sn,
                 dtype: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                 INT4: tl.constexpr, MASKED: tl.constexpr, IS_KEY: tl.constexpr):  # fmt: skip
    """``key_tile`` or ``value_tile``."""
    if IS_KEY:
        tile, mult = key_tile(codes_base, scale_ptr, min_ptr, scales, block, start, limit, stride_l,
                              stride_sn, dtype, BLOCK_N, BLOCK_D, HEAD_DIM, INT4, MASKED)  # fmt: skip
    else:
        tile, mult = value_tile(codes_base, scale_ptr, min_ptr, scales, block, start, limit, stride_l,
                                stride_sn, dtype, BLOCK_N, BLOCK_D, HEAD_DIM, INT4, MASKED)  # fmt: skip
    return tile, mult


@triton.jit
def store_block_tiles(kq, vq, k_scale_ptr, v_scale_ptr, k_min_ptr, v_min_ptr, k_scales, v_scales, block,
                      start, block_size, stride_l, stride_ksn, stride_vsn, dtype: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                      INT4: tl.constexpr):  # fmt: skip
    """``(keys, key factor, values, value factor)`` of rows ``[start, start + BLOCK_N)`` of whole
    block ``block`` of a store (rows past the block read 0): what the gated selected kernel and
    the dQ kernel read of a quantized history block."""
    end = block * block_size + block_size
    k, k_mult = decoded_tile(kq, k_scale_ptr, k_min_ptr, k_scales, block, start, end, stride_l, stride_ksn,
                             dtype, BLOCK_N, BLOCK_D, HEAD_DIM, INT4, True, True)  # fmt: skip
    v, v_mult = decoded_tile(vq, v_scale_ptr, v_min_ptr, v_scales, block, start, end, stride_l, stride_vsn,
                             dtype, BLOCK_N, BLOCK_D, HEAD_DIM, INT4, True, False)  # fmt: skip
    return k, k_mult, v, v_mult


def store_arguments(store, fallback, live_first: int = 0) -> dict:
    """The keyword arguments with which a kernel that reads blocks before ``live_first`` from
    ``store`` (a ``QuantizedBlocks``, or None) is launched: its code and scale pointers and
    strides, ``live_first`` and the ``QUANTIZED``/``INT4`` constexprs (without a store:
    ``fallback``, any tensor, for the unused pointers)."""
    if store is None:
        kq = vq = k_scale = v_scale = k_min = v_min = fallback
        strides = [0] * 9
    else:
        kq, vq = store.k.view(torch.uint8), store.v.view(torch.uint8)
        k_scale, v_scale = store.k_scale, store.v_scale
        k_min = store.k_min if store.k_min is not None else k_scale  # fp8 has none: unused
        v_min = store.v_min if store.v_min is not None else v_scale
        strides = [*kq.stride()[:3], *k_scale.stride()[:3], *v_scale.stride()[:3]]
    names = ("qkb", "qkh", "qkl", "ksb", "ksh", "ksn", "vsb", "vsh", "vsn")
    return dict(
        kq_ptr=kq, vq_ptr=vq, k_scale_ptr=k_scale, v_scale_ptr=v_scale, k_min_ptr=k_min, v_min_ptr=v_min,
        live_first=live_first, **{f"stride_{n}": x for n, x in zip(names, strides, strict=True)},
        QUANTIZED=store is not None, INT4=store is not None and store.kv_format == "int4",
    )  # fmt: skip
