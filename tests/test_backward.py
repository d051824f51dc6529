"""Autograd: float64 gradcheck of the torch paths, and the Triton backward's pieces (the table
inversion, groups with no block, the LSE's gradient) against autograd through the gather twin.
Random shapes against the float64 references: property_tests/test_backward_property.py."""

from __future__ import annotations

import os

import pytest
import torch

from omnimem import sparse_attention
from omnimem.backends.gated_branches import selected_attention_gather
from omnimem.backends.scattered_backward import block_pairs, scattered_attention_backward

from .inputs import TEST_DEVICE, make_inputs

RUNS_TRITON = TEST_DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("backend", ["dense", "gather"])
@pytest.mark.parametrize("query_group_size", [None, 3], ids=["one-group", "groups"])
def test_torch_backends_pass_gradcheck_in_float64(backend, query_group_size):
    # (The LSE is float32 by contract, too coarse for gradcheck: its gradients are checked
    # against the float64 reference in the property tests.)
    q, k, v = make_inputs(q_heads=4, kv_heads=2, q_len=7, history_len=21, head_dim=8, dtype=torch.float64)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    call = dict(history_len=21, block_size=4, top_k=2, sink_tokens=2, local_tokens=3, backend=backend,
                query_group_size=query_group_size)  # fmt: skip
    assert torch.autograd.gradcheck(lambda q, k, v: sparse_attention(q, k, v, **call), (q, k, v))


def test_block_pairs_invert_the_table():
    table = torch.tensor([[[[3, 0, -1], [0, 5, 3]], [[1, -1, -1], [1, 2, -1]]]], dtype=torch.int32)
    keys, groups = block_pairs(table, num_slots=8)
    pairs = [(int(k), int(g)) for k, g in zip(keys, groups, strict=True)]
    # key = kv_head * 8 + block; unused slots last as -1; groups of one block in group order
    assert pairs[:7] == [(0, 0), (0, 1), (3, 0), (3, 1), (5, 1), (9, 0), (9, 1)]
    assert pairs[7] == (10, 1) and all(k == -1 for k, _ in pairs[8:])
    empty_keys, _ = block_pairs(table[:, :, :0], num_slots=8)
    assert empty_keys.tolist() == [-1]  # the kernel reads one slot


@pytest.mark.skipif(not RUNS_TRITON, reason="the Triton kernels run on CUDA or under TRITON_INTERPRET=1")
def test_backward_kernels_match_autograd_of_the_gather_twin_with_an_empty_group():
    """Per-group tables where group 1 selected nothing (output 0, LSE -inf): its rows get no
    gradient and nothing turns NaN; the other groups' gradients equal autograd's."""
    gen = torch.Generator().manual_seed(0)
    q, k, v, d_out = (torch.randn(1, 2, n, 16, generator=gen).to(TEST_DEVICE) for n in (12, 40, 40, 12))
    q = q[:, :, :12]
    block_idx = torch.tensor([[[[4, 1], [-1, -1], [0, 6]]]], dtype=torch.int32, device=TEST_DEVICE)
    num_blocks = torch.tensor([[[2, 0, 2]]], dtype=torch.int32, device=TEST_DEVICE)
    block_idx, num_blocks = block_idx.repeat(1, 2, 1, 1), num_blocks.repeat(1, 2, 1)
    seq_len = torch.tensor(37, device=TEST_DEVICE)
    sizes = dict(block_size=6, query_group_size=4, scale=0.3)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = selected_attention_gather(*leaves, block_idx=block_idx, seq_len=seq_len, **sizes)
    out.backward(d_out)
    lse = torch.full(q.shape[:3], float("-inf"), device=TEST_DEVICE)
    for g in (0, 2):  # the LSE of the groups that attend something, from the same tokens
        rows = slice(4 * g, 4 * g + 4)
        tokens = (block_idx[0, 0, g].long()[:, None] * 6 + torch.arange(6, device=TEST_DEVICE)).flatten()
        tokens = tokens[tokens < 37]
        lse[:, :, rows] = torch.logsumexp(q[:, :, rows] @ k[:, :, tokens].transpose(-1, -2) * 0.3, -1)
    grads = scattered_attention_backward(
        q, k, v, out.detach(), lse, d_out, block_idx=block_idx, num_blocks=num_blocks, limit=seq_len,
        chunk_len=0, **sizes,
    )  # fmt: skip
    for ours, leaf in zip(grads, leaves, strict=True):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, leaf.grad, atol=1e-5, rtol=1e-4)
    assert (grads[0][:, :, 4:8] == 0).all()


