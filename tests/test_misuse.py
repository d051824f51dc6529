"""Misuse is refused with a clear error, and edge inputs give the correct finite result
(issue: "Nothing silent"). Each test failed before its fix."""

from __future__ import annotations

import os

import pytest
import torch

from omnimem import GatedConfig, OmniMemCache, OmniMemConfig, gated_attention, select_blocks, sparse_attention

from .inputs import TEST_DEVICE

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["dense", "gather", "flex", "triton"]


def inputs(history: int = 64, chunk: int = 8, heads: int = 2, dim: int = 16, batch: int = 1):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, chunk, dim, generator=gen)
    k = torch.randn(batch, heads, history + chunk, dim, generator=gen)
    v = torch.randn(batch, heads, history + chunk, dim, generator=gen)
    return q.to(TEST_DEVICE), k.to(TEST_DEVICE), v.to(TEST_DEVICE)


def test_selection_planned_for_another_history_is_refused():
    q, k, v = inputs()
    sel = select_blocks(q, k, history_len=32, block_size=8)
    with pytest.raises(ValueError, match="planned for history_len=32, but this call has history_len=64"):
        sparse_attention(q, k, v, history_len=64, selection=sel, block_size=8)
    same = select_blocks(q, k, history_len=64, block_size=8)
    planned = sparse_attention(q, k, v, history_len=64, selection=same, block_size=8, backend="dense")
    torch.testing.assert_close(
        planned, sparse_attention(q, k, v, history_len=64, block_size=8, backend="dense")
    )


@pytest.mark.parametrize("scale", [float("inf"), 1e300, 1e39])
def test_scale_beyond_float32_is_refused(scale):
    with pytest.raises(ValueError, match="scale must be positive and finite in float32"):
        OmniMemConfig(scale=scale)
    with pytest.raises(ValueError, match="scale must be positive and finite in float32"):
        GatedConfig(scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("empty", ["batch", "heads"])
def test_empty_batch_or_heads_give_the_empty_result(backend, empty):
    q, k, v = inputs()
    if empty == "batch":
        q, k, v = q[:0], k[:0], v[:0]
    else:
        q = q[:, :0]
    out, lse = sparse_attention(q, k, v, backend=backend, block_size=8, return_lse=True)
    assert out.shape == q.shape and lse.shape == q.shape[:3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_larger_than_the_buffer_is_one_block(backend):
    q, k, v = inputs()
    huge = sparse_attention(q, k, v, block_size=2**40, top_k=1, backend=backend, compile=False)
    whole = sparse_attention(q, k, v, block_size=k.shape[2], top_k=1, backend=backend, compile=False)
    torch.testing.assert_close(huge, whole)
    dense = sparse_attention(q, k, v, block_size=2**40, top_k=1, backend="dense")
    torch.testing.assert_close(huge, dense, atol=1e-5, rtol=1e-5)  # one block: everything attended
    gates = torch.rand(1, 2, 8, 3, device=TEST_DEVICE)
    gated = gated_attention(q, k, v, gates, block_size=2**40, query_group_size=4, top_k=2)
    assert torch.isfinite(gated).all()


@pytest.mark.skipif(not INTERPRETED, reason="the Triton interpreter's bf16 dot (CPU tests only)")
def test_bf16_under_the_triton_interpreter_is_refused():
    q, k, v = (x.bfloat16() for x in inputs())
    with pytest.raises(ValueError, match="cannot run bfloat16"):
        sparse_attention(q, k, v, block_size=8, backend="triton")
    with pytest.raises(ValueError, match="cannot run bfloat16"):
        gated_attention(q, k, v, torch.rand(1, 2, 8, 3), backend="triton")


def test_failed_load_state_dict_leaves_the_cache_as_it_was():
    cache = OmniMemCache(64, max_chunk_tokens=8, batch=1, num_kv_heads=2, head_dim=16, device=TEST_DEVICE)
    _, k, v = inputs(history=0)
    cache.commit(k, v)
    state = cache.state_dict()
    before = (cache.k.clone(), cache.key_block_sums.clone(), cache.history_len)
    bad_states = [
        ({**state, "history_len": True}, TypeError, "history_len'] must be an int, got bool"),
        ({**state, "k": state["k"].double()}, TypeError, r"state\['k'\] must have the cache's dtype"),
        ({**state, "v": state["v"].int()}, TypeError, r"state\['v'\] must have the cache's dtype"),
        ({"k": state["k"], "history_len": 8}, ValueError, r"state lacks \['v'\]"),
        ({**state, "k": state["k"][:, :, :4]}, ValueError, r"state\['k'\] must be a tensor of shape"),
        # right shape and dtype, but no data to copy: refused before the history is forgotten
        ({**state, "v": state["v"].to("meta")}, ValueError, r"state\['v'\] cannot be copied into the cache"),
    ]
    for bad, error, message in bad_states:
        with pytest.raises(error, match=message):
            cache.load_state_dict(bad)
        assert torch.equal(cache.k, before[0]) and torch.equal(cache.key_block_sums, before[1])
        assert cache.history_len == before[2]
    cache.load_state_dict(state)
    assert cache.history_len == 8


def test_cache_of_a_non_floating_dtype_is_refused():
    with pytest.raises(TypeError, match=r"OmniMemCache dtype must be a floating torch\.dtype"):
        OmniMemCache(16, max_chunk_tokens=8, batch=1, num_kv_heads=2, head_dim=16, dtype=torch.int32)


@pytest.mark.skipif(TEST_DEVICE.type == "cuda", reason="CPU autograd advice")
@pytest.mark.parametrize("compile", [True, False])
def test_cpu_autograd_advice_works(compile):
    q, k, v = inputs()
    q.requires_grad_()
    with pytest.raises(ValueError, match="use backend='gather' or backend='dense'"):
        sparse_attention(q, k, v, block_size=8, backend="flex", compile=compile)
    for advised in ("gather", "dense"):  # the advice itself runs
        sparse_attention(q, k, v, block_size=8, backend=advised).sum().backward()
        assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("backend", ["dense", "gather"])
def test_unselected_block_has_no_influence_through_gather_padding(backend):
    """Block 0 scores lowest and sink is 0: it is never attended, yet gather's padding slots
    index token 0. NaN there must not reach the output."""
    q, k, v = inputs()
    k[:, :, :8] = -10.0 * q.mean(2, keepdim=True)  # block 0: the worst score for every head
    clean = sparse_attention(q, k, v, block_size=8, top_k=2, backend=backend)
    v[:, :, :8] = float("nan")
    torch.testing.assert_close(sparse_attention(q, k, v, block_size=8, top_k=2, backend=backend), clean)


def test_resident_caches_larger_than_the_gpu_are_refused_up_front(monkeypatch):
    """Like offloaded caches and host memory: all layers are checked before any is allocated."""
    from omnimem.sparse.cache import OmniMemCache

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * 2**30, 80 * 2**30))
    kwargs = dict(max_chunk_tokens=4680, batch=1, num_kv_heads=12, head_dim=128, dtype=torch.bfloat16)
    with pytest.raises(
        ValueError, match=r"needs 7\.2 GiB of GPU memory, but only 2\.0 GiB are free.*offload=True"
    ):
        OmniMemCache.for_layers(30, 24 * 1560, device="cuda", **kwargs)  # 30 layers x 24 frames


