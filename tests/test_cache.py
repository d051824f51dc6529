"""OmniMemCache edges: capacity, validation, reset/restore, layouts, static shapes."""

from __future__ import annotations

import os

import pytest
import torch
from torch._dynamo.utils import counters

from omnimem import OmniMemConfig, select_blocks, sparse_attention
from omnimem.sparse.cache import OmniMemCache

from .inputs import TEST_DEVICE

CONFIG = OmniMemConfig(block_size=4, top_k=2, sink_tokens=4, local_tokens=4, backend="dense")


CACHE_KW = dict(max_chunk_tokens=8, batch=1, num_kv_heads=2, head_dim=8, device=TEST_DEVICE)


def make_cache(**kw) -> OmniMemCache:
    return OmniMemCache(kw.pop("capacity", 32), **{**CACHE_KW, "config": CONFIG, **kw})


def chunk(length: int, heads: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, heads, length, 8, generator=torch.Generator().manual_seed(seed)).to(TEST_DEVICE)


def test_commit_past_capacity_is_an_error_not_a_truncation():
    cache = make_cache(capacity=10)
    cache.commit(chunk(8), chunk(8))
    with pytest.raises(ValueError, match="exceed the cache capacity of 10"):
        cache.commit(chunk(3), chunk(3))
    assert cache.history_len == 8
    cache.commit(chunk(2), chunk(2))
    assert cache.history_len == 10


@pytest.mark.parametrize(
    ("k_chunk", "error", "match"),
    [
        (torch.randn(1, 3, 4, 8), ValueError, r"k_chunk must have shape \[1, 2, L, 8\]"),
        (torch.randn(1, 2, 9, 8), ValueError, "1..8 tokens"),
        (torch.randn(1, 2, 4, 8, dtype=torch.float64), TypeError, "cache's dtype torch.float32"),
        ([[1.0]], TypeError, "k_chunk must be a torch.Tensor"),
    ],
)
def test_bad_chunks_get_clear_errors(k_chunk, error, match):
    cache = make_cache(device="cpu")
    with pytest.raises(error, match=match):
        cache.attend(torch.randn(1, 2, 4, 8), k_chunk, k_chunk)
    with pytest.raises(error, match=match):
        cache.commit(k_chunk, k_chunk)


def test_constructor_validates():
    with pytest.raises(ValueError, match="max_chunk_tokens must be positive"):
        make_cache(max_chunk_tokens=0)
    with pytest.raises(TypeError, match="capacity must be an int"):
        make_cache(capacity=1.5)
    with pytest.raises(ValueError, match="layout"):
        make_cache(layout="lbhd")


def test_attend_does_not_store_the_chunk():
    cache = make_cache()
    cache.commit(chunk(6), chunk(6))
    sums = cache.key_block_sums.clone()
    q = chunk(5, seed=1)
    first = cache.attend(q, chunk(5, seed=2), chunk(5, seed=3))
    cache.attend(q, chunk(5, seed=4), chunk(5, seed=5))
    assert cache.history_len == 6 and torch.equal(cache.key_block_sums, sums)
    assert torch.equal(cache.attend(q, chunk(5, seed=2), chunk(5, seed=3)), first)


def test_reset_and_restore():
    cache = make_cache()
    for i in range(3):
        cache.commit(chunk(5, seed=i), chunk(5, seed=10 + i))
    q, kc, vc = chunk(4, seed=20), chunk(4, seed=21), chunk(4, seed=22)
    expected = cache.attend(q, kc, vc)
    state = cache.state_dict()
    cache.reset()
    assert cache.history_len == 0 and not cache.key_block_sums.any()
    fresh = make_cache(layout="blhd")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.key_block_sums, make_cache_with(state).key_block_sums)
    torch.testing.assert_close(fresh.attend(q, kc, vc), expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="history_len"):
        fresh.load_state_dict({**state, "history_len": 99})


def make_cache_with(state) -> OmniMemCache:
    cache = make_cache()
    cache.load_state_dict(state)
    return cache


