"""The Hopper Gluon kernel (``backends/gluon_attention.py``) compiles for sm_90 here, without a
GPU: native, fp8 and int4 histories, head dims 64 and 128, one and two key tiles a block. Its
shared memory fits a Hopper SM and no thread spills registers to local memory (the converter
or the producer warpgroup of a quantized history shares the register file with the consumers). Running it
needs a Hopper GPU (``tests/test_kernels.py``); the converter's arithmetic is replayed in torch
here against the reference dequantization."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

gluon = pytest.importorskip("triton.experimental.gluon")

HOPPER_SMEM = 232448  # bytes a block may opt in to on sm_90 (227 KiB)


def _compile(quant: int, head_dim: int, block_size: int, key_mma8: int = 0):
    """``key_mma8``: 1, fp8 key products (``FP8_KEY_PRODUCTS``); 2, with three stages and values
    decoded in place (``FP8_THREE_STAGES``); 3, int4 in three stages (``INT4_THREE_STAGES``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from omnimem.backends import gluon_attention as ga

    gl = ga.gl

    def desc(dtype: str, gl_dtype, rows: int, cols: int) -> str:
        layout = gl.NVMMASharedLayout.get_default_for([rows, cols], gl_dtype)
        return f"tensordesc<{dtype}[{rows},{cols}],{layout!r}>"

    native = desc("bf16", gl.bfloat16, ga.BLOCK_N, head_dim)
    fp8 = quant == 1
    code_cols = head_dim if fp8 else head_dim // 2  # quant 2 (and the floor, 3): int4
    codes = desc("u8", gl.uint8, ga.BLOCK_N, code_cols) if quant else native
    # KEY_MMA8: the key codes' descriptor is e4m3 (the tensor cores read them as stored)
    key_codes = desc("fp8e4nv", gl.float8e4nv, ga.BLOCK_N, head_dim) if key_mma8 in (1, 2) else codes
    scales = "*fp32" if fp8 else "*bf16"
    types = dict(
        q_desc=desc("bf16", gl.bfloat16, ga.BLOCK_M // 2, head_dim), k_desc=native, v_desc=native,
        kc_desc=key_codes, vc_desc=codes, out_ptr="*bf16", lse_ptr="*fp32", block_idx_ptr="*i32",
        num_blocks_ptr="*i32", history_len_ptr="*i64", sync_ptr="*i32", tickets_ptr="*i32",
        handoff_ptr="*fp32", qk_scale="fp32", k_scale_ptr=scales, v_scale_ptr=scales, k_min_ptr=scales,
        v_min_ptr=scales,
    )  # fmt: skip
    constants = dict(
        BLOCK_SIZE=block_size, STAGES=2 if quant and key_mma8 < 2 else 3, WRITE_LSE=True, QUANT=quant,
        CSTAGES=2, EARLY=ga.EARLY_OPERANDS, KEY_MMA8=key_mma8 in (1, 2), IN_PLACE=key_mma8 >= 2,
        **ga.THIRD_PARTITION["in_place" if key_mma8 == 2 else "quantized" if quant else "native"],
    )  # fmt: skip
    fn = ga._hopper_attention_kernel
    signature = {name: types.get(name, "i32") for name in fn.arg_names}
    signature.update(dict.fromkeys(constants, "constexpr"))
    return triton.compile(
        GluonASTSource(fn, signature, constants),
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=4, maxnreg=168),
    )


@pytest.mark.parametrize(
    ("quant", "head_dim", "block_size", "key_mma8"),
    [
        (0, 128, 128, 0),
        (1, 128, 128, 0),
        (2, 128, 128, 0),
        (3, 128, 128, 0),  # the benchmark's floor (FLOOR_COPY), int4-shaped codes
        (0, 64, 256, 0),
        (1, 64, 256, 0),
        (2, 64, 256, 0),
        (2, 128, 256, 0),
        (1, 128, 128, 1),  # fp8 keys on the tensor cores as stored (FP8_KEY_PRODUCTS)
        (1, 64, 256, 1),
        (1, 128, 128, 2),  # and three stages, values decoded in place (FP8_THREE_STAGES)
        (1, 64, 256, 2),
        (2, 128, 128, 3),  # int4 in three stages, both halves decoded in place (INT4_THREE_STAGES)
        (2, 64, 256, 3),
    ],
)
def test_hopper_kernel_compiles_for_sm90(quant, head_dim, block_size, key_mma8):
    from omnimem.backends.triton import hopper_kernel

    if hopper_kernel() is None:
        pytest.skip("this triton has no Gluon for Hopper")
    # In a process of its own: the tests run triton under its interpreter (TRITON_INTERPRET=1,
    # fixed at import), which cannot compile.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, __file__, *map(str, (quant, head_dim, block_size, key_mma8))],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert 0 < result["shared"] <= HOPPER_SMEM
    assert result["setmaxnreg"]  # the partitions rebalance registers
    if key_mma8 in (1, 2):
        assert result["qgmma"]  # the e4m3 x e4m3 products are on the tensor cores
    if result["usage"] is None:
        pytest.skip("no cuobjdump to read the local-memory usage")
    import triton

    if key_mma8 == 2 and tuple(map(int, triton.__version__.split(".")[:2])) > (3, 6):
        # FP8_THREE_STAGES' consumers hold their e4m3 queries: at 232 registers the device's
        # triton 3.6 spills nothing (checked 2026-12-07), later ones 56 bytes; not a default.
        return
    # No thread spills registers (the producer warpgroup of a quantized history leaves the
    # consumers 224 a thread).
    assert "LOCAL:0" in result["usage"] and "STACK:0" in result["usage"], result["usage"]


def _replay_ptx(asm: str, regs: dict, dtype, outputs: int = 4):
    """Run the few PTX instructions ``_INT4_WORD`` and ``_FP8_WORD_*`` use on int64 tensors of
    32-bit words (``regs``: ``$n`` operands in, ``$n`` results out); paired float ops on
    ``dtype`` halves, ``fma`` with one rounding (float64 is exact for these products)."""
    import re

    import torch

    def val(x):
        return regs[x] if x in regs else torch.tensor(int(x, 16) if x.startswith("0x") else int(x))

    def halves(w):
        h = torch.stack([w & 0xFFFF, w >> 16], -1).to(torch.int16).view(dtype)
        return h.double()

    def word(h):
        bits = h.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
        return bits[..., 0] | (bits[..., 1] << 16)

    for line in asm.splitlines():
        m = re.match(r"\s*([a-z0-9.]+)\s+(.*);", line)
        if m is None or m.group(1) == ".reg":
            continue
        op, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
        if op == "mov.b32" and args[0].startswith("{"):  # mov.b32 {lo, hi}, word
            word32 = val(args[2])
            regs[args[0].strip("{ ")], regs[args[1].strip("} ")] = word32 & 0xFFFF, word32 >> 16
            continue
        d, a = args[0], [val(x) for x in args[1:]]
        if op == "mov.b32":
            r = a[0]
        elif op == "and.b32":
            r = a[0] & a[1]
        elif op == "cvt.rn.f16x2.e4m3x2":  # two e4m3 codes, the low byte into the low half
            pair = torch.stack([a[0] & 0xFF, a[0] >> 8], -1).to(torch.uint8).view(torch.float8_e4m3fn)
            r = word(pair.to(torch.float64))
        elif op.startswith("mul.rn."):
            r = word(halves(a[0]) * halves(a[1]))
        elif op == "shr.b32":
            r = a[0] >> a[1]
        elif op == "lop3.b32":
            assert int(args[4], 16) == 0xEA  # (a & b) | c
            r = (a[0] & a[1]) | a[2]
        elif op == "prmt.b32":
            pool = [(a[0] >> (8 * i)) & 0xFF for i in range(4)] + [(a[1] >> (8 * i)) & 0xFF for i in range(4)]
            sel = int(args[3], 16)
            r = sum(pool[(sel >> (4 * i)) & 7] << (8 * i) for i in range(4))
        elif op.startswith("sub."):
            r = word(halves(a[0]) - halves(a[1]))
        elif op.startswith("fma.rn."):
            r = word(halves(a[0]) * halves(a[1]) + halves(a[2]))
        else:
            raise AssertionError(f"no replay for {op}")
        regs[d] = r & 0xFFFFFFFF
    return [regs[f"${i}"] for i in range(outputs)]


def test_int4_word_unpack_is_the_reference_dequantization():
    """``_INT4_WORD`` (the PTX that unpacks a 32-bit word of int4 codes), replayed
    instruction by instruction on words of real codes with their int32 scale pairs: its four
    outputs are channels (0, 1), (2, 3), (4, 5), (6, 7) of the word, each ``code * scale +
    minimum`` in one fused multiply-add, equal to ``dequantize`` but for rare double-rounding
    ties (as the byte-wise unpack). A wrong shift, mask, permute selector or operand fails it."""
    import torch

    from omnimem.backends import quantized_tiles as qt
    from omnimem.store.formats import dequantize, quantize

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 1, 256, 128, generator=gen) * torch.logspace(-2, 1, 128)
    for asm, dtype in ((qt.INT4_WORD_BF16.value, torch.bfloat16), (qt.INT4_WORD_FP16.value, torch.float16)):
        for role in ("key", "value"):
            q = quantize(x, "int4", role=role, block_size=128)
            words = q.data.view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # 4 code bytes a word
            if role == "key":
                scale = q.scale.repeat_interleave(128, dim=2)
                low = q.minimum.repeat_interleave(128, dim=2)
            else:
                scale, low = q.scale[..., None].expand(x.shape), q.minimum[..., None].expand(x.shape)
            # the kernel's operands: each output pair's scales and minimums as one int32
            scale2, low2 = (
                t.to(dtype).view(torch.int16).to(torch.int64).unflatten(-1, (-1, 4, 2)) & 0xFFFF
                for t in (scale, low)
            )
            regs = {"$4": words}
            for j in range(4):
                regs[f"${5 + j}"] = scale2[..., j, 0] | (scale2[..., j, 1] << 16)
                regs[f"${9 + j}"] = low2[..., j, 0] | (low2[..., j, 1] << 16)
            out = _replay_ptx(asm, regs, dtype)
            bits = torch.stack([torch.stack([p & 0xFFFF, p >> 16], -1) for p in out], -2).flatten(-3)
            got = bits.to(torch.int16)
            # dequantize's scales are the stored bf16 ones: compare in the stored dtype only
            if dtype == torch.bfloat16:
                want = dequantize(q, torch.bfloat16).view(torch.int16)
            else:
                want = (x.new_tensor(0).double() + (torch.stack([q.data & 0xF, q.data >> 4], -1)
                        .flatten(-2).double() * scale.to(dtype).double() + low.to(dtype).double())
                        ).to(dtype).view(torch.int16)  # fmt: skip
            ulps = (got.int() - want.int()).abs()
            assert ulps.max() <= 1 and ulps.float().mean() < 1e-3, (dtype, role, ulps.max())


