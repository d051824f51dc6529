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

On a GPU with bf16 or fp16 tiles int4 is decoded a 32-bit word at a time by the inline PTX below
(``WORDS``): integer and paired half-precision instructions instead of the compiler's byte
extraction and float32 arithmetic, ``code * scale + minimum`` in one fused multiply-add of the
compute dtype (one rounding, as float32-then-round except in rare double-rounding ties). The
fp8 PTX here is the Hopper Gluon kernel's (in this kernel the compiler's conversion measured
faster). Under the interpreter (CPU) the plain path runs; the PTX is replayed instruction by
instruction against ``dequantize`` in ``tests/test_gluon_compile.py``; docs/memory.md has the
measurements.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Word-level decoding (GPU only: the interpreter runs no PTX). OMNIMEM_DECODE_WORDS=0 keeps the
# plain path on a GPU too: the benchmarks' side-by-side (read at import).
WORDS = tl.constexpr(
    os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "on", "yes")
    and os.environ.get("OMNIMEM_DECODE_WORDS", "1") != "0"
)

# int4 codes to values a 32-bit word (8 codes, 4 output pairs) at a time, in the compute dtype's
# paired arithmetic (PTX for sm_80 on; ``inline_asm_elementwise`` with ``pack=4``): byte c of a
# word holds channels 2c (low nibble) and 2c + 1. One ``lop3`` moves two nibbles 16 bits apart
# into the mantissas of a pair of 128s (bf16 0x43xx; fp16 1024, 0x64xx), shifts of 4, 8 and 12
# bring the other nibbles down, and byte permutes reorder the pairs (channels 0/4, 1/5, 2/6, 3/7
# -> 0/1, 2/3, 4/5, 6/7); then the 128 (1024) comes off exactly (as ``x * 1 - 128``: a paired
# ``sub`` needs sm_90, ``fma`` sm_80, where the Triton-language kernels also run), and ``code *
# scale + minimum`` is one fused multiply-add of the pair, the arithmetic of the byte-wise
# decoder (about 4.75 instructions a pair instead of 7-9, per the SASS: the compiler extracts
# each byte and rebuilds each pair, and re-packs the scales every pass).
_INT4_WORD = """{{
.reg .b32 t<4>, r<4>, k, one;
mov.b32 k, 0x{k:08X};
mov.b32 one, 0x{one:08X};
shr.b32 t1, $4, 4;
shr.b32 t2, $4, 8;
shr.b32 t3, $4, 12;
lop3.b32 r0, $4, 0x000F000F, 0x{m:08X}, 0xEA;
lop3.b32 r1, t1, 0x000F000F, 0x{m:08X}, 0xEA;
lop3.b32 r2, t2, 0x000F000F, 0x{m:08X}, 0xEA;
lop3.b32 r3, t3, 0x000F000F, 0x{m:08X}, 0xEA;
prmt.b32 t0, r0, r1, 0x5410;
prmt.b32 t1, r2, r3, 0x5410;
prmt.b32 t2, r0, r1, 0x7632;
prmt.b32 t3, r2, r3, 0x7632;
fma.rn.{t}x2 t0, t0, one, k;
fma.rn.{t}x2 t1, t1, one, k;
fma.rn.{t}x2 t2, t2, one, k;
fma.rn.{t}x2 t3, t3, one, k;
fma.rn.{t}x2 $0, t0, $5, $9;
fma.rn.{t}x2 $1, t1, $6, $10;
fma.rn.{t}x2 $2, t2, $7, $11;
fma.rn.{t}x2 $3, t3, $8, $12;
}}"""
INT4_WORD_BF16 = tl.constexpr(_INT4_WORD.format(k=0xC300C300, m=0x43004300, one=0x3F803F80, t="bf16"))
INT4_WORD_FP16 = tl.constexpr(_INT4_WORD.format(k=0xE400E400, m=0x64006400, one=0x3C003C00, t="f16"))


