"""Gradients of every differentiable path against the float64 references' autograd gradients,
over random shapes and configs: ``sparse_attention`` on each backend that differentiates
(the Triton backward under ``TRITON_INTERPRET=1`` on CPU) and ``gated_attention`` on both of
its backends (q, k, v and the gates)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import assume, given, settings

from omnimem import gated_attention, sparse_attention
from tests.inputs import TEST_DEVICE, make_inputs
from tests.reference import reference_attention
from tests.reference_gated import reference_gated_attention

from .cases import attention_cases
from .conftest import examples
from .test_gated_property import gated_cases

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Relative Frobenius error bounds of a gradient: float32 arithmetic (the backward's sums are
# longer than the forward's), and 16-bit inputs, outputs and gradients.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
BACKENDS = ["dense", "gather", "triton"] + (["flex"] if TEST_DEVICE.type == "cuda" else [])


def relative_error(x: torch.Tensor, ref: torch.Tensor, floor: torch.Tensor) -> float:
    """Frobenius error relative to the reference gradient, or to ``floor`` where that is
    smaller: a gradient that is exactly 0 in float64 (a query with one key) is roundoff-sized
    in float32, and relative to 0 any roundoff fails."""
    return float((x.double().cpu() - ref).norm() / torch.maximum(ref.norm(), floor))


def cotangents(*shapes_like: torch.Tensor, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in shapes_like]


def leaves(*xs: torch.Tensor, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    return [x.detach().to(dtype or x.dtype).clone().requires_grad_() for x in xs]


def skip_unsupported(backend: str, q: torch.Tensor) -> None:
    if backend == "triton" and q.is_cuda and q.shape[-1] < 16:
        assume(False)  # refused with a clear error on GPUs (test_backends_property)


def check_sparse_gradients(case, backend: str) -> None:
    if backend == "triton" and INTERPRETED and case.dtype == torch.bfloat16:
        case.dtype = torch.float16  # Triton's CPU interpreter computes bf16 tl.dot wrongly
    q, k, v = case.make()
    skip_unsupported(backend, q)
    ref_q, ref_k, ref_v = leaves(q.cpu(), k.cpu(), v.cpu(), dtype=torch.float64)
    ref = reference_attention(
        ref_q, ref_k, ref_v, history_len=case.history_len, chunk_len=case.chunk_len, **case.config
    )
    assume(ref.margin > 1e-4)  # a near-tie may legitimately rank differently in float32
    d_out, d_lse = cotangents(ref.out, ref.lse, seed=case.shape["seed"])
    ((ref.out * d_out).sum() + (ref.lse * d_lse).sum()).backward()

    ours = leaves(q, k, v)
    out, lse = sparse_attention(
        *ours,
        history_len=case.history_len,
        chunk_len=case.chunk_len,
        return_lse=True,
        backend=backend,
        compile=False,
        **case.config,
    )
    ((out.double().cpu() * d_out).sum() + (lse.double().cpu() * d_lse).sum()).backward()
    for name, x, r in zip("qkv", ours, (ref_q, ref_k, ref_v), strict=True):
        assert x.grad.dtype == x.dtype and x.grad.shape == x.shape, name
        assert torch.isfinite(x.grad).all(), name
        assert relative_error(x.grad, r.grad, 1e-2 * d_out.norm()) < TOLERANCE[case.dtype], name


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(20))
@given(case=attention_cases(dtypes=(torch.float32,)))
def test_sparse_attention_gradients_match_reference(backend, case):
    check_sparse_gradients(case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(10))
@given(case=attention_cases(dtypes=(torch.float16, torch.bfloat16)))
def test_sparse_attention_gradients_match_reference_16bit(backend, case):
    if backend in ("dense", "gather") and TEST_DEVICE.type != "cuda":
        pytest.skip("CPU 16-bit paths are covered in float32; this checks the GPU kernels")
    check_sparse_gradients(case, backend)


def check_gated_gradients(shape: dict, config: dict, backend: str) -> None:
    q, k, v = make_inputs(**shape)
    skip_unsupported(backend, q)
    gen = torch.Generator().manual_seed(shape["seed"])
    gates = torch.rand(*q.shape[:3], 3, generator=gen).to(q.device)
    history_len = shape["history_len"]
    ref_inputs = leaves(q.cpu(), k.cpu(), v.cpu(), gates.cpu(), dtype=torch.float64)
    ref = reference_gated_attention(*ref_inputs, history_len=history_len, **config)
    assume(ref.margin > 1e-4)
    (d_out,) = cotangents(ref.out, seed=shape["seed"])
    (ref.out * d_out).sum().backward()

    ours = leaves(q, k, v, gates)
    out = gated_attention(*ours, history_len=history_len, backend=backend, **config)
    (out.double().cpu() * d_out).sum().backward()
    for name, x, r in zip(("q", "k", "v", "gates"), ours, ref_inputs, strict=True):
        assert x.grad.shape == x.shape and torch.isfinite(x.grad).all(), name
        assert relative_error(x.grad, r.grad, 1e-2 * d_out.norm()) < TOLERANCE[shape["dtype"]], name


@pytest.mark.parametrize("backend", ["gather", "triton"])
@settings(max_examples=examples(8))  # ~7 s an example under the interpreter: CI's time budget
@given(case=gated_cases())
def test_gated_gradients_match_reference(backend, case):
    check_gated_gradients(*case, backend)


@pytest.mark.parametrize("backend", ["gather", "triton"])
# ~30 s an example in float16 under Triton's CPU interpreter: CI's time budget; the GPU runs more.
@settings(max_examples=examples(4) if INTERPRETED else examples(10))
@given(case=gated_cases(dtypes=(torch.bfloat16, torch.float16)))
def test_gated_gradients_match_reference_16bit(backend, case):
    shape, config = case
    if TEST_DEVICE.type != "cuda":
        if backend == "gather":
            pytest.skip("CPU 16-bit paths are covered in float32; this checks the GPU kernels")
        shape["dtype"] = torch.float16  # Triton's CPU interpreter computes bf16 tl.dot wrongly
    check_gated_gradients(shape, config, backend)