def test_flash_layout_storage_is_used_without_copies():
    cache = make_cache(layout="blhd")
    assert cache._k_storage.shape == (1, 40, 2, 8)
    assert cache.k.data_ptr() == cache._k_storage.data_ptr() and cache.k.shape == (1, 2, 40, 8)


def test_for_layers_makes_independent_caches():
    caches = OmniMemCache.for_layers(
        3, 16, max_chunk_tokens=4, batch=1, num_kv_heads=1, head_dim=8, config=CONFIG, device=TEST_DEVICE
    )
    caches[0].commit(chunk(4, heads=1), chunk(4, heads=1))
    assert [c.history_len for c in caches] == [4, 0, 0]


@pytest.mark.compile
def test_rollout_with_compiled_flex_compiles_once():
    config = OmniMemConfig(
        block_size=16, top_k=2, sink_tokens=16, local_tokens=16, backend="flex", compile=True
    )
    cache = make_cache(capacity=96, max_chunk_tokens=16, config=config, head_dim=16)
    counters.clear()
    for i in range(5):
        q = torch.randn(1, 2, 16, 16).to(TEST_DEVICE)
        kc, vc = torch.randn(1, 2, 16, 16).to(TEST_DEVICE), torch.randn(1, 2, 16, 16).to(TEST_DEVICE)
        out = cache.attend(q, kc, vc)
        expected = sparse_attention(
            q,
            cache.k,
            cache.v,
            history_len=cache.history_len,
            chunk_len=16,
            config=config.replace(backend="dense"),
        )
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
        if i == 0:
            graphs = counters["stats"]["unique_graphs"]
        cache.commit(kc, vc)
    assert counters["stats"]["unique_graphs"] == graphs


def test_cached_attention_adapter_matches_the_cache_in_sdpa_layout():
    from omnimem.integration import cached_attention

    wan = make_cache(layout="blhd")
    sdpa = make_cache()
    for i in range(3):
        q, k, v = (
            torch.randn(1, 6, 2, 8, generator=torch.Generator().manual_seed(10 * i + j)).to(TEST_DEVICE)
            for j in range(3)
        )
        out = cached_attention(q, k, v, wan, commit=True)
        expected = sdpa.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        sdpa.commit(k.transpose(1, 2), v.transpose(1, 2))
        assert out.shape == (1, 6, 2, 8)
        torch.testing.assert_close(out, expected.transpose(1, 2), atol=0, rtol=0)
    with pytest.raises(ValueError, match="4-D"):
        cached_attention(q[0], k, v, wan)


def test_selection_is_what_attend_uses():
    cache = make_cache(capacity=32)
    for seed in range(3):
        cache.commit(chunk(8, seed=seed), chunk(8, seed=seed + 10))
    q = chunk(6, seed=99)
    expected = select_blocks(q, cache.k, history_len=24, chunk_len=6, config=CONFIG)
    selection = cache.selection(q)
    assert torch.equal(selection.kv_block_idx, expected.kv_block_idx)
    assert torch.equal(selection.kv_num_blocks, expected.kv_num_blocks)
    with pytest.raises(ValueError, match="1 <= Lq <= 8"):
        cache.selection(chunk(9))


@pytest.mark.parametrize("kv_format", ["native", "fp8", "int4"])
def test_offload_reuses_blocks_across_denoising_steps(kv_format):
    """...and a quantized history crosses the bus as its format's bytes, scales included."""
    from omnimem.store.formats import token_bytes

    config = OmniMemConfig(block_size=4, top_k=2, sink_tokens=4, local_tokens=4, backend="gather")
    cache = make_cache(capacity=64, config=config, offload=True, kv_format=kv_format)
    for seed in range(6):
        cache.commit(chunk(8, seed=seed), chunk(8, seed=seed + 50))
    q = chunk(8, seed=99)
    cache.attend(q, chunk(8), chunk(8))
    stats = cache.offload_stats
    # The local window comes from the last commit, kept on the device; the rest from the host.
    assert 0 < stats.hits < stats.requested
    fetched = stats.fetched_bytes
    block_bytes = token_bytes(kv_format, head_dim=8, block_size=4, itemsize=4) * 4  # k and v, bs 4, fp32
    assert block_bytes == {"native": 256, "fp8": 72, "int4": 80}[kv_format]
    assert fetched == (stats.requested - stats.hits) * block_bytes
    for _ in range(3):  # later denoising steps of the same chunk select the same blocks
        cache.attend(q, chunk(8), chunk(8))
    assert cache.offload_stats.fetched_bytes == fetched
    assert cache.offload_stats.hit_rate > stats.hit_rate
    assert cache.key_block_sums.device.type == torch.device(TEST_DEVICE).type
    history = cache.k if kv_format == "native" else cache._offload.store.k
    assert history.device.type == "cpu"


