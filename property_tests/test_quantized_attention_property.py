"""The kernel that reads a quantized history in place (``backends/quantized_attention.py``)
against the float64 dense reference over the history it stands for (dequantized whole blocks,
then the native tail): fp8 and int4, block sizes 3 / 5 / 7 / 16, odd head dims, GQA, query
groups, partial last blocks, empty histories, both tail layouts. Store slots past the history
and tail rows past the chunk are NaN: data never attended must not reach an output. On Hopper
the Gluon kernel (``kernel="gluon"``) over its shapes as well, with fp8 key products too
(``FP8_KEY_PRODUCTS``, against their twin, ``fp8_key_products=True``, itself held here to a
query-by-query float64 computation)."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnimem import OmniMemConfig, select_blocks
from omnimem.backends.quantized_attention import (
    fp8_queries,
    quantized_attention,
    quantized_attention_reference,
)
from omnimem.backends.triton import tile_tables
from omnimem.store.blocks import QuantizedBlocks
from tests.inputs import ON_HOPPER, TEST_DEVICE

from .conftest import examples


@st.composite
def cases(draw):
    kv_heads = draw(st.integers(1, 2))
    bs = draw(st.sampled_from([3, 5, 7, 16]))
    return dict(
        kv_format=draw(st.sampled_from(["fp8", "int4"])),
        block_size=bs,
        batch=draw(st.integers(1, 2)),
        kv_heads=kv_heads,
        q_heads=kv_heads * draw(st.sampled_from([1, 2])),
        head_dim=draw(st.sampled_from([8, 9, 16, 24])),
        history_len=draw(st.integers(0, 8 * bs + 3)),
        chunk_len=draw(st.integers(1, 20)),
        groups=draw(st.sampled_from([None, 3, 7])),
        top_k=draw(st.integers(1, 4)),
        flash_layout=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _poisoned_store(case, k, v, whole):
    """A store holding the first ``whole`` tokens' blocks; every other slot NaN."""
    bs = case["block_size"]
    store = QuantizedBlocks(
        case["kv_format"], batch=case["batch"], num_kv_heads=case["kv_heads"], capacity=whole + 2 * bs,
        head_dim=case["head_dim"], block_size=bs, device=k.device,
    )  # fmt: skip
    nan = float("nan")
    for scale in (store.k_scale, store.v_scale, store.k_min, store.v_min):
        if scale is not None:
            scale.fill_(nan)
    if store.kv_format == "fp8":
        store.k.view(torch.uint8).fill_(0x7F)  # e4m3fn NaN
        store.v.view(torch.uint8).fill_(0x7F)
    if whole:
        store.write(0, k[:, :, :whole], v[:, :, :whole])
    return store


@settings(max_examples=examples(40))
@given(case=cases())
def test_quantized_attention_equals_the_float64_reference(case):
    _check(case, dtype=torch.float32, block_m=16, tail_poison=float("nan"), tol=dict(atol=2e-5, rtol=1e-4))


@st.composite
def hopper_cases(draw):
    """Shapes the Hopper Gluon kernel takes (head_dim 64/128, blocks of 128/256, one group)."""
    kv_heads = draw(st.integers(1, 2))
    bs = draw(st.sampled_from([128, 256]))
    return dict(
        kv_format=draw(st.sampled_from(["fp8", "int4"])), block_size=bs, batch=draw(st.integers(1, 2)),
        kv_heads=kv_heads, q_heads=kv_heads * draw(st.sampled_from([1, 2])),
        head_dim=draw(st.sampled_from([64, 128])), history_len=draw(st.integers(0, 6 * bs + 3)),
        chunk_len=draw(st.integers(1, 300)), groups=None, top_k=draw(st.integers(1, 4)),
        flash_layout=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
    )  # fmt: skip


@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon kernel runs on Hopper GPUs only")
@settings(max_examples=examples(20))
@given(case=hopper_cases(), dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       int4_in_place=st.booleans())  # fmt: skip
def test_hopper_kernel_over_a_quantized_history_equals_the_float64_reference(case, dtype, int4_in_place):
    """``kernel="gluon"``: its producer warpgroup's decoding and the consumers' half-precision
    products against the float64 reference on the dequantized history (int4 also in three
    stages, ``INT4_THREE_STAGES``). Tail rows past the chunk hold finite junk: the kernel's 2-D
    TMA view reads them and masks their scores, so NaN there would reach the output through
    0 x NaN (docs/memory.md; the caches' tails are exact-length)."""
    from omnimem.backends import gluon_attention

    with mock.patch.object(gluon_attention, "INT4_THREE_STAGES", int4_in_place):
        _check(case, dtype=dtype, block_m=128, tail_poison=1.0e3, tol=dict(atol=2e-2, rtol=2e-2),
               kernel="gluon")  # fmt: skip


@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon kernel runs on Hopper GPUs only")
@settings(max_examples=examples(20))
@given(case=hopper_cases(), dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       three_stages=st.booleans())  # fmt: skip
def test_hopper_fp8_key_products_equal_their_float64_twin(case, dtype, three_stages):
    """``FP8_KEY_PRODUCTS``: fp8 key codes multiplied as stored by e4m3 queries, against the
    twin that scores the whole blocks with ``fp8_queries``; with ``FP8_THREE_STAGES`` too."""
    from omnimem.backends import gluon_attention

    with (
        mock.patch.object(gluon_attention, "FP8_KEY_PRODUCTS", True),
        mock.patch.object(gluon_attention, "FP8_THREE_STAGES", three_stages),
    ):
        _check(dict(case, kv_format="fp8"), dtype=dtype, block_m=128, tail_poison=1.0e3,
               tol=dict(atol=2e-2, rtol=2e-2), kernel="gluon", fp8_key_products=True)  # fmt: skip


