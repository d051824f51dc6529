"""Selection rules, case by case (DESIGN.md section 2)."""

from __future__ import annotations

import pytest
import torch

from omnimem import OmniMemConfig, select_blocks
from omnimem.selection import block_key_means

from .inputs import TEST_DEVICE, keys_scoring, make_inputs
from .reference import reference_attention


def table(sel, b=0, h=0, g=0) -> list[int]:
    n = int(sel.kv_num_blocks[b, h, g])
    return sel.kv_block_idx[b, h, g, :n].tolist()


def selected(sel, b=0, h=0, g=0) -> list[int]:
    return sel.selected_block_idx[b, h, g].tolist()


# 12 blocks of 4 tokens; sink = block 0, local window = blocks 10, 11; recent blocks score highest.
RECENT_BIASED = [0.5, 0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6, 2.0, 3.0, 4.0]
WINDOWS = dict(block_size=4, sink_tokens=4, local_tokens=8, top_k=3)


def test_adaptive_spends_the_whole_budget_on_far_blocks_when_enough_exist():
    q, k, _ = keys_scoring(RECENT_BIASED, block_size=4, chunk_len=4)
    sel = select_blocks(q, k, **WINDOWS, window_exclusion="adaptive")
    # Block 9 is recent but outside the local window, so it is a far block and wins.
    assert selected(sel) == [9, 2, 4]
    assert table(sel) == [0, 2, 4, 9, 10, 11]
    assert sel.retrieved_block_idx[0, 0, 0].tolist() == [9, 2, 4]


def test_never_lets_window_blocks_eat_the_budget():
    q, k, _ = keys_scoring(RECENT_BIASED, block_size=4, chunk_len=4)
    sel = select_blocks(q, k, **WINDOWS, window_exclusion="never")
    assert selected(sel) == [11, 10, 9]
    # Blocks 10 and 11 were attended anyway: two of three slots are wasted.
    assert sel.retrieved_block_idx[0, 0, 0].tolist() == [-1, -1, 9]
    assert table(sel) == [0, 9, 10, 11]


def test_exclusion_window_wider_than_local_window():
    q, k, _ = keys_scoring(RECENT_BIASED, block_size=4, chunk_len=4)
    sel = select_blocks(q, k, **WINDOWS, exclusion_tokens=16, window_exclusion="always")
    # Blocks 8 and 9 are in the exclusion window but not attended: they are no candidates.
    assert selected(sel) == [2, 4, 6]
    never = select_blocks(q, k, **WINDOWS, exclusion_tokens=16, window_exclusion="never")
    assert selected(never) == [11, 10, 9]


def test_adaptive_fills_from_the_window_when_far_history_is_short():
    # 5 blocks: sink 0, far {1}, exclusion window {2, 3, 4} of which local {3, 4}.
    q, k, _ = keys_scoring([0.0, -1.0, 0.5, 3.0, 2.0], block_size=4, chunk_len=4)
    cfg = dict(block_size=4, sink_tokens=4, local_tokens=8, exclusion_tokens=12, top_k=3)
    adaptive = select_blocks(q, k, **cfg, window_exclusion="adaptive")
    # The low-scoring far block still comes first; the rest fill from the window by score.
    assert selected(adaptive) == [1, 3, 4]
    always = select_blocks(q, k, **cfg, window_exclusion="always")
    assert selected(always) == [1, -1, -1]
    assert table(always) == [0, 1, 3, 4]


def test_sink_and_local_window_overlap_count_once():
    q, k, _ = keys_scoring([1.0, 2.0, 3.0], block_size=4, chunk_len=4)
    sel = select_blocks(q, k, block_size=4, sink_tokens=8, local_tokens=8, top_k=2)
    assert table(sel) == [0, 1, 2]
    assert int(sel.kv_num_blocks) == 3
    assert sel.fixed_block_mask[:3].tolist() == [True, True, True]


def test_windows_round_out_to_whole_blocks():
    # history of 22 tokens: blocks 0..5, the last one partial (2 tokens).
    q, k, _ = make_inputs(history_len=22, q_len=4, head_dim=8)
    sel = select_blocks(q, k, block_size=4, sink_tokens=5, local_tokens=3, top_k=1)
    # sink covers tokens [0, 5) -> blocks 0, 1; local covers [19, 22) -> blocks 4, 5.
    assert sel.fixed_block_mask.tolist()[:6] == [True, True, False, False, True, True]


def test_partial_last_block_mean_ignores_chunk_and_unwritten_tokens():
    _q, k, _ = make_inputs(history_len=10, q_len=3, unwritten=5, head_dim=8)
    history = torch.tensor(10, device=k.device)
    means = block_key_means(k, history, 4)
    assert means.shape == (1, 2, 5, 8)  # ceil(18 / 4) block slots, static
    torch.testing.assert_close(means[:, :, 2], k[:, :, 8:10].mean(-2))
    torch.testing.assert_close(means[:, :, 0], k[:, :, 0:4].mean(-2))
    assert means[:, :, 3:].abs().max() == 0


def test_history_shorter_than_one_block():
    q, k, _v = make_inputs(history_len=3, q_len=4)
    sel = select_blocks(q, k, block_size=8, top_k=4)
    assert sel.num_history_blocks == 1
    assert table(sel) == [0]  # the one partial block is a far candidate


