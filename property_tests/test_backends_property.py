"""Every backend against the independent float64 reference, over random shapes and configs."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from omnimem import sparse_attention
from tests.inputs import ON_HOPPER

from .cases import Case, attention_cases, hopper_cases
from .conftest import examples

# Eager everything here (compile=False: eager FlexAttention is exact through its mask_mod, and
# on GPUs selection/planning stay eager too), so random shapes never compile; the compiled
# path is covered on fixed shape classes in test_flex_compiled_property.py.
BACKENDS = {
    "dense": dict(backend="dense", compile=False),
    "flex": dict(backend="flex", compile=False),
    # The Triton kernel: native on GPUs, in Triton's interpreter on CPU (conftest sets it).
    "triton": dict(backend="triton", compile=False),
    "gather": dict(backend="gather", compile=False),
}
# Relative Frobenius error bounds: float32 arithmetic, and 16-bit inputs and outputs.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double().cpu() - ref).norm() / ref.norm().clamp(min=1e-30))


def log_domain_error(lse: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest LSE error, relative to the LSE's scale but never to less than 1: an LSE is a log,
    so its absolute error is the relative error of the softmax normaliser, and relative to an
    LSE near 0 (seen: 0.0100, off by 1e-7) it would be ill-conditioned."""
    scale = max(1.0, float(ref.abs().max()))
    return float((lse.double().cpu() - ref).abs().max()) / scale


def check_against_reference(case: Case, **backend) -> None:
    q, k, v = case.make()
    if backend.get("backend") == "triton" and q.is_cuda and q.shape[-1] < 16:
        # Tensor-core tiles: the backend refuses tiny head dims on GPUs with a clear error.
        with pytest.raises(ValueError, match="head_dim must be >= 16"):
            sparse_attention(q, k, v, history_len=case.history_len, chunk_len=case.chunk_len, **backend)
        return
    ref = case.reference()
    assume(ref.margin > 1e-4)  # a near-tie may legitimately rank differently in float32
    out, lse = sparse_attention(
        q,
        k,
        v,
        history_len=case.history_len,
        chunk_len=case.chunk_len,
        return_lse=True,
        **case.config,
        **backend,
    )
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    tol = TOLERANCE[case.dtype]
    assert relative_error(out, ref.out) < tol
    assert log_domain_error(lse, ref.lse) < tol


@pytest.mark.parametrize("backend", list(BACKENDS))
@given(case=attention_cases(dtypes=(torch.float32,)))
def test_backend_matches_reference_float32(backend, case):
    check_against_reference(case, **BACKENDS[backend])


@pytest.mark.parametrize("backend", list(BACKENDS))
@given(case=attention_cases(dtypes=(torch.bfloat16, torch.float16)))
def test_backend_matches_reference_16bit(backend, case):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1" and case.dtype == torch.bfloat16:
        # Triton's CPU interpreter computes bf16 tl.dot wrongly (fp16 and native GPUs are fine).
        case.dtype = torch.float16
    check_against_reference(case, **BACKENDS[backend])


@pytest.mark.parametrize("use_tma", [False, True], ids=["pointer-loads", "tma-loads"])
@settings(max_examples=examples(25))
@given(case=attention_cases(dtypes=(torch.float32,)))
def test_triton_kernel_matches_reference_with_head_dims_of_tensor_cores(use_tma, case):
    """On GPUs tl.dot needs head_dim >= 16: the same check restricted to such shapes, with both
    load paths of the kernel (the interpreter runs tensor-descriptor loads too)."""
    from omnimem.backends import triton_attention

    case.shape["head_dim"] = max(case.shape["head_dim"], 16)
    original = triton_attention.default_use_tma
    triton_attention.default_use_tma = lambda device: use_tma
    try:
        check_against_reference(case, **BACKENDS["triton"])
    finally:
        triton_attention.default_use_tma = original


@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon kernel runs on Hopper GPUs only")
@settings(max_examples=examples(40))
@given(case=hopper_cases(), num_sms=st.sampled_from([1, 5, 50, None]))
def test_hopper_kernel_matches_reference(case, num_sms):
    """The triton backend's Hopper path (the Gluon kernel), with its last wave unsplit, split,
    or at the real SM count."""
    from omnimem.backends import gluon_attention, triton_attention

    q, k, v = case.make()
    assert gluon_attention.supported(q, k, v, block_size=case.config["block_size"], grouped=False)
    original = triton_attention.default_num_sms
    if num_sms is not None:
        triton_attention.default_num_sms = lambda device: num_sms
    try:
        check_against_reference(case, **BACKENDS["triton"])
    finally:
        triton_attention.default_num_sms = original
