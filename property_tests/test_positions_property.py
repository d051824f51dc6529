"""``OmniMemCache(positions=RelativeTime(...))`` against the float64 rule
(``tests.reference.relative_attention_reference``) over random rollouts: frame sizes that do
and do not divide the blocks (1..9 tokens a frame; blocks of 3, 4, 7, 30), chunks of any length,
sinks, windows, budgets, GQA, query groups, head dims with 1..5 temporal pairs, empty and tiny
histories, resident and offloaded, native / fp8 / int4 history, backends, float64 and float32."""

from __future__ import annotations

import os

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnimem import OmniMemConfig
from omnimem.gated.wan import wan_rope_freqs
from omnimem.positions import RelativeTime, wan_time_table
from omnimem.sparse.cache import OmniMemCache
from tests.inputs import TEST_DEVICE
from tests.reference import relative_attention_reference, stored_history

from .conftest import examples

TRITON = TEST_DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@st.composite
def cases(draw):
    kv_heads = draw(st.integers(1, 2))
    bs = draw(st.sampled_from([3, 4, 7, 30]))
    backend = draw(st.sampled_from(["dense", "gather"] + (["triton"] if TRITON else [])))
    config = OmniMemConfig(
        block_size=bs, top_k=draw(st.integers(1, 4)), sink_tokens=draw(st.integers(0, 2)) * bs,
        local_tokens=draw(st.integers(0, 16)), query_group_size=draw(st.sampled_from([None, 3, 7])),
        backend=backend,
    )  # fmt: skip
    return dict(
        kv_heads=kv_heads,
        q_heads=kv_heads * draw(st.sampled_from([1, 2])),
        head_dim=draw(st.sampled_from([6, 8, 12, 16])),
        frame_tokens=draw(st.integers(1, 9)),
        lengths=draw(st.lists(st.integers(1, 12), min_size=1, max_size=8)),
        config=config,
        dtype=torch.float32 if backend == "triton" else draw(st.sampled_from([torch.float64, torch.float32])),
        offload=draw(st.booleans()),
        kv_format=draw(st.sampled_from(["native", "native", "fp8", "int4"])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=examples(40))
@given(case=cases())
def test_relative_cache_equals_the_rule(case):
    time = RelativeTime(wan_time_table(wan_rope_freqs(case["head_dim"], positions=512)), case["frame_tokens"])
    dtype, heads, dim, kv_format = case["dtype"], case["kv_heads"], case["head_dim"], case["kv_format"]
    if kv_format != "native":
        dtype = torch.float32
    cache = OmniMemCache(
        sum(case["lengths"]), max_chunk_tokens=12, batch=1, num_kv_heads=heads, head_dim=dim,
        config=case["config"], dtype=dtype, device=TEST_DEVICE, positions=time, offload=case["offload"],
        kv_format=kv_format,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(case["seed"])
    keys, values, start = [], [], 0
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-4)
    for length in case["lengths"]:
        q = torch.randn(1, case["q_heads"], length, dim, generator=gen, dtype=torch.float64)
        k, v = (torch.randn(1, heads, length, dim, generator=gen, dtype=torch.float64) for _ in "kv")
        for _ in range(2):  # a denoising pass, then the clean one
            out = cache.attend_at(*(x.to(TEST_DEVICE, dtype) for x in (q, k, v)), start=start)
        keys.append(k.to(dtype)), values.append(v.to(dtype))
        native_k, native_v = torch.cat(keys, 2), torch.cat(values, 2)
        stored_k, stored_v = native_k, native_v
        if kv_format != "native":  # what the cache reads back: whole history blocks quantized
            bs = case["config"].block_size
            stored_k = stored_history(native_k, start, kv_format, "key", bs)
            stored_v = stored_history(native_v, start, kv_format, "value", bs)
        want = relative_attention_reference(
            q.to(dtype), stored_k, stored_v, history=start, chunk_len=length, config=case["config"],
            time=time, k_select=native_k,
        )  # fmt: skip
        torch.testing.assert_close(out.cpu().double(), want, **tol)
        start += length