def _bundled(tool: str) -> str | None:
    import triton.backends.nvidia as nvidia

    path = os.path.join(os.path.dirname(nvidia.__file__), "bin", tool)
    return path if os.path.exists(path) else None


def test_fp8_word_decode_is_exact():
    """``_FP8_WORD_BF16`` / ``_FP8_WORD_FP16`` (QUANT 1: e4m3 codes to exact, unscaled values,
    4 a word), replayed instruction by instruction over all 256 codes, in every byte position:
    each output equals the code's value (subnormals, zeros and signs included; the NaN codes,
    which ``quantize`` never writes, are skipped)."""
    import torch

    from omnimem.backends import quantized_tiles as qt

    codes = torch.arange(256, dtype=torch.int64)
    codes = codes[(codes & 0x7F) != 0x7F]  # e4m3fn NaN
    want = codes.to(torch.uint8).view(torch.float8_e4m3fn).double()
    for asm, dtype in ((qt.FP8_WORD_BF16.value, torch.bfloat16), (qt.FP8_WORD_FP16.value, torch.float16)):
        for position in range(4):
            words = codes << (8 * position) | (0x38 << (8 * ((position + 1) % 4)))  # 1.0 beside
            out = _replay_ptx(asm, {"$2": words}, dtype, outputs=2)
            pair = out[position // 2]
            bits = (pair >> (16 * (position % 2))) & 0xFFFF
            got = bits.to(torch.int16).view(dtype).double()
            assert torch.equal(got, want), (dtype, position)


def _compile_selected(arch: int, int4: bool, half: bool = False):
    """The gated selected-branch kernel (Triton-language) over a quantized store, compiled for
    ``sm_{arch}`` with the word-level decoders (what a GPU build runs); ``half``: an fp8 store's
    blocks multiplied in fp16 (``FP8_HALF_PRODUCTS``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from omnimem.backends import quantized_tiles, selected_attention

    assert quantized_tiles.WORDS  # outside the interpreter
    fn = selected_attention._selected_attention_kernel
    constants = dict(
        TOP_K=16, TILES_PER_GROUP=1, BLOCK_M=16, BLOCK_N=32, SUBS=1, HEAD_DIM=128, BLOCK_D=128, COMBINE=False,
        WRITE_LSE=False, PRECISION="tf32", QUANTIZED=True, INT4=int4, HALF_PRODUCTS=half,
    )  # fmt: skip
    pointers = dict(table_ptr="*i32", count_ptr="*i32", seq_len_ptr="*i64", lse_ptr="*fp32", kq_ptr="*u8",
                    vq_ptr="*u8")  # fmt: skip
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        elif "scale_ptr" in name or "min_ptr" in name:
            signature[name] = "*bf16" if int4 else "*fp32"
        elif name.endswith("_ptr"):
            signature[name] = "*bf16"
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
    return triton.compile(
        ASTSource(fn, signature, constants), target=GPUTarget("cuda", arch, 32), options=dict(num_warps=2)
    )


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_language_decoders_compile_for_ampere_and_hopper(arch):
    """The Triton-language kernels run on any CUDA GPU triton supports, so their PTX (int4 words)
    must assemble for sm_80 too: a paired ``sub.bf16x2`` (sm_90 only) once broke that; the
    subtract is an ``fma`` now. fp8 is compiled for sm_90 only (triton has no e4m3 before 8.9:
    ``check_kernel_device`` refuses it there). Compiled without a GPU, in a process of its own."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, __file__, "selected", str(arch)], capture_output=True, text=True, env=env,
        timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fma.rn.bf16x2" in run.stdout  # the word-level int4 decoder is in the kernel
    if arch == 90:  # FP8_HALF_PRODUCTS: fp16 products, one conversion a pair of codes, none to float32
        half = json.loads(run.stdout.strip().splitlines()[-1])
        assert half["f16_mma"] and half["e4m3x2"] > 0 and half["f32_from_f16"] == 0, half


if __name__ == "__main__":
    if sys.argv[1] == "selected":
        for int4 in (True, False) if int(sys.argv[2]) >= 89 else (True,):  # no e4m3 before 8.9
            ptx = _compile_selected(int(sys.argv[2]), int4).asm["ptx"]
            if int4:
                print("\n".join(line for line in ptx.splitlines() if "fma.rn.bf16x2" in line)[:2000])
        if int(sys.argv[2]) >= 89:
            ptx = _compile_selected(int(sys.argv[2]), False, half=True).asm["ptx"]
            counts = dict(f16_mma="f32.f16.f16.f32" in ptx, e4m3x2=ptx.count("cvt.rn.f16x2.e4m3x2"),
                          f32_from_f16=ptx.count("cvt.f32.f16"))  # fmt: skip
            print(json.dumps(counts))
        sys.exit(0)
    kernel = _compile(*(int(a) for a in sys.argv[1:5]))
    tool = shutil.which("cuobjdump") or _bundled("cuobjdump")
    usage = None
    if tool is not None:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run(
                [tool, "--dump-resource-usage", f.name], capture_output=True, text=True
            ).stdout
    ptx = kernel.asm["ptx"]
    qgmma = "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3" in ptx
    result = dict(shared=kernel.metadata.shared, setmaxnreg="setmaxnreg" in ptx, usage=usage, qgmma=qgmma)
    print(json.dumps(result))


def _byte_offsets(gl_dtype, rows: int, cols: int):
    """``[rows, cols]`` byte offset of each element's first byte in shared memory under the
    NVMMA layout the kernel and its TMA descriptors use (``get_default_for``), from triton's
    own linear layout of it (each offset bit XORs in one (row, col) basis)."""
    import torch
    from triton._C.libtriton import gluon_ir, ir
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language._semantic import GluonSemantic

    context = ir.context()
    ir.load_dialects(context)
    semantic = GluonSemantic(gluon_ir.GluonOpBuilder(context))
    layout = gl.NVMMASharedLayout.get_default_for([rows, cols], gl_dtype)
    bases = semantic.to_linear_layout(layout, [rows, cols]).value.offset_bases
    size = gl_dtype.primitive_bitwidth // 8
    where = torch.full((rows, cols), -1, dtype=torch.int64)
    for offset in range(rows * cols):
        r = c = 0
        for bit, (br, bc) in enumerate(bases):
            if offset >> bit & 1:
                r, c = r ^ br, c ^ bc
        where[r, c] = offset * size
    assert (where >= 0).all()
    return where


def _in_place_hazards(head_dim: int, code_width: int, rows_per_pass: int, bottom_up: bool) -> tuple[int, int]:
    """Code bytes of a tile (``[128, code_width]``: fp8 ``head_dim``, int4 half of it, in the
    first bytes of its bf16 stage) that a decode pass overwrites before the pass that reads
    them, and those it overwrites in the pass that reads them (safe only with the barrier
    between the pass's loads and its stores): passes of ``rows_per_pass`` rows."""
    import torch
    from triton.experimental.gluon import language as gl

    codes = _byte_offsets(gl.uint8, 128, code_width)
    values = _byte_offsets(gl.bfloat16, 128, head_dim)
    passes = list(range(0, 128, rows_per_pass))
    order = passes[::-1] if bottom_up else passes
    reader = torch.full((2 * 128 * head_dim,), len(order), dtype=torch.int64)  # bytes no pass reads
    writer = torch.full_like(reader, len(order))  # bytes no pass writes
    for step, first in enumerate(order):
        block = slice(first, first + rows_per_pass)
        reader[codes[block].flatten()] = step
        written = values[block].flatten()
        writer[torch.cat([written, written + 1])] = step
    read = reader < len(order)
    return int((writer[read] < reader[read]).sum()), int((writer[read] == reader[read]).sum())


@pytest.mark.parametrize("kv_format", ["fp8", "int4"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_codes_decoded_in_place_never_overwrite_unread_codes(kv_format, head_dim):
    """``FP8_THREE_STAGES`` / ``INT4_THREE_STAGES`` decode a tile's code bytes in the stage they
    arrived in, passes from the last rows to the first (``_decode_tile``'s ``IN_PLACE``): with
    the real shared-memory layouts (swizzled; bf16 rows of 128 channels in two column blocks) no
    pass overwrites a code byte a later pass reads; each pass overwrites some of its own (hence
    its barrier between loads and stores). Where a bf16 row covers more than one code row (fp8
    at head_dim 64, int4) the same passes top down would overwrite unread codes (the check can
    fail)."""
    pytest.importorskip("triton._C.libtriton.gluon_ir")
    rows = 8 * 4  # the producer's passes: 8 rows a warp, 4 warps
    width = head_dim if kv_format == "fp8" else head_dim // 2
    early, own = _in_place_hazards(head_dim, width, rows, bottom_up=True)
    assert early == 0 and own > 0
    if (kv_format, head_dim) != ("fp8", 128):
        assert _in_place_hazards(head_dim, width, rows, bottom_up=False)[0] > 0
