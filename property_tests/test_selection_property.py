"""The selection equals a brute-force per-block re-implementation of DESIGN.md section 2."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from omnimem import select_blocks
from tests.inputs import TEST_DEVICE, exact_queries_and_keys

from .cases import Case, attention_cases
from .conftest import examples


@given(attention_cases(dtypes=(torch.float32, torch.bfloat16)))
def test_selection_matches_brute_force(case: Case):
    q, k, _v = case.make()
    ref = case.reference()
    assume(ref.margin > 1e-4)  # float32 vs float64 scores may order a near-tie differently
    sel = select_blocks(
        q, k, history_len=case.history_len, chunk_len=case.chunk_len, compile=False, **case.config
    )
    idx, num = sel.kv_block_idx.cpu(), sel.kv_num_blocks.cpu()
    ranked = sel.selected_block_idx.cpu()
    for (b, h, g), blocks in ref.attended_blocks.items():
        assert idx[b, h, g, : num[b, h, g]].tolist() == blocks
        assert (idx[b, h, g, num[b, h, g] :] == -1).all()
        chosen = ref.selected_blocks[b, h, g]
        assert ranked[b, h, g, : len(chosen)].tolist() == chosen
        assert (ranked[b, h, g, len(chosen) :] == -1).all()


@settings(max_examples=examples(15))
@given(
    num_blocks=st.integers(1, 300),
    history_fraction=st.floats(0, 1),
    block_size=st.sampled_from([1, 4, 16]),
    top_k=st.integers(1, 40),
    sink_blocks=st.integers(0, 12),
    local_blocks=st.integers(0, 12),
    extra_exclusion=st.integers(0, 8),
    mode=st.sampled_from(["never", "always", "adaptive"]),
    misalign=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_block_tables_kernels_match_torch_tables(
    num_blocks,
    history_fraction,
    block_size,
    top_k,
    sink_blocks,
    local_blocks,
    extra_exclusion,
    mode,
    misalign,
    seed,
):
    """The Triton top-k and table kernels (CPU: the Triton interpreter) give the torch path's
    tables bit for bit, for random window rules over few distinct scores (many ties)."""
    pytest.importorskip("triton")
    from omnimem import OmniMemConfig
    from omnimem.selection import RetrievalRules, selection_tables, triton_selection_tables

    local_tokens = max(local_blocks * block_size - misalign, 0)
    rules = RetrievalRules.from_config(
        OmniMemConfig(
            block_size=block_size, top_k=top_k, sink_tokens=max(sink_blocks * block_size - misalign, 0),
            local_tokens=local_tokens, exclusion_tokens=local_tokens + extra_exclusion * block_size,
            window_exclusion=mode,
        )
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(-3, 4, (1, 2, 2, num_blocks), generator=gen).float().to(TEST_DEVICE)
    history_len = torch.tensor(int(history_fraction * num_blocks * block_size), device=TEST_DEVICE)
    expected = selection_tables(scores, history_len, rules)
    got = triton_selection_tables(scores, history_len, rules)
    for name, a, b in zip(("kv_block_idx", "kv_num_blocks", "selected", "fixed"), got, expected, strict=True):
        assert torch.equal(a, b), name


@settings(max_examples=examples(10))
@given(
    kv_heads=st.integers(1, 2),
    gqa=st.integers(1, 3),
    history_len=st.integers(0, 1200),
    block_size=st.sampled_from([1, 4, 8]),
    top_k=st.integers(1, 40),
    sink_blocks=st.integers(0, 6),
    local_blocks=st.integers(0, 6),
    extra_exclusion=st.integers(0, 8),
    mode=st.sampled_from(["never", "always", "adaptive"]),
    tile=st.sampled_from([16, 64]),
    seed=st.integers(0, 2**16),
)
def test_tables_from_sums_kernels_match_torch_tables(
    kv_heads,
    gqa,
    history_len,
    block_size,
    top_k,
    sink_blocks,
    local_blocks,
    extra_exclusion,
    mode,
    tile,
    seed,
):
    """Pooled queries, then scores + top-k + tables in one launch (the default CUDA path of
    ``select``), bit for bit against the torch path on scores exact in any summation order."""
    pytest.importorskip("triton")
    from omnimem import OmniMemConfig
    from omnimem.kernels.block_tables import block_tables_from_sums
    from omnimem.kernels.pooled_queries import pooled_queries
    from omnimem.selection import (
        RetrievalRules,
        _scores_from_block_sums,
        block_key_sums,
        kernel_table_rules,
        selection_tables,
    )

    q_len, head_dim = 5, 8
    gen = torch.Generator().manual_seed(seed)
    q, k = exact_queries_and_keys(
        1, kv_heads * gqa, kv_heads, q_len, q_len, head_dim, history_len + q_len, gen
    )
    local_tokens = local_blocks * block_size
    rules = RetrievalRules.from_config(
        OmniMemConfig(
            block_size=block_size, top_k=top_k, sink_tokens=sink_blocks * block_size,
            local_tokens=local_tokens, exclusion_tokens=local_tokens + extra_exclusion * block_size,
            window_exclusion=mode,
        )
    )  # fmt: skip
    history = torch.tensor(history_len, device=TEST_DEVICE)
    sums = block_key_sums(k, history, block_size)
    expected = selection_tables(_scores_from_block_sums(q, sums, history, rules, q_len, 0.5), history, rules)
    got = block_tables_from_sums(
        pooled_queries(q, q_len, rows=4, steps=1), sums, history, scale=0.5, blocks=tile,
        **kernel_table_rules(rules, sums.shape[-2]),
    )  # fmt: skip
    for name, a, b in zip(("kv_block_idx", "kv_num_blocks", "selected", "fixed"), got, expected, strict=True):
        assert torch.equal(a, b), name