def test_offload_edges_are_clear_errors(monkeypatch):
    config = OmniMemConfig(block_size=4, top_k=3, sink_tokens=4, local_tokens=4, backend="gather")
    import omnimem.store.tiers

    with pytest.raises(TypeError, match="offload must be a bool"):
        make_cache(offload="yes")
    one_layer = 2 * (64 + 8) * 2 * 8 * 4  # k and v, capacity + chunk, 2 heads, D 8, fp32
    monkeypatch.setattr(omnimem.store.tiers, "available_host_memory", lambda: 3 * one_layer)
    make_cache(capacity=64, config=config, offload=True)
    with pytest.raises(ValueError, match=r"needs 0\.0 GiB of host memory"):  # 4 layers, checked up front
        OmniMemCache.for_layers(4, 64, **CACHE_KW, config=config, offload=True)
    monkeypatch.setattr(omnimem.store.tiers, "available_host_memory", lambda: one_layer - 1)
    with pytest.raises(ValueError, match="GiB of host memory"):
        make_cache(capacity=64, config=config, offload=True)


def test_device_without_index_accepts_tensors_on_that_device():
    """``device="cuda"`` means the current CUDA device: its ``cuda:0`` tensors are accepted."""
    device_type = torch.device(TEST_DEVICE).type
    for offload in (False, True):
        cache = make_cache(device=device_type, offload=offload)
        cache.commit(chunk(8), chunk(8))
        assert cache.history_len == 8 and cache.device == chunk(1).device


def test_offload_with_buffers_shorter_than_a_block():
    """Capacity + chunk below one block: nothing is staged, nothing may be read out of bounds."""
    config = OmniMemConfig(block_size=16, top_k=1, backend="gather")
    resident, offloaded = (make_cache(capacity=1, config=config, offload=flag) for flag in (False, True))
    q, k, v = chunk(1), chunk(1, seed=1), chunk(1, seed=2)
    assert torch.equal(offloaded.attend(q, k, v), resident.attend(q, k, v))
    offloaded.commit(k, v)
    resident.commit(k, v)
    q = chunk(1, seed=3)
    assert torch.equal(offloaded.attend(q, k, v), resident.attend(q, k, v))


@pytest.mark.parametrize("where", ["resident", "host", "disk"])
def test_rewind_leaves_what_commits_of_the_kept_tokens_leave(where, tmp_path, poisoned_allocations):
    """rewind(end) cuts a block: its sum is over the kept tokens only, as if they alone had been
    committed; retrieval with no local window (the cut block's score decides) agrees too.
    Offloaded (host memory or disk) the same, from the host's copy."""
    config = OmniMemConfig(block_size=4, top_k=1, sink_tokens=0, local_tokens=0, backend="gather")
    keys, values = chunk(23, seed=1), chunk(23, seed=2)
    tier = {"resident": {}, "host": dict(offload=True), "disk": dict(offload=True, disk=tmp_path)}[where]
    rewound, fresh = make_cache(config=config, **tier), make_cache(config=config)
    for start in range(0, 23, 8):
        rewound.commit(keys[:, :, start : start + 8], values[:, :, start : start + 8])
    rewound.rewind(17)
    for start in range(0, 17, 8):
        fresh.commit(keys[:, :, start : min(start + 8, 17)], values[:, :, start : min(start + 8, 17)])
    assert rewound.history_len == fresh.history_len == 17
    torch.testing.assert_close(
        rewound.key_block_sums[:, :, :5], fresh.key_block_sums[:, :, :5], atol=0, rtol=0
    )
    q = chunk(4, seed=3) * 4
    torch.testing.assert_close(rewound.attend(q, q, q), fresh.attend(q, q, q), atol=0, rtol=0)