@pytest.mark.parametrize("backend", ["dense", "gather", "triton"])
def test_an_empty_batch_backpropagates_empty_gradients(backend):
    """B = 0 (a data-parallel rank's empty shard): the empty result stays part of the graph."""
    if backend == "triton" and not RUNS_TRITON:
        pytest.skip("the triton kernels run on CUDA or under TRITON_INTERPRET=1")
    from omnimem import gated_attention

    q, k, v = (torch.randn(0, 2, n, 16, device=TEST_DEVICE, requires_grad=True) for n in (30, 90, 90))
    sparse_attention(q, k, v, block_size=8, top_k=2, backend=backend).sum().backward()
    assert [x.grad.shape for x in (q, k, v)] == [x.shape for x in (q, k, v)]
    if backend == "dense":
        return
    gates = torch.rand(0, 2, 30, 3, device=TEST_DEVICE, requires_grad=True)
    rules = dict(block_size=6, query_group_size=5, top_k=2, window_tokens=30, backend=backend)
    gated_attention(q, k, v, gates, history_len=60, **rules).sum().backward()
    assert gates.grad.shape == gates.shape


@pytest.mark.skipif(not RUNS_TRITON, reason="the Triton kernels run on CUDA or under TRITON_INTERPRET=1")
@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "history_len", "tail", "block_size", "window_tokens"),
    [
        (4, 2, 47, 5, 7, 30),  # GQA, a partial last block, unwritten space after the chunk
        (2, 2, 0, 0, 30, 14040),  # no history: one partial block, the window covers everything
        (2, 1, 100, 3, 10, 25),
    ],
)
def test_gated_triton_backward_makes_dk_dv_in_one_pass(
    q_heads, kv_heads, history_len, tail, block_size, window_tokens, poisoned_allocations
):
    """gated_attention on the triton backend makes the whole dk/dv in one backward (the block
    means' gradient spread over their tokens, the window's added, the selected blocks' added
    by the kernel): equal to autograd through the gather twin, every row written (allocations
    poisoned), zero past the sequence."""
    from omnimem import gated_attention

    gen = torch.Generator().manual_seed(history_len)
    q = torch.randn(1, q_heads, 20, 16, generator=gen).to(TEST_DEVICE)
    kv_shape = (1, kv_heads, history_len + 20 + tail, 16)
    k, v = (torch.randn(kv_shape, generator=gen).to(TEST_DEVICE) for _ in "kv")
    gates = torch.rand(1, q_heads, 20, 3, generator=gen).to(TEST_DEVICE)
    d_out = torch.randn(q.shape, generator=gen).to(TEST_DEVICE)
    rules = dict(history_len=history_len, block_size=block_size, query_group_size=5, top_k=3)
    grads = {}
    for backend in ("gather", "triton"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, gates)]
        gated_attention(*leaves, window_tokens=window_tokens, backend=backend, **rules).backward(d_out)
        grads[backend] = [leaf.grad for leaf in leaves]
    for name, ours, want in zip(("q", "k", "v", "gates"), grads["triton"], grads["gather"], strict=True):
        torch.testing.assert_close(ours, want, atol=2e-5, rtol=1e-4, msg=name)
    for grad in grads["triton"][1:3]:
        assert (grad[:, :, history_len + 20 :] == 0).all()


@pytest.mark.parametrize(
    ("seq_len", "start", "length"),
    [(23, 0, 26), (23, 9, 14), (23, 10, 13), (6, 2, 3), (0, 0, 4), (23, 24, 2)],
)
def test_spread_block_gradients_is_the_block_means_backward(seq_len, start, length, poisoned_allocations):
    """The one-pass backward's spread of block-mean gradients over tokens ``[start, start +
    length)`` (a partial first and last block, tokens past the sequence) equals autograd
    through ``block_means``, with the allocation poisoned."""
    from omnimem.backends.selected_attention import spread_block_gradients
    from omnimem.pooling import block_means

    gen = torch.Generator().manual_seed(seq_len + start)
    x = torch.randn(1, 2, max(seq_len, start + length), 4, generator=gen, dtype=torch.float64)
    x.requires_grad_()
    grad_means = torch.randn(1, 2, max(1, -(-seq_len // 4)), 4, generator=gen, dtype=torch.float64)
    means = block_means(x, seq_len, 4, num_slots=grad_means.shape[2], dtype=torch.float64)
    # Nothing to pool (seq_len 0): the means hold no graph and every token's gradient is 0.
    want = torch.autograd.grad(means, x, grad_means)[0] if means.requires_grad else torch.zeros_like(x)
    like = x.detach()[:, :, start : start + length]
    got = spread_block_gradients(grad_means, like, seq_len, 4, start=start)
    torch.testing.assert_close(got, want[:, :, start : start + length], atol=1e-12, rtol=0)