@settings(max_examples=examples(25), deadline=None)
@given(case=cases())
def test_the_fp8_key_products_twin_is_their_query_by_query_arithmetic(case):
    """``quantized_attention_reference(..., fp8_key_products=True)`` (one dense call over
    widened queries and keys) against the arithmetic it stands for, query by query in float64:
    the store's whole blocks scored with ``fp8_queries(q)``, the tail with ``q``, a softmax over
    the selected keys. The flag changes the output wherever a whole block is attended."""
    from omnimem.backends.dense import attended_token_mask
    from omnimem.backends.quantized_attention import dequantized_history

    case = dict(case, kv_format="fp8", groups=None)
    bs, history, chunk = case["block_size"], case["history_len"], case["chunk_len"]
    gen = torch.Generator().manual_seed(case["seed"])
    shape = (case["batch"], case["kv_heads"], history + chunk, case["head_dim"])
    k, v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    q = torch.randn(case["batch"], case["q_heads"], chunk, case["head_dim"], generator=gen).double()
    whole = history // bs * bs
    store = _poisoned_store(case, k, v, whole)
    config = OmniMemConfig(block_size=bs, top_k=case["top_k"], sink_tokens=bs, local_tokens=bs + 1,
                           backend="dense")  # fmt: skip
    selection = select_blocks(q.float(), k, history_len=history, config=config)
    scale = case["head_dim"] ** -0.5
    tail_k, tail_v = k[:, :, whole:], v[:, :, whole:]
    got = quantized_attention_reference(q, store, tail_k, tail_v, selection, history_len=history,
                                        chunk_len=chunk, scale=scale, fp8_key_products=True)  # fmt: skip
    kd, vd = dequantized_history(store, tail_k, tail_v, history_len=history, dtype=torch.float64)
    mask = attended_token_mask(selection, num_q_heads=case["q_heads"], q_len=chunk, kv_len=history + chunk,
                               chunk_len=chunk)  # fmt: skip
    q8 = fp8_queries(q)
    want = torch.empty_like(got)
    per_kv = case["q_heads"] // case["kv_heads"]
    for b in range(case["batch"]):
        for h in range(case["q_heads"]):
            for i in range(chunk):
                keys, values = kd[b, h // per_kv], vd[b, h // per_kv]
                s = torch.cat([keys[:whole] @ q8[b, h, i], keys[whole:] @ q[b, h, i]]) * scale
                p = torch.softmax(s.masked_fill(~mask[b, h, i], float("-inf")), 0)
                want[b, h, i] = p @ values
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    plain = quantized_attention_reference(q, store, tail_k, tail_v, selection, history_len=history,
                                          chunk_len=chunk, scale=scale)  # fmt: skip
    if mask[..., :whole].any():
        assert not torch.equal(plain, got)


def _check(case, *, dtype, block_m, tail_poison, tol, fp8_key_products=False, **kernel):
    """``quantized_attention`` (``kernel``: its keyword) on ``case`` in ``dtype`` against the
    float64 reference (``fp8_key_products``: its twin of the kernel's fp8 key products); tail
    rows past the chunk hold ``tail_poison``."""
    bs, history, chunk = case["block_size"], case["history_len"], case["chunk_len"]
    gen = torch.Generator().manual_seed(case["seed"])
    shape = (case["batch"], case["kv_heads"], history + chunk, case["head_dim"])
    k, v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    q = torch.randn(case["batch"], case["q_heads"], chunk, case["head_dim"], generator=gen)
    k, v, q = (x.to(TEST_DEVICE, dtype) for x in (k, v, q))
    whole = history // bs * bs
    store = _poisoned_store(case, k, v, whole)

    def tail(x):  # [partial | chunk | poisoned rows], in either layout
        rows = torch.cat([x[:, :, whole:], torch.full_like(x[:, :, :3], tail_poison)], dim=2)
        return rows.transpose(1, 2).contiguous().transpose(1, 2) if case["flash_layout"] else rows

    tail_k, tail_v = tail(k), tail(v)
    config = OmniMemConfig(block_size=bs, top_k=case["top_k"], sink_tokens=bs, local_tokens=bs + 1,
                           query_group_size=case["groups"], backend="dense")  # fmt: skip
    selection = select_blocks(q, k, history_len=history, config=config)  # native keys
    block_idx, num_blocks = tile_tables(selection, q_len=chunk, block_m=block_m)
    grouped = selection.num_query_groups > 1
    scale = case["head_dim"] ** -0.5
    got, lse = quantized_attention(
        q, store, tail_k, tail_v, block_idx=block_idx, num_blocks=num_blocks,
        block_attended=selection.attended_block_mask() if grouped else None, history_len=history,
        chunk_len=chunk, query_group_size=selection.query_group_size, scale=scale, return_lse=True,
        block_m=block_m, **kernel,
    )  # fmt: skip
    want, want_lse = quantized_attention_reference(
        q.double(), store, tail_k, tail_v, selection, history_len=history, chunk_len=chunk, scale=scale,
        return_lse=True, fp8_key_products=fp8_key_products,
    )  # fmt: skip
    torch.testing.assert_close(got.double(), want, **tol)
    torch.testing.assert_close(lse.double(), want_lse.double(), **tol)
    assert math.isfinite(got.abs().max().item())