def test_attend_at_refuses_before_changing_anything():
    cache = make_cache(capacity=12)
    for start in (0, 0, 8):
        cache.attend_at(chunk(8), chunk(8), chunk(8), start=start)
    assert (cache.history_len, cache.chunk_len) == (8, 8)
    with pytest.raises(TypeError, match="start must be an int"):
        cache.attend_at(chunk(8), chunk(8), chunk(8), start=8.0)
    with pytest.raises(ValueError, match=r"start must be 8 \(rewrite the current chunk\) or 16 .* got 0"):
        cache.attend_at(chunk(8), chunk(8), chunk(8), start=0)
    with pytest.raises(ValueError, match="past the cache capacity of 12"):
        cache.attend_at(chunk(4), chunk(4), chunk(4), start=16)
    with pytest.raises(ValueError, match="head_dim"):  # bad queries for the next chunk
        cache.attend_at(chunk(4)[..., :4], chunk(4), chunk(4), start=16)
    assert (cache.history_len, cache.chunk_len) == (8, 8)
    with pytest.raises(ValueError, match=r"end must be in \[0, history_len \+ chunk_len = 16\]"):
        cache.rewind(17)
    cache.rewind(4)
    assert (cache.history_len, cache.chunk_len) == (4, 0)
    cache.attend_at(chunk(4), chunk(4), chunk(4), start=4)


@pytest.mark.parametrize("offload", [False, True])
def test_rewind_into_the_current_chunk_keeps_its_head_as_history(offload, poisoned_allocations):
    """rewind(end) with end inside the current chunk: its tokens before end become history, as
    if that shorter chunk had been written and promoted (LongLive's re-cache can start there);
    offloaded too."""
    config = OmniMemConfig(block_size=4, top_k=1, sink_tokens=4, local_tokens=4, backend="gather")
    gen = torch.Generator().manual_seed(3)
    x = [torch.randn(1, 2, 8, 8, generator=gen).to(TEST_DEVICE) for _ in range(3)]
    rewound, written = (OmniMemCache(32, max_chunk_tokens=8, batch=1, num_kv_heads=2, head_dim=8,
                                     config=config, device=TEST_DEVICE, offload=offload and i == 0)
                        for i in range(2))  # fmt: skip
    rewound.attend_at(x[0], x[0], x[0], start=0)
    rewound.attend_at(x[1], x[1], x[1], start=8)
    rewound.rewind(13)
    assert (rewound.history_len, rewound.chunk_len) == (13, 0)
    written.attend_at(x[0], x[0], x[0], start=0)
    written.attend_at(*(t[:, :, :5] for t in x[1:2] * 3), start=8)
    want = written.attend_at(x[2], x[2], x[2], start=13)
    torch.testing.assert_close(rewound.attend_at(x[2], x[2], x[2], start=13), want, rtol=0, atol=0)
    torch.testing.assert_close(rewound.key_block_sums[:, :, :4], written.key_block_sums[:, :, :4])


