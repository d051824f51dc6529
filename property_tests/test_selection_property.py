"""The selection equals a brute-force per-block re-implementation of DESIGN.md section 2."""

from __future__ import annotations

import torch
from hypothesis import assume, given

from omnimem import select_blocks

from .cases import Case, attention_cases


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