def test_a_gated_cache_larger_than_the_gpu_is_refused_up_front(monkeypatch):
    from omnimem import GatedCache

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 80 * 2**30))
    with pytest.raises(ValueError, match=r"needs 2\.\d GiB of GPU memory, but only 1\.0 GiB"):
        GatedCache(240 * 1560, batch=1, num_kv_heads=12, head_dim=128, dtype=torch.bfloat16, device="cuda")


def test_the_gated_triton_kernels_give_the_gradients_gather_gives():
    from omnimem import gated_attention

    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, 2, n, 16, generator=gen) for n in (30, 90, 90)]
    inputs.append(torch.rand(1, 2, 30, 3, generator=gen))
    call = dict(history_len=60, block_size=6, query_group_size=5, top_k=2, window_tokens=30)
    grads = {}
    for backend in ("gather", "triton") if INTERPRETED else ("gather",):
        leaves = [x.clone().requires_grad_() for x in inputs]
        gated_attention(*leaves, backend=backend, **call).sum().backward()
        assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in leaves)
        grads[backend] = [x.grad for x in leaves]
    for ours, theirs in zip(grads.get("triton", grads["gather"]), grads["gather"], strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    if INTERPRETED:
        leaves = [x.double().requires_grad_() for x in inputs]
        with pytest.raises(ValueError, match=r"float64 gradients.*backend='gather'"):
            gated_attention(*leaves, backend="triton", **call)


@pytest.mark.parametrize("backend", ["dense", "gather", "flex", "triton"])
def test_a_block_with_nan_keys_is_never_retrieved_and_changes_nothing(backend):
    """A corrupted history block (NaN keys and values) scores as no candidate, so retrieval
    leaves it out and the output is what it is without it (flex on CUDA still needs the values
    finite: its kernel multiplies a masked weight of 0 by every value of a tile it visits, and
    only on the CPU does the backend zero the values nobody attends first)."""
    from omnimem import select_blocks, sparse_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen).to(TEST_DEVICE) for n in (8, 72, 72))
    call = dict(history_len=64, block_size=8, top_k=1, sink_tokens=8, local_tokens=8, backend=backend)
    clean = sparse_attention(q, k, v, **call)
    assert 1 not in select_blocks(q, k, **call).kv_block_idx.flatten().tolist()  # block 1 is far and unpicked
    corrupted_k, corrupted_v = k.clone(), v.clone()
    corrupted_k[:, :, 8:16] = float("nan")
    if backend != "flex" or torch.device(TEST_DEVICE).type == "cpu":
        corrupted_v[:, :, 8:16] = float("nan")
    assert 1 not in select_blocks(q, corrupted_k, **call).kv_block_idx.flatten().tolist()
    torch.testing.assert_close(sparse_attention(q, corrupted_k, corrupted_v, **call), clean, atol=0, rtol=0)
    # Even a budget that takes every other block leaves it out.
    assert not sparse_attention(q, corrupted_k, corrupted_v, **{**call, "top_k": 16}).isnan().any()