@pytest.mark.parametrize("backend", ["dense", "gather"])
def test_gradients_flow_through_the_current_chunk_of_a_cache(backend):
    """Training through the cache: attend / commit / attend runs, the history holds values (no
    graph), and the chunk's gradients are those of the stateless call (float64 gradcheck)."""
    config = OmniMemConfig(block_size=4, top_k=2, sink_tokens=4, local_tokens=4, backend=backend)
    cache = make_cache(config=config, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # a history of 3 committed chunks, each trained on first
        q, k, v = (
            torch.randn(1, 2, 8, 8, generator=gen, dtype=torch.float64).to(TEST_DEVICE).requires_grad_()
            for _ in range(3)
        )
        cache.attend(q, k, v).sum().backward()
        cache.commit(k, v)
        assert q.grad is not None and k.grad is not None and not cache.k.requires_grad
    q, k, v = (
        torch.randn(1, 2, 8, 8, generator=gen, dtype=torch.float64).to(TEST_DEVICE).requires_grad_()
        for _ in range(3)
    )
    torch.autograd.gradcheck(lambda q, k, v: cache.attend(q, k, v), (q, k, v))
    keys, values = torch.cat([cache.k[:, :, :24], k], 2), torch.cat([cache.v[:, :, :24], v], 2)
    want = sparse_attention(q, keys, values, history_len=24, config=config)
    torch.testing.assert_close(cache.attend(q, k, v), want, atol=1e-12, rtol=1e-12)


def test_a_training_rollout_through_the_cache_on_the_triton_backend():
    """Self-Forcing-style: each chunk trained through the cache with the Triton backward (fp32,
    head_dim 16 for the GPU's tensor cores), equal to the stateless dense call's gradients."""
    config = OmniMemConfig(block_size=4, top_k=2, sink_tokens=4, local_tokens=4, backend="triton")
    cache = make_cache(config=config, head_dim=16)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        ours = [torch.randn(1, 2, 8, 16, generator=gen).to(TEST_DEVICE).requires_grad_() for _ in range(3)]
        cache.attend(*ours).square().sum().backward()
        q, k, v = theirs = [x.detach().clone().requires_grad_() for x in ours]
        keys = torch.cat([cache.k[:, :, : 8 * step], k], 2)
        values = torch.cat([cache.v[:, :, : 8 * step], v], 2)
        dense = config.replace(backend="dense")
        sparse_attention(q, keys, values, history_len=8 * step, config=dense).square().sum().backward()
        for mine, reference in zip(ours, theirs, strict=True):
            torch.testing.assert_close(mine.grad, reference.grad, atol=1e-5, rtol=1e-4)
        cache.commit(ours[1].detach(), ours[2].detach())


@pytest.mark.parametrize("backend", ["dense", "gather", "triton"])
@pytest.mark.parametrize(
    "history, groups, layout", [(41, None, "bhld"), (3, 5, "blhd"), (29, 4, "bhld"), (32, None, "blhd")]
)
def test_training_attends_a_compact_copy_of_the_attended_history(
    backend, history, groups, layout, monkeypatch
):
    """With gradients the cache attends a compact copy of only the blocks the chunk selects
    (partial last block, query groups, GQA, both layouts, a history shorter than a block): the
    output and the gradients equal the stateless call over the whole history."""
    if backend == "triton" and TEST_DEVICE.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton kernels run on CUDA or under TRITON_INTERPRET=1")
    config = OmniMemConfig(block_size=4, top_k=2, sink_tokens=2, local_tokens=3, query_group_size=groups,
                           backend=backend)  # fmt: skip
    cache = OmniMemCache(64, max_chunk_tokens=10, batch=2, num_kv_heads=2, head_dim=16, config=config,
                         layout=layout, device=TEST_DEVICE)  # fmt: skip
    gen = torch.Generator().manual_seed(history)
    past = [torch.randn(2, 2, history, 16, generator=gen).to(TEST_DEVICE) for _ in range(2)]
    for start in range(0, history, 10):
        cache.commit(past[0][:, :, start : start + 10], past[1][:, :, start : start + 10])
    q = torch.randn(2, 4, 10, 16, generator=gen).to(TEST_DEVICE).requires_grad_()
    k, v = (torch.randn(2, 2, 10, 16, generator=gen).to(TEST_DEVICE).requires_grad_() for _ in range(2))
    import omnimem.sparse.cache

    lengths, original = [], omnimem.sparse.cache.sparse_attention

    def recording(q, k, v, **kw):
        lengths.append(k.shape[2])
        return original(q, k, v, **kw)

    monkeypatch.setattr(omnimem.sparse.cache, "sparse_attention", recording)
    out, lse = cache.attend(q, k, v, return_lse=True)
    if history >= 32 and groups is None:  # the selected blocks (a static bound), then the chunk
        assert len(lengths) == 1 and lengths[0] < history + 10
    theirs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    keys = torch.cat([cache.k[:, :, :history], theirs[1]], 2)
    values = torch.cat([cache.v[:, :, :history], theirs[2]], 2)
    want, want_lse = sparse_attention(
        theirs[0], keys, values, history_len=history, config=config, return_lse=True
    )
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-6, rtol=1e-5)
    d_out = torch.randn(out.shape, generator=gen).to(TEST_DEVICE)
    (out * d_out + lse[..., None]).sum().backward()
    (want * d_out + want_lse[..., None]).sum().backward()
    for mine, reference in zip((q, k, v), theirs, strict=True):
        torch.testing.assert_close(mine.grad, reference.grad, atol=1e-5, rtol=1e-4)


