"""Compiled FlexAttention (and, on GPUs, compiled selection and planning) on fixed classes.

A class fixes what a model fixes (buffer shapes and retrieval config), so it compiles once;
each example draws what changes during an AR rollout: the history length and the data.
Random shapes and configs are covered eagerly in test_backends_property.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from omnimem import sparse_attention

from .cases import Case
from .conftest import examples
from .test_backends_property import TOLERANCE, relative_error

BUFFER_HISTORY = 160
SHAPE_CLASSES = {
    "gqa": (
        dict(batch=1, q_heads=4, kv_heads=2, q_len=24, head_dim=16),
        dict(block_size=16, top_k=3, sink_tokens=5, local_tokens=24, window_exclusion="adaptive"),
    ),
    "groups": (
        dict(batch=2, q_heads=3, kv_heads=3, q_len=20, head_dim=32),
        dict(
            block_size=32,
            top_k=2,
            local_tokens=32,
            exclusion_tokens=64,
            query_group_size=8,
            window_exclusion="never",
        ),
    ),
    "always": (
        dict(batch=1, q_heads=2, kv_heads=1, q_len=33, head_dim=16, flash_layout=True),
        dict(block_size=16, top_k=4, sink_tokens=16, local_tokens=16, window_exclusion="always"),
    ),
    # The whole buffer is one short key tile (72 < 128 tokens): the CPU template's tail case.
    "one-tile": (
        dict(batch=1, q_heads=2, kv_heads=2, q_len=8, head_dim=16),
        dict(block_size=8, top_k=2, sink_tokens=8, local_tokens=8),
    ),
}
OWN_BUFFER_HISTORY = {"one-tile": 64}  # other classes: BUFFER_HISTORY


@pytest.mark.compile
@pytest.mark.parametrize("shape_class", list(SHAPE_CLASSES))
@settings(max_examples=examples(10))
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_compiled_flex_matches_reference(shape_class, data, seed):
    shape, config = SHAPE_CLASSES[shape_class]
    buffer_history = OWN_BUFFER_HISTORY.get(shape_class, BUFFER_HISTORY)
    history_len = data.draw(st.integers(0, buffer_history), label="history_len")
    case = Case(
        shape={**shape, "unwritten": buffer_history - history_len, "seed": seed},
        config=config,
        history_len=history_len,
        chunk_len=None,
        dtype=torch.float32,
    )
    q, k, v = case.make()
    ref = case.reference()
    assume(ref.margin > 1e-4)
    out = sparse_attention(q, k, v, history_len=history_len, backend="flex", compile=True, **config)
    assert relative_error(out, ref.out) < TOLERANCE[torch.float32]
