"""Compiled FlexAttention on fixed shape classes (one compile each), random everything else.

Random shapes would compile once per example (~5-20 s on CPU); a class fixes the buffer shapes
and draws history length, retrieval config and data, which is exactly what varies in an AR loop.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from omnimem import sparse_attention

from .cases import Case, retrieval_configs
from .test_backends_property import TOLERANCE, relative_error

BUFFER_HISTORY = 160
SHAPE_CLASSES = {
    "gqa": (dict(batch=1, q_heads=4, kv_heads=2, q_len=24, head_dim=16), dict(block_size=16)),
    "groups": (
        dict(batch=2, q_heads=3, kv_heads=3, q_len=20, head_dim=32),
        dict(block_size=32, query_group_size=8),
    ),
}


@pytest.mark.compile
@pytest.mark.parametrize("shape_class", list(SHAPE_CLASSES))
@settings(max_examples=12)
@given(data=st.data())
def test_compiled_flex_matches_reference(shape_class, data):
    shape, fixed = SHAPE_CLASSES[shape_class]
    history_len = data.draw(st.integers(0, BUFFER_HISTORY), label="history_len")
    config = {**data.draw(retrieval_configs(), label="config"), **fixed}
    case = Case(
        shape={**shape, "unwritten": BUFFER_HISTORY - history_len, "seed": data.draw(st.integers(0, 99))},
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
