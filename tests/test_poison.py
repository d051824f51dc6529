"""Poison discipline (as flash-linear-attention's tests): every buffer the library allocates
with ``torch.empty``/``empty_like``/``new_empty`` starts as NaN (junk for integers), and every
backend must give the same output as with clean buffers, so a row a kernel never writes, or an
entry read before it is written, shows. Unwritten cache space and unattended history are
poisoned too: no backend lets an unattended value reach an output (flex on CUDA excepted,
documented in docs/faq.md)."""

from __future__ import annotations

import pytest
import torch

from omnimem import OmniMemCache, OmniMemConfig, sparse_attention

from .inputs import TEST_DEVICE, make_inputs

BACKENDS = ["dense", "gather", "flex", "triton"]


def run(backend: str, query_group_size: int | None):
    q, k, v = make_inputs(batch=2, q_heads=4, kv_heads=2, history_len=37, q_len=35, head_dim=16, unwritten=9)
    call = dict(
        history_len=37, chunk_len=35, block_size=4, top_k=3, sink_tokens=2, local_tokens=5,
        query_group_size=query_group_size, backend=backend, compile=False, return_lse=True,
    )  # fmt: skip
    return sparse_attention(q, k, v, **call)


@pytest.mark.parametrize("query_group_size", [None, 7], ids=["one-group", "groups"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_write_every_output_entry(backend, query_group_size, request):
    out, lse = run(backend, query_group_size)
    request.getfixturevalue("poisoned_allocations")
    poisoned_out, poisoned_lse = run(backend, query_group_size)
    assert not poisoned_out.isnan().any() and not poisoned_lse.isnan().any()
    torch.testing.assert_close(poisoned_out, out, atol=0, rtol=0)
    torch.testing.assert_close(poisoned_lse, lse, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("kv_format", "offload"),
    [("native", False), ("fp8", False), ("fp8", True), ("int4", False), ("int4", True)],
    ids=["native", "fp8", "fp8-offloaded", "int4", "int4-offloaded"],
)
@pytest.mark.parametrize("backend", ["dense", "gather", "triton"])
def test_a_cache_rollout_under_poisoned_allocations_equals_a_clean_one(backend, kv_format, offload, request):
    """attend_at (rewrites, commits over partial blocks) and rewind with every allocation
    poisoned: the same outputs. Quantized: the code and scale buffers, the offloaded store's
    staged blocks and the kernels' outputs too."""

    def rollout():
        config = OmniMemConfig(block_size=4, top_k=2, sink_tokens=4, local_tokens=4, backend=backend)
        cache = OmniMemCache(48, max_chunk_tokens=6, batch=1, num_kv_heads=2, head_dim=16, config=config,
                             kv_format=kv_format, offload=offload, device=TEST_DEVICE)  # fmt: skip
        gen = torch.Generator().manual_seed(0)
        outs = []
        for start in (0, 0, 6, 12, 12, 18, 24):
            q, k, v = (torch.randn(1, 2, 6, 16, generator=gen).to(TEST_DEVICE) for _ in range(3))
            outs.append(cache.attend_at(q, k, v, start=start))
        cache.rewind(12)  # a block boundary: a quantized block cannot be cut
        q, k, v = (torch.randn(1, 2, 6, 16, generator=gen).to(TEST_DEVICE) for _ in range(3))
        outs.append(cache.attend_at(q, k, v, start=12))
        return outs

    clean = rollout()
    request.getfixturevalue("poisoned_allocations")
    for got, want in zip(rollout(), clean, strict=True):
        assert not got.isnan().any()
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def gradients(backend: str, query_group_size: int | None, poison_unattended: bool = False):
    """q, k, v gradients of a call whose keys of block 1 (never attended: the sink is block 0,
    block 1 scores lowest) may hold NaN."""
    q, k, v = make_inputs(batch=2, q_heads=4, kv_heads=2, history_len=37, q_len=35, head_dim=16, unwritten=9)
    q[..., 0] = q[..., 0].abs() + 3.0
    k[:, :, 4:8, 0] = -20.0  # block 1 scores lowest for every query group
    if poison_unattended:
        v[:, :, 4:8] = float("nan")
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    call = dict(
        history_len=37, chunk_len=35, block_size=4, top_k=3, sink_tokens=2, local_tokens=5,
        query_group_size=query_group_size, backend=backend, compile=False, return_lse=True,
    )  # fmt: skip
    out, lse = sparse_attention(q, k, v, **call)
    gen = torch.Generator().manual_seed(3)
    (out * torch.randn(out.shape, generator=gen).to(out)).sum().backward(inputs=[q, k, v], retain_graph=True)
    (lse.sum() * 0.5).backward(inputs=[q, k, v])
    return q.grad, k.grad, v.grad


@pytest.mark.parametrize("query_group_size", [None, 7], ids=["one-group", "groups"])
@pytest.mark.parametrize("backend", ["dense", "gather", "triton"])
def test_backward_writes_every_gradient_and_ignores_unattended_values(backend, query_group_size, request):
    clean = gradients(backend, query_group_size)
    request.getfixturevalue("poisoned_allocations")
    poisoned = gradients(backend, query_group_size, poison_unattended=True)
    for got, want in zip(poisoned, clean, strict=True):
        assert not got.isnan().any()
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert (clean[2][:, :, 4:8] == 0).all()  # an unattended block gets no gradient


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("query_group_size", [None, 7], ids=["one-group", "groups"])
def test_flex_on_cpu_ignores_unattended_values(query_group_size, compiled):
    """FlexAttention weighs every value of a visited tile (every value, eager): NaN in blocks
    no query of a head attends, beside attended ones in the same tile, and in the buffer's
    unwritten tail, must not reach any output on the CPU, where flex is the default."""
    q, k, v = make_inputs(batch=2, q_heads=4, kv_heads=2, history_len=37, q_len=35, head_dim=16, unwritten=9)
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    q[..., 0] = q[..., 0].abs() + 3.0
    k[:, :, 4:8, 0] = -20.0  # block 1 scores lowest for every query group: never attended
    call = dict(
        history_len=37, chunk_len=35, block_size=4, top_k=3, sink_tokens=2, local_tokens=5,
        query_group_size=query_group_size, backend="flex", compile=compiled, return_lse=True,
    )  # fmt: skip
    out, lse = sparse_attention(q, k, v, **call)
    poisoned = v.clone()
    poisoned[:, :, 4:8] = float("nan")
    poisoned[:, :, 37 + 35 :] = float("nan")
    got, got_lse = sparse_attention(q, k, poisoned, **call)
    assert not got.isnan().any()
    torch.testing.assert_close(got, out, atol=0, rtol=0)
    torch.testing.assert_close(got_lse, lse, atol=0, rtol=0)