def test_one_backward_after_a_whole_rollout_through_the_cache():
    """Self-Forcing's order: every chunk attended with gradients and committed, then one
    backward over the whole video's loss; later writes do not disturb what autograd kept."""
    config = OmniMemConfig(block_size=4, top_k=2, sink_tokens=4, local_tokens=4, backend="gather")
    cache = make_cache(config=config, capacity=48)
    gen = torch.Generator().manual_seed(0)
    chunks = [[torch.randn(1, 2, 8, 8, generator=gen).to(TEST_DEVICE).requires_grad_() for _ in range(3)]
              for _ in range(4)]  # fmt: skip
    loss = 0
    for q, k, v in chunks:
        loss = loss + cache.attend(q, k, v).square().sum()
        cache.commit(k.detach(), v.detach())
    loss.backward()
    keys, values = cache.k[:, :, :32], cache.v[:, :, :32]
    for i, (q, k, v) in enumerate(chunks):
        theirs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        keys_i = torch.cat([keys[:, :, : 8 * i], theirs[1]], 2)
        values_i = torch.cat([values[:, :, : 8 * i], theirs[2]], 2)
        sparse_attention(
            theirs[0], keys_i, values_i, history_len=8 * i, config=config
        ).square().sum().backward()
        for mine, reference in zip((q, k, v), theirs, strict=True):
            torch.testing.assert_close(mine.grad, reference.grad, atol=1e-5, rtol=1e-4)


def test_an_offloaded_cache_refuses_gradients():
    cache = make_cache(offload=True)
    q = chunk(8).requires_grad_()
    with pytest.raises(
        ValueError, match="gradients through an offloaded or quantized cache are not supported"
    ):
        cache.attend(q, chunk(8), chunk(8))
    with torch.no_grad():
        cache.attend(q, chunk(8), chunk(8))


def test_a_refused_attend_leaves_the_current_chunk_alone():
    """attend_at writes a chunk; an attend refused for its q must not overwrite it (attend_at
    would later promote the other data as that chunk)."""
    cache = make_cache()
    cache.attend_at(chunk(8), chunk(8, seed=1), chunk(8, seed=2), start=0)
    before = cache.k.clone(), cache.v.clone(), cache.history_len, cache.chunk_len
    with pytest.raises(ValueError, match="q heads"):
        cache.attend(chunk(8, heads=3), chunk(8, seed=5), chunk(8, seed=6))
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        cache.attend(chunk(8), chunk(8, seed=5), chunk(8, seed=6), return_lse="yes")
    assert torch.equal(cache.k, before[0]) and torch.equal(cache.v, before[1])
    assert (cache.history_len, cache.chunk_len) == before[2:]