# fp8 e4m3 codes to the compute dtype exactly, unscaled, a 32-bit word (4 codes, 2 output pairs)
# at a time (the kernels apply the block's scales). bf16: each byte into the high byte
# of a half (``prmt`` with a zero register), its exponent and mantissa shifted down 4 and masked,
# its sign kept: the bf16 bits of the value times 2**-120 (the exponent biases differ by 120;
# subnormal codes become subnormal bf16 alike), then one exact multiply by 2**120 a pair. fp16:
# the hardware's exact pair conversion (sm_89+).
FP8_WORD_BF16 = tl.constexpr("""{
.reg .b32 z, h0, h1, y0, y1, s0, s1, k;
mov.b32 z, 0;
mov.b32 k, 0x7B807B80;
prmt.b32 h0, $2, z, 0x1404;
prmt.b32 h1, $2, z, 0x3424;
shr.b32 y0, h0, 4;
shr.b32 y1, h1, 4;
and.b32 s0, h0, 0x80008000;
and.b32 s1, h1, 0x80008000;
lop3.b32 y0, y0, 0x07F007F0, s0, 0xEA;
lop3.b32 y1, y1, 0x07F007F0, s1, 0xEA;
mul.rn.bf16x2 $0, y0, k;
mul.rn.bf16x2 $1, y1, k;
}""")
FP8_WORD_FP16 = tl.constexpr("""{
.reg .b16 lo, hi;
mov.b32 {lo, hi}, $2;
cvt.rn.f16x2.e4m3x2 $0, lo;
cvt.rn.f16x2.e4m3x2 $1, hi;
}""")


@triton.jit
def int4_words(raw, scale2, low2, dtype: tl.constexpr):
    """``raw`` int4 code bytes ``[N, C]`` (uint8, channel 2c in the low nibble) with ``scale2``
    and ``low2`` (int32, broadcastable: a pair's two scales / minimums in ``dtype``, channel 2c
    in the low half) to ``code * scale + minimum`` in ``dtype`` (bf16 or fp16), ``[N, 2C]``."""
    if dtype == tl.bfloat16:
        pairs = tl.inline_asm_elementwise(
            INT4_WORD_BF16, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r", [raw, scale2, low2], dtype=tl.int32,
            is_pure=True, pack=4,
        )  # fmt: skip
    else:
        pairs = tl.inline_asm_elementwise(
            INT4_WORD_FP16, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r", [raw, scale2, low2], dtype=tl.int32,
            is_pure=True, pack=4,
        )  # fmt: skip
    even = pairs.to(tl.int16).to(dtype, bitcast=True)
    odd = (pairs >> 16).to(tl.int16).to(dtype, bitcast=True)
    return tl.reshape(tl.join(even, odd), (raw.shape[0], 2 * raw.shape[1]))


@triton.jit
def pair_bits(even, odd, dtype: tl.constexpr):
    """Scales or minimums of two channels (or one twice) in ``dtype``, as one int32: the operand
    of a pair (``even`` in the low half)."""
    lo = even.to(dtype).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi = odd.to(dtype).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return lo | (hi << 16)


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
def raw_tile(base, start, limit, stride_l, BLOCK_N: tl.constexpr, WIDTH: tl.constexpr, VALID: tl.constexpr,
             MASKED: tl.constexpr):  # fmt: skip
    """Bytes ``[BLOCK_N, WIDTH]`` of rows ``[start, start + BLOCK_N)`` (columns ``>= VALID``
    and, with ``MASKED``, rows ``>= limit`` read 0)."""
    tokens = start + tl.arange(0, BLOCK_N)
    row = base + tokens[:, None].to(tl.int64) * stride_l
    cols = tl.arange(0, WIDTH)
    if MASKED or VALID != WIDTH:
        mask = (tokens[:, None] < limit) & (cols[None, :] < VALID)
        raw = tl.load(row + cols[None, :], mask=mask, other=0)
    else:
        raw = tl.load(row + cols[None, :])
    return raw


