"""FlexAttention tile tables against the dense token mask (exact any/all per tile pair).

Compiled FlexAttention trusts these tables: a missed tile drops attended keys, a wrongly "full"
tile skips the mask. Small tiles make random cases span many query and key tiles.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from omnimem import select_blocks
from omnimem.backends.dense import attended_token_mask
from omnimem.backends.flex import block_mask_tables

from .cases import Case, attention_cases
from .conftest import examples


def dense_tiles(num: torch.Tensor, index: torch.Tensor, num_tiles: int) -> torch.Tensor:
    valid = torch.arange(index.shape[-1], device=index.device) < num[..., None]
    dense = torch.zeros((*index.shape[:-1], num_tiles + 1), dtype=torch.bool, device=index.device)
    return dense.scatter(-1, torch.where(valid, index.long(), num_tiles), True)[..., :-1]


@settings(max_examples=examples(200))
@given(case=attention_cases(), tile=st.sampled_from([1, 2, 4, 8, 128]))
def test_tiles_match_the_token_mask(case: Case, tile: int):
    q, k, _ = case.make()
    batch, q_heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    chunk_len = q_len if case.chunk_len is None else case.chunk_len
    sel = select_blocks(q, k, history_len=case.history_len, chunk_len=chunk_len, compile=False, **case.config)
    _, *tables = block_mask_tables(
        sel.kv_block_idx,
        sel.history_len,
        num_blocks=sel.num_history_blocks,
        block_size=sel.block_size,
        query_group_size=sel.query_group_size,
        num_q_heads=q_heads,
        q_len=q_len,
        kv_len=kv_len,
        chunk_len=chunk_len,
        tile=tile,
    )
    q_tiles, kv_tiles = math.ceil(q_len / tile), math.ceil(kv_len / tile)
    partial = dense_tiles(tables[0], tables[1], kv_tiles)
    full = dense_tiles(tables[2], tables[3], kv_tiles)

    mask = attended_token_mask(sel, num_q_heads=q_heads, q_len=q_len, kv_len=kv_len, chunk_len=chunk_len)
    pad = (0, kv_tiles * tile - kv_len, 0, q_tiles * tile - q_len)
    # Padding queries do not exist (neutral for "all"); padding keys do not exist (never attended).
    any_pair = F.pad(mask, pad, value=False).unflatten(-1, (kv_tiles, tile)).unflatten(2, (q_tiles, tile))
    all_mask = F.pad(mask, (0, kv_tiles * tile - kv_len), value=False)
    all_mask = F.pad(all_mask, (0, 0, 0, q_tiles * tile - q_len), value=True)
    all_pair = all_mask.unflatten(-1, (kv_tiles, tile)).unflatten(2, (q_tiles, tile))
    expected_any = any_pair.any(-1).any(3)
    expected_all = all_pair.all(-1).all(3)
    assert torch.equal(full, expected_all)
    assert torch.equal(partial, expected_any & ~expected_all)
    assert tables[1].shape == (batch, q_heads, q_tiles, kv_tiles)
