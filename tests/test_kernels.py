"""Triton kernels against their torch references (interpreted on CPU, native on GPU)."""

from __future__ import annotations

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
