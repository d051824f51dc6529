"""Triton kernels against their torch references (interpreted on CPU, native on GPU)."""

from __future__ import annotations

import itertools

import pytest
import torch

from omnimem.selection import block_key_sums_reference

from .inputs import TEST_DEVICE, make_inputs

pytest.importorskip("triton")


@pytest.mark.parametrize(
    ("block_size", "head_dim", "history_len", "unwritten", "flash_layout", "dtype"),
    [
        (4, 8, 13, 3, False, torch.float32),
        (3, 5, 0, 2, True, torch.float32),
        (8, 16, 40, 0, True, torch.bfloat16),
        (16, 32, 100, 30, False, torch.float16),
        (5, 4, 1, 7, False, torch.float32),
    ],
)
def test_block_sums_kernel_matches_reference(
    block_size, head_dim, history_len, unwritten, flash_layout, dtype
):
    from omnimem.kernels.block_sums import block_sums

    _, k, _ = make_inputs(
        batch=2,
        q_heads=3,
        history_len=history_len,
        q_len=6,
        unwritten=unwritten,
        head_dim=head_dim,
        flash_layout=flash_layout,
        dtype=dtype,
    )
    history = torch.tensor(history_len, device=TEST_DEVICE)
    expected = block_key_sums_reference(k, history, block_size)
    torch.testing.assert_close(block_sums(k, history, block_size), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    ("block_size", "head_dim", "host_flash_layout", "dtype"),
    [(4, 8, False, torch.float32), (3, 5, True, torch.float32), (8, 16, True, torch.bfloat16)],
)
def test_stage_blocks_kernel_matches_reference(block_size, head_dim, host_flash_layout, dtype):
    from omnimem.kernels.stage_blocks import stage_blocks
    from omnimem.offload import stage_blocks_reference

    gen = torch.Generator().manual_seed(block_size)
    batch, heads, num_slots = 2, 3, 5

    def buffers(blocks: int, flash: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (
            (batch, blocks * block_size, heads, head_dim)
            if flash
            else (batch, heads, blocks * block_size, head_dim)
        )
        pair = [torch.randn(shape, generator=gen).to(TEST_DEVICE, dtype) for _ in "kv"]
        return tuple(x.transpose(1, 2) if flash else x for x in pair)

    previous, fresh, host = buffers(num_slots + 2), buffers(3), buffers(9, host_flash_layout)
    source = torch.randint(0, 4, (batch, heads, num_slots), generator=gen)
    limit = torch.tensor([1, num_slots + 2, 3, 9])[source]  # blocks each source holds
    source_block = (torch.rand(source.shape, generator=gen) * limit).long()
    source, source_block = source.int().to(TEST_DEVICE), source_block.to(TEST_DEVICE)
    expected, actual = buffers(num_slots + 2), tuple(x.clone() for x in buffers(num_slots + 2))
    actual = tuple(a.copy_(e) for a, e in zip(actual, expected, strict=True))
    initial = tuple(x.clone() for x in expected)
    stage_blocks_reference(expected, previous, fresh, host, source, source_block, block_size)
    stage_blocks(actual, previous, fresh, host, source, source_block, block_size)
    assert all(torch.equal(a, e) for a, e in zip(actual, expected, strict=True))
    # The reference itself, slot by slot: a block of the named source, or untouched.
    sources = {1: previous, 2: fresh, 3: host}
    for b, h, w in itertools.product(*map(range, source.shape)):
        code, block = int(source[b, h, w]), int(source_block[b, h, w])
        dst_rows = slice(w * block_size, (w + 1) * block_size)
        src = sources[code][0] if code else initial[0]
        src_rows = slice(block * block_size, (block + 1) * block_size) if code else dst_rows
        assert torch.equal(expected[0][b, h, dst_rows], src[b, h, src_rows])


@pytest.mark.parametrize("num_sms", [1, 7, 11, 20, 64, 100])
@pytest.mark.parametrize("query_group_size", [None, 3], ids=["one-group", "groups"])
def test_scattered_attention_matches_dense_with_split_tiles(num_sms, query_group_size, monkeypatch):
    """24 tiles: no split (1 SM), the last wave's tiles in 2 or 4 parts (7, 11, 20 SMs), every
    tile in 2 or 4 parts (64, 100 SMs); parts hand partial results over through the output."""
    from omnimem import sparse_attention
    from omnimem.backends import triton_attention

    q, k, v = make_inputs(batch=2, q_heads=4, kv_heads=2, history_len=37, q_len=35, head_dim=16)
    call = dict(
        history_len=37, block_size=4, top_k=3, sink_tokens=2, local_tokens=5,
        query_group_size=query_group_size, return_lse=True,
    )  # fmt: skip
    expected, expected_lse = sparse_attention(q, k, v, backend="dense", **call)
    monkeypatch.setattr(triton_attention, "default_num_sms", lambda device: num_sms)
    out, lse = sparse_attention(q, k, v, backend="triton", **call)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("num_blocks", "history_blocks", "top_k", "sink", "local", "exclusion", "mode"),
    [
        (40, 37, 5, 8, 12, 20, "adaptive"),
        (40, 37, 5, 8, 12, 20, "always"),
        (40, 37, 5, 8, 12, 20, "never"),
        (600, 590, 32, 13, 40, 40, "adaptive"),  # several chunks of 256 blocks
        (9, 3, 16, 0, 4, 4, "adaptive"),  # top_k > blocks, short history
        (9, 0, 4, 4, 4, 8, "adaptive"),  # empty history
        (300, 300, 3, 0, 0, 0, "never"),
    ],
)
def test_block_tables_kernel_matches_reference(
    num_blocks, history_blocks, top_k, sink, local, exclusion, mode
):
    from omnimem import OmniMemConfig
    from omnimem.selection import RetrievalRules, selection_tables, triton_selection_tables

    block_size = 4
    rules = RetrievalRules.from_config(
        OmniMemConfig(
            block_size=block_size, top_k=top_k, sink_tokens=max(sink * block_size - 1, 0),
            local_tokens=local * block_size, exclusion_tokens=exclusion * block_size, window_exclusion=mode,
        )
    )  # fmt: skip
    gen = torch.Generator().manual_seed(num_blocks + top_k)
    # Few distinct values: many ties, broken by the lower block index in both paths.
    scores = torch.randint(-3, 4, (2, 3, 2, num_blocks), generator=gen).float().to(TEST_DEVICE)
    scores[0, 0, 0, :5] = -0.0  # -0.0 and +0.0 rank equal
    history_len = torch.tensor(history_blocks * block_size - 2 if history_blocks else 0, device=TEST_DEVICE)
    expected = selection_tables(scores, history_len, rules)
    got = triton_selection_tables(scores, history_len, rules)
    for name, a, b in zip(("kv_block_idx", "kv_num_blocks", "selected", "fixed"), got, expected, strict=True):
        assert torch.equal(a, b), name
