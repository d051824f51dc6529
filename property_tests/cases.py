"""Hypothesis strategies: random attention calls over the whole configuration space."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

from tests.inputs import TEST_DEVICE, make_inputs
from tests.reference import ReferenceResult, reference_attention


@dataclass
class Case:
    shape: dict
    config: dict
    history_len: int
    chunk_len: int | None
    dtype: torch.dtype = torch.float32
    inputs: tuple = field(default=(), repr=False)

    def make(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.inputs:
            self.inputs = make_inputs(
                **self.shape, history_len=self.history_len, chunk_len=self.chunk_len, dtype=self.dtype
            )
        return self.inputs

    def reference(self) -> ReferenceResult:
        q, k, v = self.make()
        return reference_attention(
            q, k, v, history_len=self.history_len, chunk_len=self.chunk_len, **self.config
        )


@st.composite
def retrieval_configs(draw) -> dict:
    local = draw(st.sampled_from([0, 0, 3, 8, 16, 40]))
    return dict(
        block_size=draw(st.sampled_from([1, 2, 3, 4, 8, 16])),
        top_k=draw(st.integers(1, 8)),
        sink_tokens=draw(st.sampled_from([0, 0, 1, 5, 16])),
        local_tokens=local,
        exclusion_tokens=draw(st.one_of(st.none(), st.integers(local, local + 40))),
        window_exclusion=draw(st.sampled_from(["adaptive", "always", "never"])),
        query_group_size=draw(st.one_of(st.none(), st.none(), st.integers(1, 12))),
    )


@st.composite
def attention_cases(draw, dtypes=(torch.float32,)) -> Case:
    kv_heads = draw(st.integers(1, 3))
    chunk_len = draw(st.one_of(st.none(), st.integers(1, 20)))
    shape = dict(
        batch=draw(st.integers(1, 2)),
        kv_heads=kv_heads,
        q_heads=kv_heads * draw(st.sampled_from([1, 1, 2, 3])),
        head_dim=draw(st.sampled_from([4, 8, 16, 32])),
        q_len=draw(st.integers(1, 20)),
        unwritten=draw(st.sampled_from([0, 0, 1, 7])),
        flash_layout=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        device=TEST_DEVICE,
    )
    return Case(
        shape=shape,
        config=draw(retrieval_configs()),
        history_len=draw(st.one_of(st.integers(0, 4), st.integers(0, 120))),
        chunk_len=chunk_len,
        dtype=draw(st.sampled_from(dtypes)),
    )


@st.composite
def hopper_cases(draw) -> Case:
    """Calls the Hopper Gluon kernel takes (16-bit, head_dim 64/128, blocks of 128/256 tokens,
    one query group), with partial blocks, partial tiles and short or empty histories."""
    kv_heads = draw(st.integers(1, 2))
    local = draw(st.sampled_from([0, 200, 600]))
    config = dict(
        block_size=draw(st.sampled_from([128, 256])),
        top_k=draw(st.integers(1, 8)),
        sink_tokens=draw(st.sampled_from([0, 128, 300])),
        local_tokens=local,
        exclusion_tokens=draw(st.one_of(st.none(), st.integers(local, local + 500))),
        window_exclusion=draw(st.sampled_from(["adaptive", "always", "never"])),
    )
    shape = dict(
        batch=draw(st.integers(1, 2)),
        kv_heads=kv_heads,
        q_heads=kv_heads * draw(st.sampled_from([1, 2])),
        head_dim=draw(st.sampled_from([64, 128])),
        q_len=draw(st.integers(1, 300)),
        unwritten=draw(st.sampled_from([0, 64])),
        flash_layout=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        device=TEST_DEVICE,
    )
    return Case(
        shape=shape,
        config=config,
        history_len=draw(st.one_of(st.integers(0, 300), st.integers(0, 3000))),
        chunk_len=draw(st.one_of(st.none(), st.integers(1, 300))),
        dtype=draw(st.sampled_from([torch.bfloat16, torch.float16])),
    )