def test_empty_history():
    q, k, _ = make_inputs(history_len=0, q_len=5)
    sel = select_blocks(q, k, block_size=4, top_k=2, sink_tokens=4, local_tokens=4)
    assert sel.kv_num_blocks.sum() == 0
    assert (sel.selected_block_idx == -1).all()
    assert not sel.fixed_block_mask.any()


def test_ties_break_toward_the_lower_block_index():
    q, k, _ = keys_scoring([1.0] * 8, block_size=4, chunk_len=4)
    sel = select_blocks(q, k, block_size=4, top_k=3)
    assert selected(sel) == [0, 1, 2]
    # -0.0 and +0.0 tie too.
    q, k, _ = keys_scoring([0.0, -0.0, 0.0, -0.0], block_size=4, chunk_len=4)
    k[0, 0, 4:8, 0] = -0.0
    assert selected(select_blocks(q, k, block_size=4, top_k=2)) == [0, 1]


def test_gqa_scores_are_summed_over_the_query_heads_of_a_kv_head():
    # KV head 0 serves query heads 0 and 1. Head 0 likes block 1 a little, head 1 likes
    # block 2 a lot: the sum must pick block 2 although head 0 alone would pick block 1.
    k = torch.zeros(1, 1, 3 * 4 + 2, 2)
    k[0, 0, 4:8] = torch.tensor([1.0, 0.0])
    k[0, 0, 8:12] = torch.tensor([0.0, 1.0])
    q = torch.zeros(1, 2, 2, 2)
    q[0, 0] = torch.tensor([1.0, 0.5])
    q[0, 1] = torch.tensor([-0.5, 2.0])
    sel = select_blocks(q, k, block_size=4, top_k=1)
    assert sel.kv_block_idx.shape[:3] == (1, 1, 1)
    assert selected(sel) == [2]


def test_query_groups_select_independently():
    q, k, v = make_inputs(history_len=64, q_len=10, head_dim=8, seed=3)
    cfg = dict(block_size=4, top_k=2, query_group_size=4)
    sel = select_blocks(q, k, **cfg)
    assert sel.num_query_groups == 3 and sel.query_group_size == 4
    ref = reference_attention(q, k, v, history_len=64, **cfg)
    for (b, h, g), blocks in ref.attended_blocks.items():
        assert table(sel, b, h, g) == blocks


def test_tables_keep_static_shapes_as_history_grows_in_a_buffer():
    q, k, _ = make_inputs(history_len=40, q_len=8, unwritten=24)
    cfg = OmniMemConfig(block_size=8, top_k=2, sink_tokens=8, local_tokens=8)
    shapes = {
        tuple(select_blocks(q, k, history_len=h, config=cfg).kv_block_idx.shape) for h in (0, 5, 17, 40, 64)
    }
    assert len(shapes) == 1


def test_table_is_ascending_and_padded():
    q, k, _ = make_inputs(batch=2, q_heads=3, history_len=100, q_len=6, seed=1)
    sel = select_blocks(q, k, block_size=8, top_k=3, sink_tokens=8, local_tokens=16)
    idx, num = sel.kv_block_idx, sel.kv_num_blocks
    slot = torch.arange(idx.shape[-1], device=idx.device)
    valid = slot < num[..., None]
    assert ((idx >= 0) == valid).all()
    diffs = idx[..., 1:] - idx[..., :-1]
    assert (diffs[valid[..., 1:]] > 0).all()


def test_selection_matches_the_reference_on_random_gqa_inputs():
    q, k, v = make_inputs(batch=2, q_heads=4, kv_heads=2, history_len=90, q_len=7, seed=5)
    cfg = dict(block_size=8, top_k=3, sink_tokens=5, local_tokens=12, exclusion_tokens=30)
    sel = select_blocks(q, k, **cfg)
    ref = reference_attention(q, k, v, history_len=90, **cfg)
    for (b, h, g), blocks in ref.attended_blocks.items():
        assert table(sel, b, h, g) == blocks
        chosen = ref.selected_blocks[b, h, g]
        assert selected(sel, b, h, g)[: len(chosen)] == chosen


def test_to_tensordict():
    pytest.importorskip("tensordict")
    q, k, _ = make_inputs(batch=2, q_heads=2, history_len=40)
    td = select_blocks(q, k, block_size=8, top_k=2).to_tensordict()
    assert td.batch_size == torch.Size([2, 2, 1])
    assert td[1, 0, 0]["kv_block_idx"].shape == (2,)


@pytest.mark.parametrize("width", [1, 2, 7, 83, 256, 257, 600])
def test_sorted_unique_equals_sort_and_dedup(width):
    from omnimem.selection import sorted_unique

    none = max(2, width // 3)
    gen = torch.Generator().manual_seed(width)
    x = torch.randint(0, none + 1, (2, 3, width), generator=gen).to(TEST_DEVICE)  # `none` among them
    expected = [
        [sorted(set(row)) + [none] * (width - len(set(row))) for row in batch] for batch in x.tolist()
    ]
    assert sorted_unique(x, none=none).tolist() == expected
