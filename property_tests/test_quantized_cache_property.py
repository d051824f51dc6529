"""Both caches with a quantized history (``kv_format="fp8" | "int4"``) against the float64
references over random rollouts: block sizes 3 / 5 / 7, odd head dims (int4 pads a channel),
GQA, query groups, chunks that straddle blocks, both layouts, the authors' candidates. Each call
equals the reference over the history as the cache stores it (``tests.reference.stored_history``),
with selection from the native keys."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnimem import GatedCache, OmniMemConfig, select_blocks, sparse_attention
from omnimem.sparse.cache import OmniMemCache
from tests.inputs import TEST_DEVICE
from tests.reference import stored_history
from tests.reference_gated import reference_gated_attention

from .conftest import examples


@st.composite
def rollouts(draw):
    kv_heads = draw(st.integers(1, 2))
    return dict(
        kv_format=draw(st.sampled_from(["fp8", "int4"])),
        block_size=draw(st.sampled_from([3, 5, 7])),
        kv_heads=kv_heads,
        q_heads=kv_heads * draw(st.sampled_from([1, 2])),
        head_dim=draw(st.sampled_from([8, 9, 16])),
        lengths=draw(st.lists(st.integers(1, 9), min_size=2, max_size=8)),
        layout=draw(st.sampled_from(["bhld", "blhd"])),
        seed=draw(st.integers(0, 2**16)),
    )


def _chunk(gen, case, length):
    q = torch.randn(1, case["q_heads"], length, case["head_dim"], generator=gen)
    k, v = (torch.randn(1, case["kv_heads"], length, case["head_dim"], generator=gen) for _ in range(2))
    return q, k, v


@settings(max_examples=examples(12))
@given(
    case=rollouts(),
    groups=st.sampled_from([None, 2]),
    local=st.integers(0, 8),
    backend=st.sampled_from(["gather", "triton"]),  # triton: the kernel reading the bytes in place
    offload=st.booleans(),  # the quantized bytes in host memory, staged per call
)
def test_quantized_omnimem_cache_equals_the_reference(case, groups, local, backend, offload):
    bs = case["block_size"]
    if backend == "triton" and TEST_DEVICE.type == "cuda":
        case = {**case, "head_dim": max(case["head_dim"], 16)}  # tl.dot on GPUs: check_inputs refuses less
    config = OmniMemConfig(block_size=bs, top_k=2, sink_tokens=bs, local_tokens=local, backend=backend,
                           query_group_size=groups)  # fmt: skip
    dense = config.replace(backend="dense")
    cache = OmniMemCache(
        80, max_chunk_tokens=9, batch=1, num_kv_heads=case["kv_heads"], head_dim=case["head_dim"],
        config=config, device=TEST_DEVICE, layout=case["layout"], kv_format=case["kv_format"],
        offload=offload,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(case["seed"])
    keys = values = torch.zeros(1, case["kv_heads"], 0, case["head_dim"])
    start = 0
    for length in case["lengths"]:
        q, k, v = _chunk(gen, case, length)
        got = cache.attend_at(*(x.to(TEST_DEVICE) for x in (q, k, v)), start=start)
        read_k, read_v = (
            stored_history(x, start, case["kv_format"], r, bs) for x, r in ((keys, "key"), (values, "value"))
        )
        k_all, v_all = torch.cat([keys, k], 2), torch.cat([values, v], 2)
        selection = select_blocks(q, k_all, history_len=start, config=dense)  # native keys
        want = sparse_attention(
            q.double(), torch.cat([read_k, k], 2).double(), torch.cat([read_v, v], 2).double(),
            history_len=start, config=dense, selection=selection,
        )  # fmt: skip
        torch.testing.assert_close(got.double().cpu(), want, atol=2e-5, rtol=1e-4)
        keys, values, start = k_all, v_all, start + length


@settings(max_examples=examples(12))
@given(
    case=rollouts(),
    window=st.integers(1, 20),
    candidates=st.sampled_from(["chunks", "all", "awe"]),
    backend=st.sampled_from(["gather", "triton"]),  # triton: the selected kernel reads the bytes in place
    offload=st.booleans(),
)
def test_quantized_gated_cache_equals_the_reference(case, window, candidates, backend, offload):
    bs = case["block_size"]
    rules = dict(block_size=bs, query_group_size=2, top_k=2, window_tokens=window, candidates=candidates,
                 exclude_window_chunks=2)  # fmt: skip
    cache = GatedCache(
        80, batch=1, num_kv_heads=case["kv_heads"], head_dim=case["head_dim"], device=TEST_DEVICE,
        layout=case["layout"], backend=backend, kv_format=case["kv_format"], max_chunk_tokens=9,
        offload=offload, **rules,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(case["seed"])
    keys = values = torch.zeros(1, case["kv_heads"], 0, case["head_dim"])
    start = 0
    for length in case["lengths"]:
        q, k, v = _chunk(gen, case, length)
        gates = torch.rand(1, case["q_heads"], length, 3, generator=gen)
        got = cache.attend(*(x.to(TEST_DEVICE) for x in (q, k, v, gates)), start=start)
        k_all, v_all = torch.cat([keys, k], 2), torch.cat([values, v], 2)
        live = cache._live_start(start, start + length)
        ref = reference_gated_attention(
            q, k_all, v_all, gates, history_len=start, **rules,
            selected_k=stored_history(k_all, live, case["kv_format"], "key", bs),
            selected_v=stored_history(v_all, live, case["kv_format"], "value", bs),
        )  # fmt: skip
        if ref.margin > 1e-5:  # a near-tie may rank differently in float32
            torch.testing.assert_close(got.double().cpu(), ref.out, atol=2e-5, rtol=1e-4)
        keys, values, start = k_all, v_all, start + length