@pytest.mark.parametrize("kv_format", ["fp8", "int4"])
@pytest.mark.parametrize(
    ("backend", "layout", "groups", "offload"),
    [
        ("gather", "bhld", None, False),
        ("dense", "blhd", 3, False),
        ("triton", "bhld", None, False),
        ("triton", "blhd", 3, True),  # the staged bytes, read in place
        ("gather", "bhld", 2, True),
    ],
)
def test_quantized_history_equals_attention_over_dequantized_blocks(
    kv_format, backend, layout, groups, offload, poisoned_allocations
):
    """OmniMemCache(kv_format=...): every attend and attend_at equals the float64-checked
    backend over the history whose whole blocks are quantized then dequantized (the partial
    last block and the chunk native), with the selection of the native keys (block sums taken
    before quantization); chunks that straddle blocks, GQA, query groups, both layouts."""
    if backend == "triton" and TEST_DEVICE.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton kernels run on CUDA or under TRITON_INTERPRET=1")
    from .reference import stored_history

    config = OmniMemConfig(block_size=4, top_k=2, sink_tokens=4, local_tokens=6, backend=backend,
                           query_group_size=groups)  # fmt: skip
    d = 16 if backend == "triton" and TEST_DEVICE.type == "cuda" else 8  # tl.dot on GPUs: >= 16
    kw = dict(max_chunk_tokens=7, batch=2, num_kv_heads=2, head_dim=d, device=TEST_DEVICE, layout=layout)
    cache = OmniMemCache(64, **kw, config=config, kv_format=kv_format, offload=offload)
    gen = torch.Generator().manual_seed(5)
    keys, values = torch.zeros(2, 2, 0, d), torch.zeros(2, 2, 0, d)
    start = 0
    for length in (7, 5, 7, 3, 7, 6):
        for _ in range(2):  # a denoising pass, then the clean one: same start
            q = torch.randn(2, 4, length, d, generator=gen)
            k, v = torch.randn(2, 2, length, d, generator=gen), torch.randn(2, 2, length, d, generator=gen)
            got = cache.attend_at(*(x.to(TEST_DEVICE) for x in (q, k, v)), start=start)
            stored = [
                stored_history(x, start, kv_format, r, 4) for x, r in ((keys, "key"), (values, "value"))
            ]
            k_all, v_all = torch.cat([keys, k], 2), torch.cat([values, v], 2)
            selection = select_blocks(q, k_all, history_len=start, config=config.replace(backend="dense"))
            want = sparse_attention(
                q.double(), torch.cat([stored[0], k], 2).double(), torch.cat([stored[1], v], 2).double(),
                history_len=start, config=config.replace(backend="dense"), selection=selection,
            )  # fmt: skip
            torch.testing.assert_close(got.double().cpu(), want, atol=2e-5, rtol=1e-4)
        keys, values, start = k_all, v_all, start + length
    native = sparse_attention(q.double(), k_all.double(), v_all.double(), history_len=start - length,
                              config=config.replace(backend="dense"), selection=selection)  # fmt: skip
    assert (native - want).abs().max() > 1e-4  # the quantized history changed what was read
    assert cache.k.untyped_storage().nbytes() <= 4 and f"{cache.kv_format}" == kv_format
    with pytest.raises(ValueError, match=f"kv_format='{kv_format}'"):
        cache.rewind(3)
    cache.reset()
    cache.attend_at(*(x[:, :, :5].to(TEST_DEVICE) for x in (q, k, v)), start=0)


