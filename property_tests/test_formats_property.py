"""The history's quantized formats (``omnimem.store.formats``) against float64 error bounds,
over random shapes: partial last blocks, block sizes 1 / 7 / 30 / 128, odd head dims, constant
and zero blocks, outlier channels."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnimem.store.formats import FP8_MAX, INT4_LEVELS, dequantize, quantize, token_bytes

from .conftest import examples


@st.composite
def histories(draw):
    shape = (
        draw(st.integers(1, 2)),
        draw(st.integers(1, 3)),
        draw(st.integers(1, 70)),
        draw(st.sampled_from([1, 3, 8, 15, 16])),
    )
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    kind = draw(st.sampled_from(["plain", "outlier channel", "constant", "zeros"]))
    if kind == "outlier channel":
        x[..., 0] *= 100
    elif kind == "constant":
        x[:] = draw(st.floats(-3, 3))
    elif kind == "zeros":
        x.zero_()
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    return x.to(dtype), draw(st.sampled_from([1, 7, 30, 128]))


@settings(max_examples=examples(40))
@given(case=histories(), role=st.sampled_from(["key", "value"]))
def test_fp8_error_is_within_half_an_e4m3_step(case, role):
    """Each element within half a float8 e4m3 step of its block's scaled value: 2**-4 relative
    for normal numbers, 2**-10 of the scale for subnormals."""
    x, block_size = case
    q = quantize(x, "fp8", role=role, block_size=block_size)
    got = dequantize(q, torch.float64)
    exact = x.double()
    scale = q.scale.double().repeat_interleave(block_size, dim=2)[:, :, : x.shape[2], None]
    assert (exact.abs() <= FP8_MAX * scale * (1 + 2**-20)).all()  # every element fits its scale
    bound = torch.maximum(exact.abs() * 2**-4, scale * 2**-10) * (1 + 2**-10)
    assert ((got - exact).abs() <= bound).all()
    assert q.data.dtype == torch.float8_e4m3fn and q.data.shape == x.shape


@settings(max_examples=examples(40))
@given(case=histories(), role=st.sampled_from(["key", "value"]))
def test_int4_error_is_within_half_a_step(case, role):
    """Each element within half a code step (its group's bfloat16 scale) of its value, codes in
    0..15, keys grouped per (block, channel), values per token."""
    x, block_size = case
    q = quantize(x, "int4", role=role, block_size=block_size)
    got = dequantize(q, torch.float64)
    exact = x.double()
    length = x.shape[2]
    if role == "key":
        scale = q.scale.double().repeat_interleave(block_size, dim=2)[:, :, :length]
        assert q.scale.shape == (*x.shape[:2], -(-length // block_size), x.shape[3])
    else:
        scale = q.scale.double()[..., None]
        assert q.scale.shape == x.shape[:3]
    # bfloat16 rounding of the minimum and scale moves the grid by at most this much more
    slack = 2**-8 * (exact.abs().amax() + INT4_LEVELS * scale)
    assert ((got - exact).abs() <= scale / 2 + slack + 1e-30).all()
    assert q.data.dtype == torch.uint8 and q.data.shape[-1] == -(-x.shape[3] // 2)


@settings(max_examples=examples(20))
@given(case=histories(), kv_format=st.sampled_from(["fp8", "int4"]))
def test_stored_bytes_are_what_token_bytes_says(case, kv_format):
    """The bytes a quantized history holds (keys and values, scales included) are
    ``token_bytes`` per token and head, up to the last partial block's rounding."""
    x, block_size = case
    b, h, length, d = x.shape
    stored = sum(quantize(x, kv_format, role=r, block_size=block_size).nbytes for r in ("key", "value"))
    per_token = token_bytes(kv_format, head_dim=d, block_size=block_size)
    blocks = -(-length // block_size)
    whole = per_token * b * h * blocks * block_size  # as if the last block were whole
    assert whole - (blocks * block_size - length) * b * h * 2 * (d + 4) <= stored <= whole + 1e-9