@triton.jit
def codes_tile(base, start, limit, stride_l, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               HEAD_DIM: tl.constexpr, INT4: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """Codes of rows ``[start, start + BLOCK_N)``: fp8 e4m3 values (unscaled, ``float8e4nv``)
    or int4 codes 0..15 (``uint8``, one a channel); with ``MASKED``, rows ``>= limit`` read 0."""
    # One return, after a constexpr branch: the compiler (unlike the interpreter) also types an
    # early return's fall-through and rejects the two code types as inconsistent.
    if INT4:
        raw = raw_tile(base, start, limit, stride_l, BLOCK_N, BLOCK_D // 2, (HEAD_DIM + 1) // 2, MASKED)
        # [BLOCK_N, HALF, 2] -> [BLOCK_N, BLOCK_D]: channel 2c from the low nibble of byte c.
        codes = tl.reshape(tl.join(raw & 0xF, raw >> 4), (BLOCK_N, BLOCK_D))
    else:
        raw = raw_tile(base, start, limit, stride_l, BLOCK_N, BLOCK_D, HEAD_DIM, MASKED)
        codes = raw.to(tl.float8e4nv, bitcast=True)
    return codes


@triton.jit
def key_tile(codes_base, scale_ptr, min_ptr, scales, block, start, limit, stride_l, stride_sn,
             dtype: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
             INT4: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """Keys of rows ``[start, start + BLOCK_N)`` of whole block ``block`` in ``dtype``, and the
    factor of their scores (fp8: the block's scale; int4: 1). ``scales``: the (batch, head)
    offset into the scale and minimum buffers."""
    if INT4:
        if WORDS and dtype != tl.float32:
            raw = raw_tile(codes_base, start, limit, stride_l, BLOCK_N, BLOCK_D // 2, (HEAD_DIM + 1) // 2,
                           MASKED)  # fmt: skip
            # each byte's two channels' scales (minimums) as one int32; padding channels 0
            even = 2 * tl.arange(0, BLOCK_D // 2)
            at = scales + block.to(tl.int64) * stride_sn + even
            ok, odd_ok = even < HEAD_DIM, even + 1 < HEAD_DIM
            scale2 = pair_bits(tl.load(scale_ptr + at, mask=ok, other=0.0),
                               tl.load(scale_ptr + at + 1, mask=odd_ok, other=0.0), dtype)  # fmt: skip
            low2 = pair_bits(tl.load(min_ptr + at, mask=ok, other=0.0),
                             tl.load(min_ptr + at + 1, mask=odd_ok, other=0.0), dtype)  # fmt: skip
            keys = int4_words(raw, scale2[None, :], low2[None, :], dtype)
        else:
            codes = codes_tile(codes_base, start, limit, stride_l, BLOCK_N, BLOCK_D, HEAD_DIM, INT4, MASKED)
            dims = tl.arange(0, BLOCK_D)
            channel = scales + block.to(tl.int64) * stride_sn + dims
            scale = tl.load(scale_ptr + channel, mask=dims < HEAD_DIM, other=0.0).to(tl.float32)
            low = tl.load(min_ptr + channel, mask=dims < HEAD_DIM, other=0.0).to(tl.float32)
            keys = (int4_codes_f32(codes) * scale[None, :] + low[None, :]).to(dtype)
        mult = tl.full([], 1.0, tl.float32)
    else:
        keys = fp8_tile(codes_base, start, limit, stride_l, dtype, BLOCK_N, BLOCK_D, HEAD_DIM, MASKED)
        mult = tl.load(scale_ptr + scales + block.to(tl.int64) * stride_sn).to(tl.float32)
    return keys, mult


@triton.jit
def fp8_tile(codes_base, start, limit, stride_l, dtype: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """fp8 rows ``[start, start + BLOCK_N)`` as exact, unscaled values in ``dtype``. Not the
    word-level PTX here: in this kernel it measured slower than the compiler's conversion (1.267
    against 1.204 ms, the sparse call at 60 s, H100, one call, 2026-12-07); the Gluon kernel's
    producer uses it (1.157 against 1.530 for its float32 decode)."""
    codes = codes_tile(codes_base, start, limit, stride_l, BLOCK_N, BLOCK_D, HEAD_DIM, False, MASKED)
    return fp8_codes(codes, dtype)


@triton.jit
def value_tile(codes_base, scale_ptr, min_ptr, scales, block, start, limit, stride_l, stride_sn,
               dtype: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
               INT4: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """Values of rows ``[start, start + BLOCK_N)`` of whole block ``block`` in ``dtype`` (rows
    ``>= limit`` are 0 when ``MASKED``), and the factor of their probabilities (fp8: the
    block's scale; int4: 1)."""
    if INT4:
        tokens = start + tl.arange(0, BLOCK_N)
        per_token = scales + tokens.to(tl.int64) * stride_sn
        if MASKED:  # scale and minimum 0: rows past the limit are exactly 0
            scale = tl.load(scale_ptr + per_token, mask=tokens < limit, other=0.0)
            low = tl.load(min_ptr + per_token, mask=tokens < limit, other=0.0)
        else:
            scale = tl.load(scale_ptr + per_token)
            low = tl.load(min_ptr + per_token)
        if WORDS and dtype != tl.float32:
            raw = raw_tile(codes_base, start, limit, stride_l, BLOCK_N, BLOCK_D // 2, (HEAD_DIM + 1) // 2,
                           MASKED)  # fmt: skip
            scale2, low2 = pair_bits(scale, scale, dtype), pair_bits(low, low, dtype)  # one a token
            values = int4_words(raw, scale2[:, None], low2[:, None], dtype)
        else:
            codes = codes_tile(codes_base, start, limit, stride_l, BLOCK_N, BLOCK_D, HEAD_DIM, INT4, MASKED)
            values = int4_codes_f32(codes) * scale.to(tl.float32)[:, None] + low.to(tl.float32)[:, None]
        if HEAD_DIM != BLOCK_D:  # padding channels stay 0
            values = tl.where((tl.arange(0, BLOCK_D) < HEAD_DIM)[None, :], values, 0.0)
        values = values.to(dtype)
        mult = tl.full([], 1.0, tl.float32)
    else:
        values = fp8_tile(codes_base, start, limit, stride_l, dtype, BLOCK_N, BLOCK_D, HEAD_DIM, MASKED)
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


def kernels_decode(kv_format: str, device: torch.device) -> bool:
    """Whether these kernels decode ``kv_format`` on ``device``: triton converts float8 e4m3 on
    compute capability 8.9 and later only (an opaque compile error otherwise). int4 runs on any
    GPU triton supports; the interpreter runs both."""
    if kv_format != "fp8" or device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


def check_kernel_device(kv_format: str, device: torch.device) -> None:
    """A ``ValueError`` where ``kernels_decode`` is false, naming what works instead."""
    if not kernels_decode(kv_format, device):
        capability = torch.cuda.get_device_capability(device)
        raise ValueError(
            f"kv_format='fp8' on the triton backend needs a GPU of compute capability 8.9 or later "
            f"(triton's float8 e4m3); {torch.cuda.get_device_name(device)} is "
            f"{capability[0]}.{capability[1]}: use kv_format='int4', or backend='gather' or 'dense' "
            f"(they dequantize with torch)"
        )


def store_arguments(store, fallback, live_first: int = 0) -> dict:
    """The keyword arguments with which a kernel that reads blocks before ``live_first`` from
    ``store`` (a ``QuantizedBlocks``, or None) is launched: its code and scale pointers and
    strides, ``live_first`` and the ``QUANTIZED``/``INT4`` constexprs (without a store:
    ``fallback``, any tensor, for the unused pointers)."""
    if store is None:
        kq = vq = k_scale = v_scale = k_min = v_min = fallback
        strides = [0] * 9
    else:
        check_kernel_device(store.kv_format, fallback.device)
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