@pytest.mark.parametrize("kv_format", ["fp8", "int4"])
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("end", [16, 13, 8])
def test_a_quantized_cache_rewinds_exactly_where_it_keeps_native_tokens(
    kv_format, offload, end, poisoned_allocations
):
    """rewind into the current chunk (16), into the partial last block the cache keeps natively
    (13: history 14, blocks of 4) or to a block boundary (8) gives what writing only the kept
    tokens gives, bit for bit (gather); a cut inside a quantized block is refused before
    anything changes."""
    config = OmniMemConfig(block_size=4, top_k=2, sink_tokens=4, local_tokens=4, backend="gather")
    kw = dict(max_chunk_tokens=7, batch=1, num_kv_heads=2, head_dim=8, device=TEST_DEVICE, config=config,
              kv_format=kv_format, offload=offload)  # fmt: skip
    tokens = [chunk(7, seed=1), chunk(7, seed=2), chunk(5, seed=3)]
    rewound = OmniMemCache(40, **kw)
    for start, x in zip((0, 7, 14), tokens, strict=True):
        rewound.attend_at(x, x, x, start=start)
    assert (rewound.history_len, rewound.chunk_len) == (14, 5)
    with pytest.raises(
        ValueError, match=r"rewind\(6\) cuts block 1, which a kv_format=.* keeps only quantized"
    ):
        rewound.rewind(6)
    assert (rewound.history_len, rewound.chunk_len) == (14, 5)
    rewound.rewind(end)
    kept = torch.cat(tokens, dim=2)[:, :, :end]
    written = OmniMemCache(40, **kw)
    for start in range(0, end, 7):
        part = kept[:, :, start : min(start + 7, end)]
        written.commit(part, part)
    assert rewound.history_len == written.history_len == end
    blocks = -(-end // 4)  # the cut block's sum over its kept tokens only
    torch.testing.assert_close(rewound.key_block_sums[:, :, :blocks], written.key_block_sums[:, :, :blocks])
    nxt = chunk(6, seed=4)
    torch.testing.assert_close(
        rewound.attend_at(nxt, nxt, nxt, start=end),
        written.attend_at(nxt, nxt, nxt, start=end),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("kv_format", ["fp8", "int4"])
@pytest.mark.parametrize(("offload", "index_format"), [(False, "float32"), (True, "int8")])
def test_a_quantized_cache_saves_and_restores_what_it_holds(
    kv_format, offload, index_format, poisoned_allocations
):
    """state_dict of a quantized cache: its whole blocks' bytes, its native partial block and
    its block sums; a fresh cache that loads it attends the next chunk bit for bit as the
    original (gather). A refused load (another format, other shapes, an uncopyable tensor)
    changes nothing."""
    config = OmniMemConfig(block_size=4, top_k=2, sink_tokens=4, local_tokens=4, backend="gather")
    kw = dict(max_chunk_tokens=7, batch=1, num_kv_heads=2, head_dim=8, device=TEST_DEVICE, config=config,
              kv_format=kv_format, offload=offload, index_format=index_format)  # fmt: skip
    cache = OmniMemCache(40, **kw)
    for start, length in ((0, 7), (7, 7), (14, 5)):
        x = chunk(length, seed=start)
        cache.attend_at(x, x, x, start=start)
    cache.commit(chunk(3, seed=99), chunk(3, seed=98))  # replaces the chunk: history 17 (a partial block)
    state = cache.state_dict()
    assert state["kv_format"] == kv_format and state["history_len"] == 17
    restored = OmniMemCache(40, **kw)
    restored.load_state_dict(state)
    nxt = chunk(6, seed=4)
    torch.testing.assert_close(
        restored.attend_at(nxt, nxt, nxt, start=17), cache.attend_at(nxt, nxt, nxt, start=17), rtol=0, atol=0
    )
    other = OmniMemCache(40, **{**kw, "kv_format": "int4" if kv_format == "fp8" else "fp8"})
    bad_shape = {**state, "partial": [torch.cat([t, t], 2) for t in state["partial"]]}
    meta = {**state, "blocks": [t.to("meta") for t in state["blocks"]]}
    for bad, match in (
        (state, "this cache"),
        (bad_shape, r"state\['partial'\] must be a tensor of shape"),
        (meta, r"state\['blocks'\] cannot be copied"),
        (dict(k=1, v=2, history_len=3), "state has kv_format='native'"),
    ):
        target = other if bad is state else restored
        before = target.history_len
        with pytest.raises(ValueError, match=match):
            target.load_state_dict(bad)
        assert target.history_len == before
    with pytest.raises(ValueError, match="state has kv_format='int4'"):
        make_cache().load_state_dict({**state, "kv_format": "int4"})


def test_quantized_cache_validation():
    with pytest.raises(ValueError, match="OmniMemCache kv_format must be one of"):
        make_cache(kv_format="nf4")
    with pytest.raises(ValueError, match="cuda_graphs=True is not supported yet"):
        make_cache(kv_format="fp8", cuda_graphs=True)
    if TEST_DEVICE.type == "cpu":  # the in-place kernel refuses what the triton backend refuses
        triton_config = OmniMemConfig(block_size=4, top_k=2, sink_tokens=4, local_tokens=4, backend="triton")
        cache = make_cache(kv_format="int4", config=triton_config, dtype=torch.bfloat16)
        q = chunk(4).to(torch.bfloat16)
        with pytest.raises(ValueError, match=r"cannot run bfloat16|needs CUDA tensors"):
            cache.attend(q, q, q)
