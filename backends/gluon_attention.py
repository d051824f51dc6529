"""Per-head scattered-block attention for Hopper, warp-specialized (Gluon): kernel and launcher.

The same function as ``triton_attention`` (reference: ``dense``), written in Gluon so that the
warps can take roles, as FlashAttention-3 does: one loader warp issues the TMA copies of each
selected history block (then the chunk's tiles) into a ring of shared-memory stages, and two
consumer warpgroups, each owning 64 of the tile's 128 query rows, run QK^T, the online softmax
and PV on them. The consumers synchronise with the loader through mbarriers only (no CTA-wide
barrier), so one warpgroup's softmax runs while the other's matrix products use the tensor
cores; within a warpgroup the next tile's QK^T is issued before this tile's PV completes.
Triton 3.6 cannot express this for Hopper (its kernel waits on every wgmma group and keeps
CTA barriers in the loop), which is what limits ``triton_attention``.

With a quantized history (``store=``, fp8 or int4) a producer warpgroup takes the loader's
place: it brings each selected whole block's code bytes (half or a quarter of the bf16 bytes)
into a ring of its own and dequantizes them into the consumers' stage ring, as
``omnimem.store.formats.dequantize`` would, while the consumers run the previous tiles.

Scope (``supported`` says which calls qualify; the rest run ``triton_attention``): compute
capability 9.x, fp16/bf16, head_dim 64 or 128, block_size a multiple of 128, one query group,
and strides a 2-D TMA view can express (both ``[B, H, L, D]`` and ``[B, L, H, D]`` caches).
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from omnimem.backends.quantized_tiles import FP8_WORD_BF16, FP8_WORD_FP16, INT4_WORD_BF16, INT4_WORD_FP16

# Gluon is experimental: later tritons (3.9, CI's) renamed these; 3.6 (the device image's) has the old names.
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
_cta_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier
_NEW_REINTERPRET = gl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))  # 3.6: `_reinterpret`

# The third warpgroup (``_produce_partition``): the loader warp (beside padding) or the producer. Registers a
# thread of the worker consumer warpgroup and of the third; the default warpgroup gets what they
# leave of 3 x 168.
THIRD_PARTITION = {
    "native": dict(THIRD_WARPS=1, WORKER_REGS=232, THIRD_REGS=40),
    "quantized": dict(THIRD_WARPS=4, WORKER_REGS=224, THIRD_REGS=56),
    # FP8_THREE_STAGES: the consumers hold their e4m3 queries (16 registers); the producer only
    # decodes values
    "in_place": dict(THIRD_WARPS=4, WORKER_REGS=232, THIRD_REGS=40),
}
BLOCK_M = 128  # query rows per program: 64 per consumer warpgroup
BLOCK_N = 128  # keys per stage
# A measurement of the decoders' floor (QUANT 3; wrong outputs): the producer widens code bytes
# into the stages without decoding them. Never set outside the benchmark.
FLOOR_COPY = False
# The producer reads a code tile's table entry and scales before it waits for the tile's stage
# (their global latency then overlaps the consumers' work): the 4-minute int4 chunk 428 ms
# against 479 (H100, docs/memory.md). False: after, as before; kept for that side-by-side.
EARLY_OPERANDS = True
# fp8 key tiles enter the tensor cores as stored (``KEY_MMA8``): the consumers multiply them by
# their queries in e4m3 (one scale a query row, ``quantized_attention.fp8_queries``), so keys
# need no decode and their products run at the fp8 rate; values are decoded as before. It costs
# accuracy: 1.83% against the bf16 cache instead of 1.50% (emulated, docs/memory.md), within
# issue 36's 2%. Compiled for sm_90 in CI, not yet run on a GPU: off until measured.
FP8_KEY_PRODUCTS = False
# With fp8 key products, three stages (``IN_PLACE``): a code tile's value bytes arrive by TMA in
# the first half of the stage they decode into and are decoded there, last rows first, so no
# code ring takes shared memory; the e4m3 queries stay in registers. Compiled, not yet run.
FP8_THREE_STAGES = False
# int4 in three stages (``IN_PLACE``): both halves of a code tile arrive by TMA in the stages they
# decode into and are decoded there, so no code ring takes shared memory. Compiled, not yet run.
INT4_THREE_STAGES = False
# A split tile is cut into at most this many parts: each cut costs a merge (a wait and a
# reload of the partial output) on the critical path.
MAX_SPLITS = 4


@gluon.jit
def _load_queries(q_desc, q_smem, q_bar, q_row, q_col, any_tiles):
    """The tile's two halves of queries (an empty part, ``any_tiles`` false, loads nothing:
    its consumers skip the queries)."""
    HALF: gl.constexpr = q_smem.type.shape[1]
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes, pred=any_tiles)
    _tma_load(q_desc, [q_row, q_col], q_bar, q_smem.index(0), pred=any_tiles)
    _tma_load(q_desc, [q_row + HALF, q_col], q_bar, q_smem.index(1), pred=any_tiles)


@gluon.jit
def _load_partition(
    q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
    table_ptr, q_row, q_col, kv_row, kv_col, num_hist_tiles, it_begin, it_end, history_len,
    BLOCK_SIZE: gl.constexpr,
):  # fmt: skip
    """One warp: the tile's queries once, then keys and values of key tiles
    ``[it_begin, it_end)``, in order, into the stage ring."""
    STAGES: gl.constexpr = k_smem.type.shape[0]
    _load_queries(q_desc, q_smem, q_bar, q_row, q_col, it_end > it_begin)
    for it in range(it_begin, it_end):
        j = it - it_begin
        stage = j % STAGES
        # A stage is free once both consumers finished its PV (barriers start "phase 1 done").
        mbarrier.wait(kv_empty.index(stage), ((j // STAGES) & 1) ^ 1)
        _load_native(it, stage, k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, table_ptr, kv_row, kv_col,
                     num_hist_tiles, history_len, 0, BLOCK_SIZE)  # fmt: skip


@gluon.constexpr_function
def _codes_layout(width, warps):
    """Registers of a converter pass: 16 consecutive elements of a ``width``-wide row a thread."""
    cols = width // 16
    return gl.BlockedLayout([1, 16], [32 // cols, cols], [warps, 1], [1, 0])


@gluon.jit
def _int4_words(codes, scale2, low2, dtype: gl.constexpr):
    """``codes`` (uint8, two channels a byte) with ``scale2`` and ``low2`` (int32: the pair's
    two scales / minimums, channel 2c in the low half) to values of the compute dtype, shaped
    ``codes.shape`` with the last dimension doubled."""
    if dtype == gl.bfloat16:
        pairs = gl.inline_asm_elementwise(INT4_WORD_BF16, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
                                          [codes, scale2, low2], gl.int32, True, 4)  # fmt: skip
    else:
        pairs = gl.inline_asm_elementwise(INT4_WORD_FP16, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
                                          [codes, scale2, low2], gl.int32, True, 4)  # fmt: skip
    even = pairs.to(gl.int16).to(dtype, bitcast=True)
    odd = (pairs >> 16).to(gl.int16).to(dtype, bitcast=True)
    return gl.reshape(gl.join(even, odd), [codes.shape[0], 2 * codes.shape[1]])


@gluon.jit
def _pairs(x, dtype: gl.constexpr, layout: gl.constexpr):
    """``x [N, 2]`` (a scale or minimum per channel) in ``dtype``, each row as one int32 (channel
    2c in the low half): ``[N]`` in ``SliceLayout(0, layout)``."""
    bits = x.to(dtype).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    even, odd = gl.split(bits)
    return gl.convert_layout(even | (odd << 16), gl.SliceLayout(0, layout))


@gluon.jit
def _paired(half):
    """int16 (a bf16 or fp16 value's bits) to int32 holding it twice: a pair's operand."""
    w = half.to(gl.int32) & 0xFFFF
    return w | (w << 16)


@gluon.jit
def _fp8_words(codes, dtype: gl.constexpr):
    """``codes`` (uint8 e4m3 bits) as exact, unscaled values of ``dtype``."""
    if dtype == gl.bfloat16:
        x = gl.inline_asm_elementwise(FP8_WORD_BF16, "=r,=r,r", [codes], gl.bfloat16, True, 4)
    else:
        x = gl.inline_asm_elementwise(FP8_WORD_FP16, "=r,=r,r", [codes], gl.float16, True, 4)
    return x


@gluon.constexpr_function
def _raw_layout(head_dim, warps):
    """Registers of an int4 converter pass: 8 code bytes (16 channels) of a row a thread."""
    return gl.BlockedLayout([1, 8], [32 // (head_dim // 16), head_dim // 16], [warps, 1], [1, 0])


@gluon.jit
def _key_operands(scale_ptr, min_ptr, scales, block, coded, stride_sn, dtype: gl.constexpr,
                  HEAD_DIM: gl.constexpr):  # fmt: skip
    """An int4 key tile's scales and minimums (per block and channel) in ``dtype`` as int32
    pairs (``_int4_words``' operands) in ``_raw_layout``'s column slice (zeros where ``coded``
    is false: nothing is read)."""
    WARPS: gl.constexpr = gl.num_warps()
    raw_layout: gl.constexpr = _raw_layout(HEAD_DIM, WARPS)
    if dtype == gl.bfloat16:
        # the stored bf16 pairs are the operands: one int32 load a pair (skip_reason checked
        # that every element offset is even), in the codes' own layout
        pair = gl.arange(0, HEAD_DIM // 2, layout=gl.SliceLayout(0, raw_layout))
        at = (scales + block.to(gl.int64) * stride_sn) // 2 + pair
        scale2 = gl.load(scale_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + at, mask=coded, other=0)
        low2 = gl.load(min_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + at, mask=coded, other=0)
    else:  # fp16: the bf16 scales converted, then paired (a layout conversion a tile)
        pair_layout: gl.constexpr = gl.BlockedLayout([1, 2], [32, 1], [WARPS, 1], [1, 0])
        c = gl.arange(0, HEAD_DIM // 2, layout=gl.SliceLayout(1, pair_layout))
        e = gl.arange(0, 2, layout=gl.SliceLayout(0, pair_layout))
        channel = scales + block.to(gl.int64) * stride_sn + (2 * c[:, None] + e[None, :])
        scale2 = _pairs(gl.load(scale_ptr + channel, mask=coded, other=0.0), dtype, raw_layout)
        low2 = _pairs(gl.load(min_ptr + channel, mask=coded, other=0.0), dtype, raw_layout)
    return scale2, low2


@gluon.jit
def _tile_operands(
    block, coded, k_scale_ptr, v_scale_ptr, k_min_ptr, v_min_ptr, k_scales, v_scales, stride_ksn, stride_vsn,
    dtype: gl.constexpr, HEAD_DIM: gl.constexpr, QUANT: gl.constexpr,
):  # fmt: skip
    """What a code tile of block ``block`` needs from global memory besides its codes: fp8
    (``QUANT`` 1), the block's key and value scales (``[2]``, for ``mults``); int4 (2), the key
    scale and minimum pairs (``_key_operands``). Loaded before the producer waits for the
    tile's stage, so that their latency overlaps the consumers' work (``EARLY_OPERANDS``)."""
    if QUANT == 1:
        layout: gl.constexpr = _mults_layout(gl.num_warps())
        first = gl.arange(0, 2, layout=layout) == 0
        at = block.to(gl.int64)
        pair = gl.where(first, gl.load(k_scale_ptr + k_scales + at * stride_ksn, mask=coded, other=1.0),
                        gl.load(v_scale_ptr + v_scales + at * stride_vsn, mask=coded, other=1.0))  # fmt: skip
        return pair, pair
    elif QUANT == 2:
        return _key_operands(k_scale_ptr, k_min_ptr, k_scales, block, coded, stride_ksn, dtype, HEAD_DIM)
    else:
        return block, block  # the floor reads none


@gluon.jit
def _tile_reads(
    it, codes_end, table_ptr, k_scale_ptr, v_scale_ptr, k_min_ptr, v_min_ptr, k_scales, v_scales, stride_ksn,
    stride_vsn, dtype: gl.constexpr, HEAD_DIM: gl.constexpr, SUBS: gl.constexpr, QUANT: gl.constexpr,
):  # fmt: skip
    """Key tile ``it``'s block and ``_tile_operands`` (nothing read unless it is a code tile)."""
    coded = it < codes_end
    block = gl.load(table_ptr + it // SUBS, mask=coded, other=0).to(gl.int32)
    first, second = _tile_operands(block, coded, k_scale_ptr, v_scale_ptr, k_min_ptr, v_min_ptr, k_scales,
                                   v_scales, stride_ksn, stride_vsn, dtype, HEAD_DIM, QUANT)  # fmt: skip
    return block, first, second


@gluon.constexpr_function
def _passes(rows, per_pass, in_place):
    """``static_range`` bounds of the decode passes' first rows: in order, or (``in_place``)
    from the last rows back."""
    return (rows - per_pass, -per_pass, -per_pass) if in_place else (0, rows, per_pass)


@gluon.jit
def _decode_tile(codes_smem, out_smem, scale_ptr, min_ptr, scales, token, stride_sn, scale2, low2,
                 QUANT: gl.constexpr, IS_KEY: gl.constexpr, IN_PLACE: gl.constexpr = False):  # fmt: skip
    """A code tile (store rows from ``token``, within a whole block) into ``out_smem`` (the
    compute dtype), a pass of ``8 x warps`` rows at a time, with integer and paired
    half-precision operations, not conversions (Hopper converts at a quarter of the FMA rate:
    docs/memory.md). fp8 (``QUANT`` 1): the exact, unscaled code values (``_fp8_words``; the
    consumers apply the block's scales). int4 (2, a word at a time: ``_int4_words``): ``code *
    scale + minimum`` (keys per block and channel, paired once a tile; values per token) in one
    fused multiply-add of the compute dtype.
    ``scales``: the (batch, head) offset into the scale and minimum buffers; ``scale2``/``low2``
    an int4 key tile's operands (``_key_operands``), loaded by the caller. ``IN_PLACE``: the
    codes fill the first bytes of ``out_smem`` itself; passes run from the last rows to the
    first, each loading its codes before a barrier and storing after it (a pass's rows then
    overwrite only codes already read: checked byte by byte on the real layouts in
    ``tests/test_gluon_compile.py``)."""
    KV_N: gl.constexpr = out_smem.type.shape[0]
    HEAD_DIM: gl.constexpr = out_smem.type.shape[1]
    WARPS: gl.constexpr = gl.num_warps()
    ROWS: gl.constexpr = 8 * WARPS
    layout: gl.constexpr = _codes_layout(HEAD_DIM, WARPS)
    dtype: gl.constexpr = out_smem.dtype
    FIRST: gl.constexpr = _passes(KV_N, ROWS, IN_PLACE)[0]
    END: gl.constexpr = _passes(KV_N, ROWS, IN_PLACE)[1]
    STEP: gl.constexpr = _passes(KV_N, ROWS, IN_PLACE)[2]
    if QUANT == 3:
        # A floor, for the benchmark only (``FLOOR_COPY``): the code bytes widened into the stage
        # with no decoding (wrong values, the same shared-memory traffic as a decode).
        WIDTH: gl.constexpr = codes_smem.type.shape[1]
        raw_layout: gl.constexpr = gl.BlockedLayout(
            [1, 8], [32 // (WIDTH // 8), WIDTH // 8], [WARPS, 1], [1, 0]
        )
        for r in gl.static_range(0, KV_N, ROWS):
            x = codes_smem.slice(r, ROWS).load(raw_layout).to(gl.int16).to(dtype, bitcast=True)
            if WIDTH < HEAD_DIM:
                x = gl.reshape(gl.join(x, x), [ROWS, HEAD_DIM])
            out_smem.slice(r, ROWS).store(x)
    elif QUANT == 1:
        for r in gl.static_range(FIRST, END, STEP):
            x = codes_smem.slice(r, ROWS).load(layout)
            if IN_PLACE:
                _cta_barrier()
            out_smem.slice(r, ROWS).store(_fp8_words(x, dtype))
    elif QUANT == 2:
        # Scales and minimums in the compute dtype as int32 pairs (``_int4_words``' operands),
        # formed once a tile (keys, per channel: the caller's) or a pass (values, per token).
        raw_layout: gl.constexpr = _raw_layout(HEAD_DIM, WARPS)
        if IS_KEY:
            for r in gl.static_range(FIRST, END, STEP):
                raw = codes_smem.slice(r, ROWS).load(raw_layout)
                if IN_PLACE:
                    _cta_barrier()
                out_smem.slice(r, ROWS).store(_int4_words(raw, scale2[None, :], low2[None, :], dtype))
        else:
            for r in gl.static_range(FIRST, END, STEP):
                raw = codes_smem.slice(r, ROWS).load(raw_layout)
                tokens = token + r + gl.arange(0, ROWS, layout=gl.SliceLayout(1, raw_layout))
                at = scales + tokens.to(gl.int64) * stride_sn
                scale2 = _paired(gl.load(scale_ptr + at).to(dtype).to(gl.int16, bitcast=True))
                low2 = _paired(gl.load(min_ptr + at).to(dtype).to(gl.int16, bitcast=True))
                if IN_PLACE:
                    _cta_barrier()
                out_smem.slice(r, ROWS).store(_int4_words(raw, scale2[:, None], low2[:, None], dtype))


@gluon.jit
def _load_native(
    it, stage, k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, table_ptr, kv_row, kv_col, num_hist_tiles,
    history_len, native_from, BLOCK_SIZE: gl.constexpr,
):  # fmt: skip
    """Keys and values of native key tile ``it`` (a history block's, or the chunk's after the
    history's ``num_hist_tiles``) into stage ``stage``; token 0 of the descriptors' rows is
    history token ``native_from``."""
    KV_N: gl.constexpr = k_smem.type.shape[1]
    SUBS: gl.constexpr = BLOCK_SIZE // KV_N
    if it < num_hist_tiles:
        block = gl.load(table_ptr + it // SUBS).to(gl.int32)
        start = block * BLOCK_SIZE + (it % SUBS) * KV_N - native_from
    else:
        start = history_len - native_from + (it - num_hist_tiles) * KV_N
    mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
    _tma_load(k_desc, [kv_row + start, kv_col], k_ready.index(stage), k_smem.index(stage))
    mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
    _tma_load(v_desc, [kv_row + start, kv_col], v_ready.index(stage), v_smem.index(stage))


@gluon.jit
def _convert_tile(
    it, j, block, first, second, kc_smem, vc_smem, k_smem, v_smem, kc_ready, vc_ready, k_ready, v_ready,
    v_scale_ptr, v_min_ptr, v_scales, stride_vsn, mults, BLOCK_SIZE: gl.constexpr, QUANT: gl.constexpr,
    KEY_MMA8: gl.constexpr,
):  # fmt: skip
    """Code tile ``it`` (the ``j``-th of its part; of block ``block``, with ``_tile_operands``'
    ``first`` and ``second``) from its code stage into its stage of the ring (free: the caller
    waited), keys then values, each announced to the consumers once every thread's writes are
    visible to the tensor cores (async proxy). ``QUANT`` 1: the block's key and value scales go
    to the stage's ``mults`` before the keys are announced. ``KEY_MMA8``: values only (the
    caller's ``_load_key_codes`` brought the keys and their scales)."""
    STAGES: gl.constexpr = k_smem.type.shape[0]
    CSTAGES: gl.constexpr = vc_smem.type.shape[0]
    KV_N: gl.constexpr = k_smem.type.shape[1]
    SUBS: gl.constexpr = BLOCK_SIZE // KV_N
    stage = j % STAGES
    cstage = j % CSTAGES
    token = block * BLOCK_SIZE + (it % SUBS) * KV_N  # the tile's first row in the store
    if KEY_MMA8:
        pass
    else:
        if QUANT == 1:
            mults.index(stage).store(first)
        mbarrier.wait(kc_ready.index(cstage), (j // CSTAGES) & 1)
        # keys take their operands (``first``, ``second``) from the caller; the value pointers are unused
        _decode_tile(kc_smem.index(cstage), k_smem.index(stage), v_scale_ptr, v_min_ptr, v_scales, token,
                     stride_vsn, first, second, QUANT, True)  # fmt: skip
        fence_async_shared()
        _cta_barrier()
        mbarrier.arrive(k_ready.index(stage), count=1)
    mbarrier.wait(vc_ready.index(cstage), (j // CSTAGES) & 1)
    _decode_tile(vc_smem.index(cstage), v_smem.index(stage), v_scale_ptr, v_min_ptr, v_scales, token,
                 stride_vsn, first, second, QUANT, False)  # fmt: skip
    fence_async_shared()
    _cta_barrier()
    mbarrier.arrive(v_ready.index(stage), count=1)


@gluon.jit
def _load_codes(
    it, cstage, kc_desc, vc_desc, kc_smem, vc_smem, kc_ready, vc_ready, table_ptr, codes_row, codes_col,
    BLOCK_SIZE: gl.constexpr, KEY_MMA8: gl.constexpr,
):  # fmt: skip
    """The code bytes of key tile ``it`` (of a whole block) into code stage ``cstage``
    (``KEY_MMA8``: its values' only; ``_load_key_codes`` brings the keys)."""
    KV_N: gl.constexpr = vc_smem.type.shape[1]
    SUBS: gl.constexpr = BLOCK_SIZE // KV_N
    block = gl.load(table_ptr + it // SUBS).to(gl.int32)
    start = block * BLOCK_SIZE + (it % SUBS) * KV_N
    if KEY_MMA8:
        pass
    else:
        mbarrier.expect(kc_ready.index(cstage), kc_desc.block_type.nbytes)
        _tma_load(kc_desc, [codes_row + start, codes_col], kc_ready.index(cstage), kc_smem.index(cstage))
    mbarrier.expect(vc_ready.index(cstage), vc_desc.block_type.nbytes)
    _tma_load(vc_desc, [codes_row + start, codes_col], vc_ready.index(cstage), vc_smem.index(cstage))


@gluon.constexpr_function
def _codes_layout_smem(rows, head_dim):
    """Shared-memory layout of ``[rows, head_dim]`` one-byte codes as the host's TMA descriptors
    have it (``_smem_layout``), for the tensor cores (e4m3 keys) or the decoder (value bytes)."""
    return gl.NVMMASharedLayout.get_default_for([rows, head_dim], gl.float8e4nv)


@gluon.jit
def _as_codes(stage, dtype: gl.constexpr, WIDTH: gl.constexpr = 0):
    """A stage's shared memory read as ``[rows, WIDTH]`` one-byte codes of ``dtype`` (0: the
    stage's head_dim; int4 codes are half as wide): they fill its first bytes. The method's name
    differs between tritons."""
    ROWS: gl.constexpr = stage.type.shape[0]
    COLS: gl.constexpr = WIDTH if WIDTH else stage.type.shape[1]
    layout: gl.constexpr = _codes_layout_smem(ROWS, COLS)
    if _NEW_REINTERPRET:
        return stage.reinterpret(dtype, [ROWS, COLS], layout)
    else:
        return stage._reinterpret(dtype, [ROWS, COLS], layout)


@gluon.jit
def _load_key_codes(it, stage, block, first, kc_desc, k_smem, k_ready, codes_row, codes_col, mults,
                    BLOCK_SIZE: gl.constexpr):  # fmt: skip
    """``KEY_MMA8``: code tile ``it``'s key codes (of block ``block``) by TMA into its stage of
    the ring (free: the caller waited), where the consumers read them as e4m3 operands (the
    first half of the stage's bytes), and the block's key and value scales (``first``) into the
    stage's ``mults``, written by every producer thread before the one that arms the stage's
    barrier (its arrival releases them to the consumers' wait)."""
    mults.index(stage).store(first)
    _cta_barrier()
    _codes_into_stage(it, stage, block, kc_desc, k_smem, k_ready, codes_row, codes_col, BLOCK_SIZE)


@gluon.jit
def _codes_into_stage(it, j, block, codes_desc, smem, codes_ready, codes_row, codes_col,
                      BLOCK_SIZE: gl.constexpr):  # fmt: skip
    """``IN_PLACE``: code tile ``it``'s bytes (of block ``block``; keys or values, as
    ``codes_desc`` reads them) by TMA into the first bytes of its stage of ``smem`` (free: the
    caller waited), announced on the stage's ``codes_ready`` barrier."""
    STAGES: gl.constexpr = smem.type.shape[0]
    KV_N: gl.constexpr = smem.type.shape[1]
    SUBS: gl.constexpr = BLOCK_SIZE // KV_N
    stage = j % STAGES
    codes = _as_codes(smem.index(stage), codes_desc.dtype, codes_desc.block_type.shape[1])
    mbarrier.expect(codes_ready.index(stage), codes_desc.block_type.nbytes)
    _tma_load(codes_desc, [codes_row + block * BLOCK_SIZE + (it % SUBS) * KV_N, codes_col],
              codes_ready.index(stage), codes)  # fmt: skip


@gluon.jit
def _decode_in_place(
    it, j, block, codes_desc, smem, codes_ready, ready, scale_ptr, min_ptr, scales, stride_sn, scale2, low2,
    BLOCK_SIZE: gl.constexpr, QUANT: gl.constexpr, IS_KEY: gl.constexpr,
):  # fmt: skip
    """``IN_PLACE``: the codes ``_codes_into_stage`` brought, decoded where they lie
    (``_decode_tile``'s in-place order) and announced on ``ready``."""
    STAGES: gl.constexpr = smem.type.shape[0]
    KV_N: gl.constexpr = smem.type.shape[1]
    SUBS: gl.constexpr = BLOCK_SIZE // KV_N
    stage = j % STAGES
    out = smem.index(stage)
    codes = _as_codes(out, codes_desc.dtype, codes_desc.block_type.shape[1])
    # code tiles come first in a part: every earlier use of this stage was a code tile's
    mbarrier.wait(codes_ready.index(stage), (j // STAGES) & 1)
    token = block * BLOCK_SIZE + (it % SUBS) * KV_N
    _decode_tile(codes, out, scale_ptr, min_ptr, scales, token, stride_sn, scale2, low2, QUANT, IS_KEY, True)
    fence_async_shared()
    _cta_barrier()
    mbarrier.arrive(ready.index(stage), count=1)


@gluon.jit
def _produce_partition(
    q_desc, k_desc, v_desc, kc_desc, vc_desc, q_smem, k_smem, v_smem, kc_smem, vc_smem,
    q_bar, k_ready, v_ready, kv_empty, kc_ready, vc_ready,
    table_ptr, q_row, q_col, kv_row, kv_col, codes_row, codes_col, num_hist_tiles, codes_end,
    it_begin, it_end, history_len, native_from,
    k_scale_ptr, v_scale_ptr, k_min_ptr, v_min_ptr, k_scales, v_scales, stride_ksn, stride_vsn, mults,
    BLOCK_SIZE: gl.constexpr, QUANT: gl.constexpr, EARLY: gl.constexpr, KEY_MMA8: gl.constexpr,
    IN_PLACE: gl.constexpr,
):  # fmt: skip
    """The third warpgroup: a native history's loader warp (``_load_partition``), or a
    quantized history's producer, the loader's work and the converter's in one partition, so
    that the kernel keeps three warpgroups and the consumers their registers. Code tiles are
    loaded ``CSTAGES`` ahead (a code stage is reused once its tile is converted: the same warps,
    no barrier to wait on) and converted into the stage ring in order; native tiles are loaded
    into it as the loader does."""
    if QUANT == 0:
        _load_partition(
            q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
            table_ptr, q_row, q_col, kv_row, kv_col, num_hist_tiles, it_begin, it_end, history_len,
            BLOCK_SIZE,
        )  # fmt: skip
        return
    STAGES: gl.constexpr = k_smem.type.shape[0]
    _load_queries(q_desc, q_smem, q_bar, q_row, q_col, it_end > it_begin)
    CSTAGES: gl.constexpr = vc_smem.type.shape[0]
    for c in gl.static_range(0 if IN_PLACE else CSTAGES):  # IN_PLACE: no code ring to fill ahead
        if it_begin + c < codes_end:
            _load_codes(it_begin + c, c, kc_desc, vc_desc, kc_smem, vc_smem, kc_ready, vc_ready, table_ptr,
                        codes_row, codes_col, BLOCK_SIZE, KEY_MMA8)  # fmt: skip
    SUBS: gl.constexpr = BLOCK_SIZE // k_smem.type.shape[1]
    dtype: gl.constexpr = k_smem.dtype
    HEAD_DIM: gl.constexpr = k_smem.type.shape[2]
    for it in range(it_begin, it_end):
        j = it - it_begin
        stage = j % STAGES
        # The tile's global reads (table entry, then scales) before the wait for its stage
        # (``EARLY``): their latency overlaps the consumers' work. (One call after an optional
        # wait compiles to other SASS than the measured kernel: both orders are spelled out.)
        if EARLY:
            block, first, second = _tile_reads(
                it, codes_end, table_ptr, k_scale_ptr, v_scale_ptr, k_min_ptr, v_min_ptr, k_scales, v_scales,
                stride_ksn, stride_vsn, dtype, HEAD_DIM, SUBS, QUANT,
            )  # fmt: skip
            mbarrier.wait(kv_empty.index(stage), ((j // STAGES) & 1) ^ 1)
        else:
            mbarrier.wait(kv_empty.index(stage), ((j // STAGES) & 1) ^ 1)
            block, first, second = _tile_reads(
                it, codes_end, table_ptr, k_scale_ptr, v_scale_ptr, k_min_ptr, v_min_ptr, k_scales, v_scales,
                stride_ksn, stride_vsn, dtype, HEAD_DIM, SUBS, QUANT,
            )  # fmt: skip
        if it < codes_end:
            if KEY_MMA8:
                _load_key_codes(it, stage, block, first, kc_desc, k_smem, k_ready, codes_row, codes_col,
                                mults, BLOCK_SIZE)  # fmt: skip
            elif IN_PLACE:  # int4: both halves, their bytes in flight together
                _codes_into_stage(it, j, block, kc_desc, k_smem, kc_ready, codes_row, codes_col, BLOCK_SIZE)
            if IN_PLACE:
                _codes_into_stage(it, j, block, vc_desc, v_smem, vc_ready, codes_row, codes_col, BLOCK_SIZE)
                if KEY_MMA8:
                    pass
                else:
                    _decode_in_place(it, j, block, kc_desc, k_smem, kc_ready, k_ready, k_scale_ptr,
                                     k_min_ptr, k_scales, stride_ksn, first, second, BLOCK_SIZE, QUANT,
                                     True)  # fmt: skip
                _decode_in_place(it, j, block, vc_desc, v_smem, vc_ready, v_ready, v_scale_ptr, v_min_ptr,
                                 v_scales, stride_vsn, first, second, BLOCK_SIZE, QUANT, False)  # fmt: skip
            else:
                _convert_tile(
                    it, j, block, first, second, kc_smem, vc_smem, k_smem, v_smem, kc_ready, vc_ready,
                    k_ready, v_ready, v_scale_ptr, v_min_ptr, v_scales, stride_vsn, mults, BLOCK_SIZE, QUANT,
                    KEY_MMA8,
                )  # fmt: skip
                # Its fence ordered this code stage's reads before the TMA that refills it.
                if it + CSTAGES < codes_end:
                    _load_codes(it + CSTAGES, j % CSTAGES, kc_desc, vc_desc, kc_smem, vc_smem, kc_ready,
                                vc_ready, table_ptr, codes_row, codes_col, BLOCK_SIZE, KEY_MMA8)  # fmt: skip
        else:
            _load_native(it, stage, k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, table_ptr, kv_row,
                         kv_col, num_hist_tiles, history_len, native_from, BLOCK_SIZE)  # fmt: skip


@gluon.jit
def _tile_limit(it, num_hist_tiles, last_block_tile, hist_end, chunk_end, KV_N: gl.constexpr):
    """Valid keys of key tile ``it``: ``KV_N`` except in the last history block and the chunk's
    last tile (the table is ascending, so only its last block can be partial). ``hist_end`` and
    ``chunk_end`` are their ends counted in key-tile positions (``it * KV_N``)."""
    end = it * KV_N + KV_N
    if it >= num_hist_tiles:
        end = chunk_end
    elif it >= last_block_tile:
        end = hist_end
    return gl.minimum(end - it * KV_N, KV_N)


@gluon.constexpr_function
def _wgmma_layout(n, k=16):
    """Accumulator layout of one warpgroup's ``[64, n]`` wgmma tile (``k``: the instruction's
    depth, 32 for e4m3 operands; the registers hold the same elements either way)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, k])


@gluon.constexpr_function
def _mults_layout(warps):
    """Registers of a stage's two block scales (``mults``)."""
    return gl.BlockedLayout([2], [32], [warps], [0])  # both in every thread: no shuffles


@gluon.jit
def _tile_mults(mults, stage, coded, qk_scale, QUANT: gl.constexpr):
    """The score factor of a key tile and, for its probabilities, the value scale's log2 and
    inverse: with ``QUANT`` 1 a code tile's (``coded``) block scales from ``mults`` (the stage's
    key and value scale, written before its keys were announced), else 1."""
    if QUANT == 1:
        layout: gl.constexpr = _mults_layout(gl.num_warps())
        pair = mults.index(stage).load(layout)
        first = gl.arange(0, 2, layout=layout) == 0
        k_mult = gl.where(coded, gl.sum(gl.where(first, pair, 0.0), 0), 1.0)
        v_mult = gl.where(coded, gl.sum(gl.where(first, 0.0, pair), 0), 1.0)
        return qk_scale * k_mult, gl.log2(v_mult), 1.0 / v_mult
    else:
        return qk_scale, 0.0, 1.0


@gluon.jit
def _fp8_rows(q):
    """A warpgroup's queries ``q`` (shared memory) as e4m3 with one scale a row (``amax / 448``;
    ``quantized_attention.fp8_queries`` is the twin), and the scales. Loaded in an accumulator
    layout: its rows are the scores', so the scales need no shuffle."""
    x = q.load(_wgmma_layout(q.type.shape[1])).to(gl.float32)
    amax = gl.max(gl.abs(x), 1)
    amax = gl.where(amax > 0, amax, 448.0)  # an all-zero row (padding): scale 1
    return (x * (448.0 / amax)[:, None]).to(gl.float8e4nv), amax * (1.0 / 448.0)


@gluon.jit
def _fp8_queries(q, q8, s_layout: gl.constexpr):
    """``KEY_MMA8``: ``_fp8_rows`` into ``q8`` (shared memory), visible to the tensor cores;
    returns the rows' scales in the scores' row layout."""
    x8, scale = _fp8_rows(q)
    q8.store(x8)
    fence_async_shared()
    _cta_barrier()
    return gl.convert_layout(scale, gl.SliceLayout(1, s_layout))


@gluon.jit
def _fp8_query_operand(q, s_layout: gl.constexpr, KV_N: gl.constexpr):
    """``IN_PLACE``: ``_fp8_rows`` as the registers of an e4m3 wgmma's first operand (16 a
    thread: no shared memory), and the rows' scales in the scores' row layout."""
    x8, scale = _fp8_rows(q)
    operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=_wgmma_layout(KV_N, 32), k_width=4)
    return gl.convert_layout(x8, operand), gl.convert_layout(scale, gl.SliceLayout(1, s_layout))


@gluon.jit
def _keys_operand(k_smem, stage, CODES: gl.constexpr):
    """Stage ``stage``'s keys as the tensor cores read them: ``CODES``, the first half of its
    bytes as e4m3 codes (``_load_key_codes``); else as stored."""
    keys = _as_codes(k_smem.index(stage), gl.float8e4nv) if CODES else k_smem.index(stage)
    return keys.permute((1, 0))


@gluon.jit
def _rows(s, qk, PER_ROW: gl.constexpr):
    """Scores times ``qk``: a scalar, or (``PER_ROW``) one factor a query row."""
    if PER_ROW:
        return s * qk[:, None]
    else:
        return s * qk


@gluon.jit
def _attend_step(
    j, q, k_smem, v_smem, k_ready, v_ready, kv_empty, mults, m_i, l_i, acc, p_op, cols, s_zero,
    num_hist_tiles, it_begin, last_block_tile, hist_end, chunk_end, qk_scale, q_rows, codes_end,
    QUANT: gl.constexpr, CODES: gl.constexpr, KEY_MMA8: gl.constexpr,
):  # fmt: skip
    """Key tile ``j`` of the part (``j >= 1``): its scores, issued while tile ``j - 1``'s PV runs,
    then its online-softmax update; returns ``(m_i, l_i, acc, p_op)``. ``CODES`` (``KEY_MMA8``
    only): an fp8 code tile, whose keys ``q`` (e4m3) multiplies as stored, its scores scaled by
    ``q_rows`` a row."""
    STAGES: gl.constexpr = k_smem.type.shape[0]
    KV_N: gl.constexpr = k_smem.type.shape[1]
    HALF: gl.constexpr = acc.type.shape[0]
    s_layout: gl.constexpr = _wgmma_layout(KV_N)
    o_rows: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
    p_layout: gl.constexpr = p_op.type.layout
    dtype: gl.constexpr = v_smem.dtype
    if CODES:
        s_zero = gl.zeros([HALF, KV_N], gl.float32, _wgmma_layout(KV_N, 32))
    stage = j % STAGES
    prev = (j - 1) % STAGES
    mbarrier.wait(k_ready.index(stage), (j // STAGES) & 1)
    s_tok = warpgroup_mma(q, _keys_operand(k_smem, stage, CODES), s_zero, use_acc=False, is_async=True)
    mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
    acc_tok = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
    qk, v_log2, v_inv = _tile_mults(mults, stage, it_begin + j < codes_end, qk_scale, QUANT)
    if CODES:
        qk = qk * q_rows
    # The scores are ready while the previous tile's PV still runs (wgmma groups retire in order).
    s = gl.convert_layout(warpgroup_mma_wait(1, deps=(s_tok,)), s_layout)
    limit = _tile_limit(it_begin + j, num_hist_tiles, last_block_tile, hist_end, chunk_end, KV_N)
    if limit < KV_N:
        s = gl.where(cols[None, :] < limit, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk)
    alpha = gl.exp2(m_i - m_new)
    if QUANT == 1:
        p = gl.exp2(_rows(s, qk, CODES) - (m_new - v_log2)[:, None])
        l_i = l_i * alpha + gl.sum(p, 1) * v_inv
    else:
        p = gl.exp2(s * qk - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
    m_i = m_new
    acc, p_op = warpgroup_mma_wait(0, deps=(acc_tok, p_op))
    mbarrier.arrive(kv_empty.index(prev), count=1)
    acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    return m_i, l_i, acc, p_op


@gluon.jit
def _attend_tiles(
    q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
    num_hist_tiles, it_begin, it_end, last_block_tile, hist_end, chunk_end, qk_scale, mults, codes_end,
    q8_smem, WG: gl.constexpr, QUANT: gl.constexpr, KEY_MMA8: gl.constexpr, IN_PLACE: gl.constexpr,
):  # fmt: skip
    """``(m, l, acc)`` of one warpgroup's 64 query rows over key tiles ``[it_begin, it_end)``
    (not empty): scores in base 2, ``acc`` unnormalized. ``QUANT`` 1: code tiles (before
    ``codes_end``) hold unscaled fp8 values; their block's key and value scales, left by the
    producer in ``mults`` beside the stage, multiply the scores and the probabilities
    (``_tile_mults``). ``KEY_MMA8``: a code tile's keys are e4m3 codes, multiplied by the
    queries in e4m3 (``_fp8_queries``, into ``q8_smem``; with ``IN_PLACE`` kept in registers,
    ``_fp8_query_operand``); the code tiles come first in a part, so they take a loop of their own."""
    STAGES: gl.constexpr = k_smem.type.shape[0]
    KV_N: gl.constexpr = k_smem.type.shape[1]
    HEAD_DIM: gl.constexpr = k_smem.type.shape[2]
    HALF: gl.constexpr = q_smem.type.shape[1]
    s_layout: gl.constexpr = _wgmma_layout(KV_N)
    o_layout: gl.constexpr = _wgmma_layout(HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    dtype: gl.constexpr = k_smem.dtype
    cols = gl.arange(0, KV_N, layout=gl.SliceLayout(0, s_layout))
    s_zero = gl.zeros([HALF, KV_N], gl.float32, s_layout)

    mbarrier.wait(q_bar, 0)
    q = q_smem.index(WG)
    if KEY_MMA8:
        if IN_PLACE:
            q8, q_rows = _fp8_query_operand(q, s_layout, KV_N)
        else:
            q8 = q8_smem.index(WG)
            q_rows = _fp8_queries(q, q8, s_layout)
    else:  # unused stand-ins
        q8 = q
        q_rows = qk_scale

    # The first key tile, peeled: it starts the running max. A finite floor keeps rows whose
    # tiles so far were all masked (a split part can start on an empty sub-tile) free of inf - inf.
    mbarrier.wait(k_ready.index(0), 0)
    if KEY_MMA8:
        coded = it_begin < codes_end
        if coded:
            s8_zero = gl.zeros([HALF, KV_N], gl.float32, _wgmma_layout(KV_N, 32))
            s8 = warpgroup_mma(q8, _keys_operand(k_smem, 0, True), s8_zero, use_acc=False)
            s = gl.convert_layout(s8, s_layout)
        else:
            s = warpgroup_mma(q, _keys_operand(k_smem, 0, False), s_zero, use_acc=False)
        qk, v_log2, v_inv = _tile_mults(mults, 0, coded, qk_scale, QUANT)
        qk = qk * gl.where(coded, q_rows, 1.0)
    else:
        s_tok = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        qk, v_log2, v_inv = _tile_mults(mults, 0, it_begin < codes_end, qk_scale, QUANT)
        s = warpgroup_mma_wait(0, deps=(s_tok,))
    limit = _tile_limit(it_begin, num_hist_tiles, last_block_tile, hist_end, chunk_end, KV_N)
    if limit < KV_N:
        s = gl.where(cols[None, :] < limit, s, float("-inf"))
    m_i = gl.maximum(gl.max(s, 1) * qk, -1.0e30)
    if QUANT == 1:  # p times the value scale, its sum without
        p = gl.exp2(_rows(s, qk, KEY_MMA8) - (m_i - v_log2)[:, None])
        l_i = gl.sum(p, 1) * v_inv
    else:
        p = gl.exp2(s * qk - m_i[:, None])
        l_i = gl.sum(p, 1)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    acc = gl.zeros([HALF, HEAD_DIM], gl.float32, o_layout)

    n = it_end - it_begin
    if KEY_MMA8:
        coded_end = gl.maximum(gl.minimum(codes_end - it_begin, n), 1)
        for j in range(1, coded_end):
            m_i, l_i, acc, p_op = _attend_step(
                j, q8, k_smem, v_smem, k_ready, v_ready, kv_empty, mults, m_i, l_i, acc, p_op, cols, s_zero,
                num_hist_tiles, it_begin, last_block_tile, hist_end, chunk_end, qk_scale, q_rows, codes_end,
                QUANT, True, KEY_MMA8,
            )  # fmt: skip
        for j in range(coded_end, n):
            m_i, l_i, acc, p_op = _attend_step(
                j, q, k_smem, v_smem, k_ready, v_ready, kv_empty, mults, m_i, l_i, acc, p_op, cols, s_zero,
                num_hist_tiles, it_begin, last_block_tile, hist_end, chunk_end, qk_scale, q_rows, codes_end,
                QUANT, False, KEY_MMA8,
            )  # fmt: skip
    else:
        for j in range(1, n):
            m_i, l_i, acc, p_op = _attend_step(
                j, q, k_smem, v_smem, k_ready, v_ready, kv_empty, mults, m_i, l_i, acc, p_op, cols, s_zero,
                num_hist_tiles, it_begin, last_block_tile, hist_end, chunk_end, qk_scale, q_rows, codes_end,
                QUANT, False, KEY_MMA8,
            )  # fmt: skip

    last = (n - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((n - 1) // STAGES) & 1)
    acc_tok = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc_tok,))
    mbarrier.arrive(kv_empty.index(last), count=1)
    return m_i, l_i, acc


@gluon.jit
def _consume(
    q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
    out_row_ptr, lse_row_ptr, handoff_ptr, flags_ptr, q_len, rows_start, split_part, part, last_part,
    num_hist_tiles, it_begin, it_end, last_block_tile, hist_end, chunk_end, qk_scale, mults, codes_end,
    stride_ol, q8_smem, WG: gl.constexpr, WRITE_LSE: gl.constexpr, QUANT: gl.constexpr,
    KEY_MMA8: gl.constexpr, IN_PLACE: gl.constexpr,
):  # fmt: skip
    """One warpgroup: online softmax of its 64 query rows over key tiles ``[it_begin, it_end)``,
    merged with the earlier part of a split tile, if any, then written out."""
    KV_N: gl.constexpr = k_smem.type.shape[1]
    HEAD_DIM: gl.constexpr = k_smem.type.shape[2]
    HALF: gl.constexpr = q_smem.type.shape[1]
    s_layout: gl.constexpr = _wgmma_layout(KV_N)
    o_layout: gl.constexpr = _wgmma_layout(HEAD_DIM)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    if it_end > it_begin:
        m_i, l_i, acc = _attend_tiles(
            q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
            num_hist_tiles, it_begin, it_end, last_block_tile, hist_end, chunk_end, qk_scale, mults,
            codes_end, q8_smem, WG, QUANT, KEY_MMA8, IN_PLACE,
        )  # fmt: skip
    else:  # an empty part of a split tile (fewer key tiles than parts) adds nothing
        m_i = gl.full([HALF], -1.0e30, gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([HALF], gl.float32, gl.SliceLayout(1, s_layout))
        acc = gl.zeros([HALF, HEAD_DIM], gl.float32, o_layout)

    m_o = gl.convert_layout(m_i, o_rows)
    l_o = gl.convert_layout(l_i, o_rows)
    rows = rows_start + WG * HALF + gl.arange(0, HALF, layout=o_rows)
    dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    ptrs = out_row_ptr + rows[:, None].to(gl.int64) * stride_ol + dims[None, :]
    row_ok = (rows < q_len)[:, None]
    # This warpgroup's rows of a split tile: merge part - 1's normalized output (left in `out`)
    # and its (m, l) (in `handoff`); each warpgroup waits only on the same rows' flag.
    if part > 0:
        # Every thread polls (an atomic's result would reach only the thread that ran it); the
        # flag never goes back to 0 within a call.
        while gl.load(flags_ptr + (split_part - 1) * 2 + WG, volatile=True) != 1:
            pass
        _cta_barrier()
        handoff = (
            handoff_ptr
            + (split_part - 1).to(gl.int64) * 4 * HALF
            + WG * 2 * HALF
            + gl.arange(0, HALF, layout=o_rows)
        )
        prev_m = gl.load(handoff, cache_modifier=".cg")
        prev_l = gl.load(handoff + HALF, cache_modifier=".cg")
        prev_out = gl.load(ptrs, mask=row_ok, other=0.0, cache_modifier=".cg").to(gl.float32)
        m_new = gl.maximum(m_o, prev_m)
        alpha = gl.exp2(m_o - m_new)
        prev_weight = prev_l * gl.exp2(prev_m - m_new)
        acc = acc * alpha[:, None] + prev_out * prev_weight[:, None]
        l_o = l_o * alpha + prev_weight
        m_o = m_new
    out = acc / gl.where(l_o > 0, l_o, 1.0)[:, None]
    gl.store(ptrs, out.to(out_row_ptr.dtype.element_ty), mask=row_ok)
    if part < last_part:
        handoff = (
            handoff_ptr
            + split_part.to(gl.int64) * 4 * HALF
            + WG * 2 * HALF
            + gl.arange(0, HALF, layout=o_rows)
        )
        gl.store(handoff, m_o)
        gl.store(handoff + HALF, l_o)
        _cta_barrier()  # every thread's stores before the release (CUTLASS's pattern)
        gl.atomic_xchg(flags_ptr + split_part * 2 + WG, 1, sem="release")
    elif WRITE_LSE:
        # Natural-log LSE from the base-2 running max and sum.
        lse = (m_o + gl.log2(l_o)) * 0.6931471805599453
        gl.store(lse_row_ptr + rows, lse, mask=rows < q_len)


@gluon.jit
def _consume_worker(
    q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
    out_row_ptr, lse_row_ptr, handoff_ptr, flags_ptr, q_len, rows_start, split_part, part, last_part,
    num_hist_tiles, it_begin, it_end, last_block_tile, hist_end, chunk_end, qk_scale, mults, codes_end,
    stride_ol, q8_smem, WRITE_LSE: gl.constexpr, QUANT: gl.constexpr, KEY_MMA8: gl.constexpr,
    IN_PLACE: gl.constexpr,
):  # fmt: skip
    _consume(
        q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
        out_row_ptr, lse_row_ptr, handoff_ptr, flags_ptr, q_len, rows_start, split_part, part, last_part,
        num_hist_tiles, it_begin, it_end, last_block_tile, hist_end, chunk_end, qk_scale, mults, codes_end,
        stride_ol, q8_smem, 1, WRITE_LSE, QUANT, KEY_MMA8, IN_PLACE,
    )  # fmt: skip


# A `splits` of 1 specialized to a constant folds the split bookkeeping into constants that
# triton 3.6 fails to lower into the partitions (an assertion in ConvertTritonGPUToLLVM).
@gluon.jit(do_not_specialize=["num_whole_tiles", "splits"])
def _hopper_attention_kernel(
    q_desc, k_desc, v_desc, out_ptr, lse_ptr, block_idx_ptr, num_blocks_ptr, history_len_ptr,
    sync_ptr, tickets_ptr, handoff_ptr,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
    stride_ob, stride_oh, stride_ol,
    num_q_heads, heads_per_kv, q_len, chunk_len, table_width, qk_scale, num_q_tiles,
    num_whole_tiles, splits,
    kc_desc, vc_desc, k_scale_ptr, v_scale_ptr, k_min_ptr, v_min_ptr,
    stride_cb, stride_ch, stride_cl, stride_ksb, stride_ksh, stride_ksn, stride_vsb, stride_vsh, stride_vsn,
    BLOCK_SIZE: gl.constexpr, STAGES: gl.constexpr, WRITE_LSE: gl.constexpr,
    QUANT: gl.constexpr = 0, CSTAGES: gl.constexpr = 2, THIRD_WARPS: gl.constexpr = 1,
    WORKER_REGS: gl.constexpr = 232, THIRD_REGS: gl.constexpr = 40, EARLY: gl.constexpr = True,
    KEY_MMA8: gl.constexpr = False, IN_PLACE: gl.constexpr = False,
):  # fmt: skip
    HALF: gl.constexpr = q_desc.block_type.shape[0]
    KV_N: gl.constexpr = k_desc.block_type.shape[0]
    HEAD_DIM: gl.constexpr = k_desc.block_type.shape[1]
    SUBS: gl.constexpr = BLOCK_SIZE // KV_N
    # Tiles are (batch, query head, query tile), query tile fastest. The first
    # `num_whole_tiles` programs run one whole tile each; the tiles of the last, partly filled
    # wave are cut into `splits` equal ranges of key tiles, one program each, so that the wave
    # fills the GPU. Program ids come from a ticket in launch order: a part waits only on the
    # part before it, a smaller id, started by then, so the waits cannot deadlock.
    ticket = gl.atomic_add(sync_ptr, 1)
    # One thread ran the atomic and holds the ticket: publish it to the others through memory.
    gl.store(tickets_ptr + gl.program_id(0), ticket)
    _cta_barrier()
    program = gl.load(tickets_ptr + gl.program_id(0), volatile=True)
    split_part = program - num_whole_tiles  # >= 0: which part of a split tile
    part = gl.where(split_part < 0, 0, split_part % splits)
    last_part = gl.where(split_part < 0, 0, splits - 1)
    tile = gl.where(split_part < 0, program, num_whole_tiles + split_part // splits)
    batch_head = tile // num_q_tiles
    q_tile = tile % num_q_tiles
    batch = batch_head // num_q_heads
    head = batch_head % num_q_heads
    kv_head = head // heads_per_kv
    num_kv_heads = num_q_heads // heads_per_kv

    table_row = batch * num_kv_heads + kv_head
    table_ptr = block_idx_ptr + table_row.to(gl.int64) * table_width
    num_tile_blocks = gl.load(num_blocks_ptr + table_row).to(gl.int32)
    history_len = gl.load(history_len_ptr).to(gl.int32)
    num_hist_tiles = num_tile_blocks * SUBS
    num_iters = num_hist_tiles + gl.cdiv(chunk_len, KV_N)
    it_begin = part * num_iters // splits
    it_end = gl.where(split_part < 0, num_iters, (part + 1) * num_iters // splits)
    # Ends of the partial tiles in key-tile positions (tile `it` holds positions
    # [it * KV_N, it * KV_N + KV_N)): the history's last block, then the chunk.
    last_block = gl.load(table_ptr + gl.maximum(num_tile_blocks - 1, 0)).to(gl.int32)
    last_block_tile = num_hist_tiles - SUBS
    hist_end = history_len - last_block * BLOCK_SIZE + last_block_tile * KV_N
    chunk_end = num_hist_tiles * KV_N + chunk_len

    # Row of the 2-D TMA views (rows of `stride_l` elements) where this head's tokens start.
    q_off = batch.to(gl.int64) * stride_qb + head.to(gl.int64) * stride_qh
    kv_off = batch.to(gl.int64) * stride_kb + kv_head.to(gl.int64) * stride_kh
    rows_start = q_tile * (2 * HALF)
    q_row = (q_off // stride_ql).to(gl.int32) + rows_start
    q_col = (q_off % stride_ql).to(gl.int32)
    kv_row = (kv_off // stride_kl).to(gl.int32)
    kv_col = (kv_off % stride_kl).to(gl.int32)
    out_row_ptr = out_ptr + batch.to(gl.int64) * stride_ob + head.to(gl.int64) * stride_oh
    lse_row_ptr = lse_ptr + batch_head.to(gl.int64) * q_len
    flags_ptr = sync_ptr + 1

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, HALF, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, KV_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, KV_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    # fp8 code tiles (QUANT 1): each stage's block scales, key and value, from producer to consumers
    mults = gl.allocate_shared_memory(gl.float32, [STAGES, 2], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)  # one arrival per consumer warpgroup

    if QUANT:
        # Whole blocks arrive as code bytes into a ring of their own; the producer dequantizes
        # them into the stage ring, so the consumers run unchanged. The tail (the partial block
        # and the chunk, native) starts at history token `native_from`.
        native_from = history_len // BLOCK_SIZE * BLOCK_SIZE
        partial = (num_tile_blocks > 0) & (last_block * BLOCK_SIZE >= native_from)
        codes_end = gl.minimum(it_end, num_hist_tiles - gl.where(partial, SUBS, 0))
        c_off = batch.to(gl.int64) * stride_cb + kv_head.to(gl.int64) * stride_ch
        codes_row = (c_off // stride_cl).to(gl.int32)
        codes_col = (c_off % stride_cl).to(gl.int32)
        k_scales = batch.to(gl.int64) * stride_ksb + kv_head.to(gl.int64) * stride_ksh
        v_scales = batch.to(gl.int64) * stride_vsb + kv_head.to(gl.int64) * stride_vsh
        if IN_PLACE:
            # No code ring: both halves of a code tile arrive in their stage (``_load_key_codes``,
            # ``_decode_values_in_place``), the e4m3 queries stay in registers; a barrier a stage
            # for the value bytes' arrival.
            q8_smem = q_smem
            kc_smem = v_smem
            vc_smem = v_smem
        elif KEY_MMA8:
            # Key codes go straight into the stage ring (``_load_key_codes``); the consumers'
            # queries in e4m3 take the key code ring's place in shared memory.
            q8_smem = gl.allocate_shared_memory(kc_desc.dtype, [2, HALF, HEAD_DIM], kc_desc.layout)
            kc_smem = gl.allocate_shared_memory(vc_desc.dtype, [CSTAGES, KV_N, vc_desc.block_type.shape[1]],
                                                vc_desc.layout)  # fmt: skip
            vc_smem = kc_smem
        else:
            q8_smem = q_smem
            kc_smem = gl.allocate_shared_memory(kc_desc.dtype, [CSTAGES, KV_N, kc_desc.block_type.shape[1]],
                                                kc_desc.layout)  # fmt: skip
            vc_smem = gl.allocate_shared_memory(vc_desc.dtype, [CSTAGES, KV_N, vc_desc.block_type.shape[1]],
                                                vc_desc.layout)  # fmt: skip
        BARRIERS: gl.constexpr = STAGES if IN_PLACE else CSTAGES  # a stage's, or a code stage's
        kc_ready = gl.allocate_shared_memory(gl.int64, [BARRIERS, 1], mbarrier.MBarrierLayout())
        vc_ready = gl.allocate_shared_memory(gl.int64, [BARRIERS, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(BARRIERS):
            mbarrier.init(kc_ready.index(i), count=1)
            mbarrier.init(vc_ready.index(i), count=1)
    else:  # unused stand-ins: no code tiles
        native_from = 0
        codes_end = it_begin
        codes_row = 0
        codes_col = 0
        k_scales = batch.to(gl.int64)
        v_scales = k_scales
        kc_smem = k_smem
        vc_smem = v_smem
        kc_ready = k_ready
        vc_ready = v_ready
        q8_smem = q_smem

    gl.warp_specialize(
        [
            (
                _consume,
                (
                    q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
                    out_row_ptr, lse_row_ptr, handoff_ptr, flags_ptr, q_len, rows_start, split_part, part,
                    last_part, num_hist_tiles, it_begin, it_end, last_block_tile, hist_end, chunk_end,
                    qk_scale, mults, codes_end, stride_ol, q8_smem, 0, WRITE_LSE, QUANT, KEY_MMA8, IN_PLACE,
                ),
            ),
            (
                _consume_worker,
                (
                    q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
                    out_row_ptr, lse_row_ptr, handoff_ptr, flags_ptr, q_len, rows_start, split_part, part,
                    last_part, num_hist_tiles, it_begin, it_end, last_block_tile, hist_end, chunk_end,
                    qk_scale, mults, codes_end, stride_ol, q8_smem, WRITE_LSE, QUANT, KEY_MMA8, IN_PLACE,
                ),
            ),
            (
                _produce_partition,
                (
                    q_desc, k_desc, v_desc, kc_desc, vc_desc, q_smem, k_smem, v_smem, kc_smem, vc_smem,
                    q_bar, k_ready, v_ready, kv_empty, kc_ready, vc_ready,
                    table_ptr, q_row, q_col, kv_row, kv_col, codes_row, codes_col, num_hist_tiles,
                    codes_end, it_begin, it_end, history_len, native_from,
                    k_scale_ptr, v_scale_ptr, k_min_ptr, v_min_ptr, k_scales, v_scales, stride_ksn,
                    stride_vsn, mults, BLOCK_SIZE, QUANT, EARLY, KEY_MMA8, IN_PLACE,
                ),
            ),
        ],
        [4, THIRD_WARPS],
        # 3 x 168 registers a thread: the default consumer warpgroup gets what the others leave
        # (native 232; quantized 224, the producer taking 56).
        [WORKER_REGS, THIRD_REGS],
    )  # fmt: skip


def _row_view(t: torch.Tensor) -> tuple[int, int] | None:
    """``(rows, row_len)`` of a 2-D view (rows of ``stride(2)`` elements) in which every
    ``(batch, head)`` of ``t [B, H, L, D]`` is ``L`` consecutive rows at one column offset, or
    ``None`` when the strides allow none (or TMA's 16-byte rules fail)."""
    batch, heads, length, dim = t.shape
    sb, sh, sl, sd = t.stride()
    size = t.element_size()
    if sd != 1 or t.data_ptr() % 16 or (sl * size) % 16 or (sh * size) % 16 or (sb * size) % 16:
        return None
    if sb % sl:
        return None
    if sh % sl and sh * (heads - 1) + dim > sl:  # heads side by side within a row: must fit
        return None
    if sh % sl == 0 and dim > sl:
        return None
    last_row = ((batch - 1) * sb + (heads - 1) * sh) // sl
    return last_row + length, sl


@functools.cache
def _smem_layout(block_rows: int, head_dim: int, dtype: torch.dtype) -> gl.NVMMASharedLayout:
    # Cached: building it is ~10 us of Python, three times per call.
    gl_dtype = {torch.float16: gl.float16, torch.uint8: gl.uint8, torch.float8_e4m3fn: gl.float8e4nv}.get(
        dtype, gl.bfloat16
    )
    return gl.NVMMASharedLayout.get_default_for([block_rows, head_dim], gl_dtype)


def skip_reason(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int, grouped: bool, store=None
) -> str | None:
    """Why this kernel cannot run the call (``None``: it can). With ``store`` (a quantized
    history's ``QuantizedBlocks``), ``k``/``v`` are the native tail (partial block, chunk)."""
    if q.device.type != "cuda":
        return "not a CUDA tensor"
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return f"compute capability {torch.cuda.get_device_capability(q.device)} is not Hopper's 9.x"
    if grouped:
        return "query groups (query_group_size) need per-group tables"
    if block_size % BLOCK_N:
        return f"block_size {block_size} is not a multiple of {BLOCK_N}"
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype} (it runs float16/bfloat16)"
    if q.shape[-1] not in (64, 128):
        return f"head_dim {q.shape[-1]} (it runs 64 or 128)"
    if k.stride() != v.stride():
        return "k and v have different strides"
    if any(_row_view(t) is None for t in (q, k, v)):
        return "a layout its TMA descriptors cannot address (16-byte alignment, row strides)"
    if store is not None:
        if store.k.device != q.device:
            return f"a store on {store.k.device} (the kernel reads the device's memory only)"
        if k.shape[2] == 0:
            return "an empty tail (no chunk tokens)"
        codes = (store.k.view(torch.uint8), store.v.view(torch.uint8))
        if codes[0].stride() != codes[1].stride() or any(_row_view(t) is None for t in codes):
            return "a store layout its TMA descriptors cannot address"
        if store.kv_format == "int4" and not _pairs_aligned(store):
            return "int4 key scales at odd element offsets (it reads them as bf16 pairs)"
    return None


def _pairs_aligned(store) -> bool:
    """Whether every element offset into an int4 store's key scales and minimums is even: the
    kernel reads a channel pair's two bf16 values as one int32."""
    return not any(
        t.storage_offset() % 2 or any(s % 2 for s in t.stride()[:3]) for t in (store.k_scale, store.k_min)
    )


def _key_products_in_fp8(store) -> bool:
    """Whether the kernel multiplies an fp8 store's key codes as stored (``FP8_KEY_PRODUCTS``)."""
    return FP8_KEY_PRODUCTS and store is not None and store.kv_format == "fp8" and not FLOOR_COPY


def _in_place(store) -> bool:
    """Whether code tiles are decoded in their stages, three of them, with no code ring: fp8 with
    key products (``FP8_THREE_STAGES``, values), int4 (``INT4_THREE_STAGES``, both halves)."""
    if FP8_THREE_STAGES and _key_products_in_fp8(store):
        return True
    return INT4_THREE_STAGES and store is not None and store.kv_format == "int4" and not FLOOR_COPY


def _partition(store) -> str:
    """The kernel's ``THIRD_PARTITION`` entry (fp8 in place: e4m3 queries in the consumers' registers)."""
    if store is None:
        return "native"
    return "in_place" if _in_place(store) and _key_products_in_fp8(store) else "quantized"


def _quant_code(store) -> int:
    """The kernel's ``QUANT``: 0 native, 1 fp8 (exact codes; the consumers scale), 2 int4 (a
    word at a time), 3 the benchmark's floor (``FLOOR_COPY``)."""
    if store is None:
        return 0
    if FLOOR_COPY:
        return 3
    return 1 if store.kv_format == "fp8" else 2


def supported(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int, grouped: bool, store=None
) -> bool:
    """Whether this kernel runs the call (else ``triton_attention`` does)."""
    return skip_reason(q, k, v, block_size=block_size, grouped=grouped, store=store) is None


def scattered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_idx: torch.Tensor,
    num_blocks: torch.Tensor,
    history_len: torch.Tensor,
    chunk_len: int,
    block_size: int,
    scale: float,
    return_lse: bool,
    num_sms: int,
    stages: int = 3,
    store=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the kernel (call only where ``supported`` holds).

    ``block_idx [B, Hkv, 1, W]`` ascending block indices (``num_blocks [B, Hkv, 1]`` valid);
    ``history_len`` a 0-d integer tensor on the device. With ``store`` (a quantized history's
    ``QuantizedBlocks``) the history's whole blocks are read from it as code bytes and
    dequantized in shared memory by a producer warpgroup (``_produce_partition``), and
    ``k``/``v`` hold the tokens from the partial last block on (the partial block, then the
    chunk), as ``quantized_attention`` passes them. One program per 128-query tile, but
    the tiles of the last wave (``num_sms`` programs at once) are split into up to
    ``MAX_SPLITS`` parts that hand over through ``out`` itself (``num_sms=1``: no split).
    Besides its outputs a call allocates one int32 ticket per program, at most
    ``2 * num_sms + 1`` int32 flags and ``num_sms x 2 x 128`` float32 (about 135 KiB on an
    H100 at wan-1.3b shapes): nothing proportional to the attended tokens.
    """
    batch, num_q_heads, q_len, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(batch, num_q_heads, q_len, device=q.device, dtype=torch.float32) if return_lse else out
    num_q_tiles = triton.cdiv(q_len, BLOCK_M)
    num_tiles = batch * num_q_heads * num_q_tiles
    if num_tiles == 0:
        return out, (lse if return_lse else None)
    if block_idx.shape[-1] == 0:  # no history blocks: the kernel still reads one table entry
        block_idx = torch.zeros(*block_idx.shape[:-1], 1, device=q.device, dtype=torch.int32)
    descs = []
    for t, block_rows in ((q, BLOCK_M // 2), (k, BLOCK_N), (v, BLOCK_N)):
        rows, row_len = _row_view(t)
        layout = _smem_layout(block_rows, head_dim, q.dtype)
        descs.append(TensorDescriptor(t, [rows, row_len], [row_len, 1], [block_rows, head_dim], layout))
    if store is None:  # unused: the native kernel
        quantized = [descs[1], descs[2], out, out, out, out] + [0] * 9
    else:
        codes = []
        # fp8 keys the tensor cores read as stored are e4m3 to TMA; other codes are bytes
        key_codes = torch.float8_e4m3fn if _key_products_in_fp8(store) else torch.uint8
        for t in (store.k.view(key_codes), store.v.view(torch.uint8)):
            rows, row_len = _row_view(t)
            layout = _smem_layout(BLOCK_N, t.shape[-1], t.dtype)
            codes.append(TensorDescriptor(t, [rows, row_len], [row_len, 1], [BLOCK_N, t.shape[-1]], layout))
        k_min = store.k_min if store.k_min is not None else store.k_scale  # fp8 has none: unused
        v_min = store.v_min if store.v_min is not None else store.v_scale
        quantized = [*codes, store.k_scale, store.v_scale, k_min, v_min, *store.k.stride()[:3],
                     *store.k_scale.stride()[:3], *store.v_scale.stride()[:3]]  # fmt: skip
        # two stages and the code ring fit in shared memory; three without a code ring
        stages = 3 if _in_place(store) else 2
    num_split_tiles = num_tiles % num_sms
    splits = min(MAX_SPLITS, num_sms // num_split_tiles) if num_split_tiles else 1
    if splits == 1:
        num_split_tiles = 0
    num_parts = num_split_tiles * splits
    grid = num_tiles - num_split_tiles + num_parts
    sync = torch.zeros(2 * num_parts + 1, device=q.device, dtype=torch.int32)  # ticket, then flags
    tickets = torch.empty(grid, device=q.device, dtype=torch.int32)
    handoff = torch.empty(max(num_parts, 1), 2, BLOCK_M, device=q.device, dtype=torch.float32)
    _hopper_attention_kernel[(grid,)](
        *descs, out, lse, block_idx, num_blocks, history_len, sync, tickets, handoff,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        num_q_heads, num_q_heads // k.shape[1], q_len, chunk_len, block_idx.shape[-1],
        scale * 1.4426950408889634, num_q_tiles, num_tiles - num_split_tiles, splits, *quantized,
        BLOCK_SIZE=block_size, STAGES=stages, WRITE_LSE=return_lse,
        QUANT=_quant_code(store), EARLY=EARLY_OPERANDS, KEY_MMA8=_key_products_in_fp8(store),
        IN_PLACE=_in_place(store), **THIRD_PARTITION[_partition(store)], num_warps=4, maxnreg=168,
    )  # fmt: skip
    return out, (lse if return_lse else None)
