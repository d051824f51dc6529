"""Triton kernels against their torch references (interpreted on CPU, native on GPU)."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

from omnimem import OmniMemConfig, select_blocks
from omnimem.selection import block_key_sums_reference

from .inputs import ON_HOPPER, TEST_DEVICE, exact_queries_and_keys, make_inputs

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
    [
        (4, 8, False, torch.float32),
        (3, 5, True, torch.float32),
        (8, 16, True, torch.bfloat16),
        # what a quantized store stages: bytes, per-block scales (one row of one), per-token scales
        (4, 8, False, torch.uint8),
        (1, 1, False, torch.float32),
        (1, 9, False, torch.bfloat16),
        (5, 1, False, torch.bfloat16),
    ],
)
def test_stage_blocks_kernel_matches_reference(block_size, head_dim, host_flash_layout, dtype):
    from omnimem.kernels.stage_blocks import stage_blocks
    from omnimem.store.staging import stage_blocks_reference

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


def test_output_follows_token_major_queries():
    """Queries split from a per-token buffer of several tensors' heads (what ``ulysses_attention``
    receives) are token-major but not dense: the output is still allocated in ``[B, L, H, D]``
    storage (``empty_like`` keeps the stride order), so the Wan-layout result and the exchange
    back need no transposing copy; values as dense."""
    from omnimem import sparse_attention

    q, k, v = make_inputs(batch=2, q_heads=4, kv_heads=2, history_len=37, q_len=35, head_dim=16)
    per_token = torch.cat([q.transpose(1, 2), torch.full_like(q.transpose(1, 2), float("nan"))], dim=2)
    strided = per_token[:, :, :4].transpose(1, 2)  # [B, H, L, D] view of [B, L, 2H, D] storage
    assert strided.stride(1) < strided.stride(2) and not strided.transpose(1, 2).is_contiguous()
    call = dict(history_len=37, block_size=4, top_k=3, sink_tokens=2, local_tokens=5)
    expected = sparse_attention(q, k, v, backend="dense", **call)
    out = sparse_attention(strided, k, v, backend="triton", **call)
    assert out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("num_blocks", "history_blocks", "top_k", "sink", "local", "exclusion", "mode"),
    [
        (40, 37, 5, 8, 12, 20, "adaptive"),
        (40, 37, 5, 8, 12, 20, "always"),
        (40, 37, 5, 8, 12, 20, "never"),
        (40, 10, 5, 8, 12, 20, "never"),  # the local window overlaps the sink
        (40, 5, 5, 8, 12, 20, "adaptive"),  # history shorter than the sink
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


@pytest.mark.parametrize(
    ("q_len", "group_size", "head_dim", "flash_layout", "dtype"),
    [
        (37, 37, 16, False, torch.float32),  # several programs per group, a partial last one
        (50, 16, 8, True, torch.float32),  # query groups, the last one shorter
        (9, 9, 5, True, torch.bfloat16),  # head_dim not a power of two
        (64, 64, 32, False, torch.float16),
        (3, 2, 4, False, torch.float32),
    ],
)
def test_pooled_queries_kernel_matches_reference(q_len, group_size, head_dim, flash_layout, dtype):
    from omnimem.kernels.pooled_queries import pooled_queries
    from omnimem.selection import pooled_queries as pooled_queries_reference

    q, _, _ = make_inputs(
        batch=2, q_heads=3, q_len=q_len, history_len=0, head_dim=head_dim, flash_layout=flash_layout,
        dtype=dtype,
    )  # fmt: skip
    got = pooled_queries(q, group_size, rows=4, steps=2)  # 8 tokens per program: several per group
    torch.testing.assert_close(got, pooled_queries_reference(q, group_size), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    (
        "q_heads",
        "kv_heads",
        "history_len",
        "block_size",
        "top_k",
        "sink",
        "local",
        "exclusion",
        "mode",
        "tile",
    ),
    [
        (4, 2, 1001, 8, 5, 9, 40, 40, "adaptive", 16),  # GQA, partial last block
        (3, 3, 2999, 4, 7, 0, 12, 30, "never", 64),  # several chunks of 256 blocks
        (1, 1, 6001, 4, 32, 4, 8, 8, "adaptive", 256),  # one tile per chunk
        (2, 1, 13, 4, 4, 4, 4, 4, "always", 16),  # fewer blocks than top_k
        (2, 2, 3001, 4, 1, 2, 8, 8, "adaptive", 64),  # top_k 1 over several chunks
        (1, 1, 2001, 4, 3, 1, 4, 60, "always", 64),  # top_k 3: runs of 4, one slot unused
        (1, 1, 3, 4, 2, 0, 0, 0, "never", 16),  # one history block
        (2, 2, 0, 4, 4, 4, 4, 8, "adaptive", 16),  # empty history
    ],
)
def test_tables_from_sums_kernel_matches_torch_tables(
    q_heads, kv_heads, history_len, block_size, top_k, sink, local, exclusion, mode, tile
):
    """Pooled queries, then scores + top-k + tables in one launch (its tickets chain tiles,
    chunks and rows), bit for bit against the torch path on exactly representable scores."""
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

    q_len, head_dim = 12, 16
    gen = torch.Generator().manual_seed(history_len + top_k)
    q, k = exact_queries_and_keys(2, q_heads, kv_heads, q_len, q_len, head_dim, history_len + q_len, gen)
    rules = RetrievalRules.from_config(
        OmniMemConfig(
            block_size=block_size, top_k=top_k, sink_tokens=max(sink * block_size - 1, 0),
            local_tokens=local * block_size, exclusion_tokens=exclusion * block_size, window_exclusion=mode,
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


def test_tables_from_sums_kernel_past_32_chunks_a_row(monkeypatch):
    """Past 32 chunks of ``MAX_SORT`` blocks a row takes more chunks (an hour of video is 43 at
    4,096): shrunk here so that 5,003 blocks make 40 chunks of 128."""
    import omnimem.kernels.block_tables as block_tables

    monkeypatch.setattr(block_tables, "MAX_SORT", 128)
    assert block_tables.plan_sizes(5_003, 5, 3)[0] == 128
    test_tables_from_sums_kernel_matches_torch_tables(2, 1, 20_000, 4, 5, 1, 8, 16, "adaptive", 64)


@pytest.mark.parametrize("layout", ["bhld", "blhd", "cache-slice", "strided-dim", "padded-rows"])
def test_hopper_row_view_addresses_every_head(layout):
    """The Gluon kernel's 2-D TMA view: (row, column) of every (batch, head, token) is its
    element's address, or the view is refused (the Triton kernel then runs the call)."""
    pytest.importorskip("triton.experimental.gluon")
    from omnimem.backends.gluon_attention import _row_view

    b, h, length, d = 2, 3, 5, 64
    base = {
        "bhld": lambda: torch.zeros(b, h, length, d),
        "blhd": lambda: torch.zeros(b, length, h, d).transpose(1, 2),
        "cache-slice": lambda: torch.zeros(b, h, length + 7, d)[:, :, :length],
        "strided-dim": lambda: torch.zeros(b, h, length, 2 * d)[..., ::2],
        "padded-rows": lambda: (
            torch.zeros(b, length, h * d + 8)[..., : h * d].unflatten(-1, (h, d)).transpose(1, 2)
        ),
    }[layout]()
    view = _row_view(base)
    if layout == "strided-dim":
        assert view is None
        return
    rows, row_len = view
    sb, sh, sl, _ = base.stride()
    for bi, hi, t in itertools.product(range(b), range(h), range(length)):
        offset = bi * sb + hi * sh
        row, col = offset // sl + t, offset % sl
        assert row < rows and col + d <= row_len
        assert row * row_len + col == offset + t * sl


@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon kernel runs on Hopper GPUs only")
@pytest.mark.parametrize("num_sms", [1, 5, 50, None])
@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "head_dim", "history_len", "q_len", "block_size", "flash_layout", "dtype"),
    [
        (2, 2, 128, 0, 300, 128, False, torch.bfloat16),  # empty history, partial query/chunk tiles
        (2, 2, 128, 128 * 20 + 37, 300, 128, True, torch.bfloat16),  # partial last history block
        (4, 2, 128, 5000, 128, 128, False, torch.float16),  # GQA, chunk of one tile
        (4, 2, 64, 2600, 200, 256, False, torch.bfloat16),  # head_dim 64, 2 key tiles per block
        (2, 1, 128, 128 * 7, 64, 256, True, torch.bfloat16),  # fewer key tiles than split parts
    ],
)
def test_hopper_kernel_matches_dense(
    num_sms, q_heads, kv_heads, head_dim, history_len, q_len, block_size, flash_layout, dtype, monkeypatch,
    poisoned_allocations,
):  # fmt: skip
    """The warp-specialized kernel (which the triton backend runs on Hopper) against the dense
    reference, with the last wave unsplit (1 SM), split (5, 50 SMs) and at the real SM count;
    every buffer the library allocates starts as NaN (an unwritten output row or split part
    shows)."""
    from omnimem import OmniMemConfig, select_blocks, sparse_attention
    from omnimem.backends import gluon_attention, triton_attention

    q, k, v = make_inputs(
        q_heads=q_heads, kv_heads=kv_heads, history_len=history_len, q_len=q_len, head_dim=head_dim,
        unwritten=64, dtype=dtype, flash_layout=flash_layout, seed=history_len + q_len,
    )  # fmt: skip
    assert gluon_attention.supported(q, k, v, block_size=block_size, grouped=False)
    config = OmniMemConfig(block_size=block_size, top_k=3, sink_tokens=block_size, local_tokens=200)
    selection = select_blocks(q, k, history_len=history_len, config=config)
    call = dict(history_len=history_len, config=config, selection=selection, return_lse=True)
    expected, expected_lse = sparse_attention(q.float(), k.float(), v.float(), backend="dense", **call)
    if num_sms is not None:
        monkeypatch.setattr(triton_attention, "default_num_sms", lambda device: num_sms)
    out, lse = sparse_attention(q, k, v, backend="triton", **call)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, expected_lse, atol=2e-2, rtol=2e-2)
    repeat, _ = sparse_attention(q, k, v, backend="triton", **call)
    assert torch.equal(repeat, out)  # split parts hand over through memory: no race


def test_tables_from_sums_kernel_skips_blocks_with_nan_keys_like_the_torch_path():
    """A block whose key sum is NaN is no candidate in the fused kernel, as in selection_tables."""
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

    gen = torch.Generator().manual_seed(3)
    q, k = exact_queries_and_keys(1, 2, 2, 12, 12, 16, 400 + 12, gen)
    k[:, :, 40:48] = float("nan")  # blocks 10 and 11 of 4-token blocks
    rules = RetrievalRules.from_config(OmniMemConfig(block_size=4, top_k=128, sink_tokens=4, local_tokens=8))
    history = torch.tensor(400, device=TEST_DEVICE)
    sums = block_key_sums(k, history, 4)
    expected = selection_tables(_scores_from_block_sums(q, sums, history, rules, 12, 0.5), history, rules)
    got = block_tables_from_sums(
        pooled_queries(q, 12, rows=4, steps=1), sums, history, scale=0.5, blocks=16,
        **kernel_table_rules(rules, sums.shape[-2]),
    )  # fmt: skip
    for name, a, b in zip(("kv_block_idx", "kv_num_blocks", "selected", "fixed"), got, expected, strict=True):
        assert torch.equal(a, b), name
    picked = set(got[0].flatten().tolist())
    assert not picked & {10, 11} and {9, 12} <= picked  # the budget takes every other block


@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon kernel runs on Hopper GPUs only")
@pytest.mark.parametrize(
    "kv_format", ["fp8", "int4", "fp8-key-products", "fp8-three-stages", "int4-three-stages"]
)
@pytest.mark.parametrize("num_sms", [1, 5, None])
@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "head_dim", "history_len", "q_len", "block_size", "flash_layout", "dtype"),
    [
        (2, 2, 128, 0, 300, 128, False, torch.bfloat16),  # empty history: the tail only
        (2, 2, 128, 128 * 20 + 37, 300, 128, True, torch.bfloat16),  # partial last block, selected
        (4, 2, 128, 128 * 40, 128, 128, False, torch.float16),  # GQA, no partial block
        (4, 2, 64, 2600, 200, 256, False, torch.bfloat16),  # head_dim 64, 2 key tiles a block
        (2, 1, 128, 128 * 7, 64, 256, True, torch.bfloat16),  # fewer key tiles than split parts
    ],
)
def test_hopper_kernel_reads_a_quantized_history(
    kv_format, num_sms, q_heads, kv_heads, head_dim, history_len, q_len, block_size, flash_layout, dtype,
    monkeypatch, poisoned_allocations,
):  # fmt: skip
    """The Gluon kernel over a quantized store (its converter partition) against the float64
    reference of the history it stands for (whole blocks dequantized, then the native tail),
    and against the Triton-language kernel on the same store. Store slots the selection does
    not name hold NaN codes and scales: never read; every buffer the library allocates starts as
    NaN. ``fp8-key-products`` (``FP8_KEY_PRODUCTS``): against its twin, which it must follow
    more closely than the plain reference (so a kernel that ignored the switch fails);
    ``fp8-three-stages`` the same with ``FP8_THREE_STAGES`` (values decoded in place);
    ``int4-three-stages``: ``INT4_THREE_STAGES`` (both halves decoded in place)."""
    from omnimem.backends import gluon_attention, triton_attention
    from omnimem.backends.quantized_attention import quantized_attention, quantized_attention_reference
    from omnimem.backends.triton import tile_tables
    from omnimem.store.blocks import QuantizedBlocks

    q, k, v = make_inputs(
        q_heads=q_heads, kv_heads=kv_heads, history_len=history_len, q_len=q_len, head_dim=head_dim,
        dtype=dtype, flash_layout=flash_layout, seed=history_len + q_len,
    )  # fmt: skip
    key_products = kv_format in ("fp8-key-products", "fp8-three-stages")
    if key_products:
        monkeypatch.setattr(gluon_attention, "FP8_KEY_PRODUCTS", True)
        monkeypatch.setattr(gluon_attention, "FP8_THREE_STAGES", kv_format == "fp8-three-stages")
        kv_format = "fp8"
    elif kv_format == "int4-three-stages":
        monkeypatch.setattr(gluon_attention, "INT4_THREE_STAGES", True)
        kv_format = "int4"
    config = OmniMemConfig(block_size=block_size, top_k=3, sink_tokens=block_size, local_tokens=200)
    selection = select_blocks(q, k, history_len=history_len, config=config)
    whole = history_len // block_size * block_size
    store = QuantizedBlocks(
        kv_format, batch=1, num_kv_heads=kv_heads, capacity=whole + 2 * block_size, head_dim=head_dim,
        block_size=block_size, device=q.device,
    )  # fmt: skip
    for scale in (store.k_scale, store.v_scale, store.k_min, store.v_min):
        if scale is not None:
            scale.fill_(float("nan"))
    store.k.view(torch.uint8).fill_(0x7F)  # an e4m3 NaN; int4 codes decode to NaN with NaN scales
    store.v.view(torch.uint8).fill_(0x7F)
    if whole:
        store.write(0, k[:, :, :whole], v[:, :, :whole])
    tail_k, tail_v = k[:, :, whole:], v[:, :, whole:]
    block_idx, num_blocks = tile_tables(selection, q_len=q_len, block_m=128)
    if num_sms is not None:
        monkeypatch.setattr(triton_attention, "default_num_sms", lambda device: num_sms)
    run = functools.partial(
        quantized_attention, q, store, tail_k, tail_v, block_idx=block_idx, num_blocks=num_blocks,
        block_attended=None, history_len=history_len, chunk_len=q_len, query_group_size=q_len,
        scale=head_dim**-0.5, return_lse=True,
    )  # fmt: skip
    out, lse = run(kernel="gluon")
    reference = functools.partial(
        quantized_attention_reference, q.double(), store, tail_k, tail_v, selection, history_len=history_len,
        chunk_len=q_len, scale=head_dim**-0.5, return_lse=True,
    )  # fmt: skip
    want, want_lse = reference(fp8_key_products=key_products)
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double(), want_lse.double(), atol=2e-2, rtol=2e-2)
    if key_products:
        plain, _ = reference()
        if history_len:  # e4m3 queries move the output; the kernel's own rounding, less
            assert (out.double() - want).norm() < 0.5 * (plain - want).norm()
    else:
        language, _ = run(kernel="triton")
        torch.testing.assert_close(out, language, atol=2e-2, rtol=2e-2)
    repeat, _ = run(kernel="gluon")
    assert torch.equal(repeat, out)  # split parts hand over through memory: no race


def test_fp8_kernels_refuse_gpus_without_e4m3_clearly(monkeypatch):
    """Triton converts float8 e4m3 on compute capability 8.9+ only: on an older GPU the triton
    backend's fp8 kernels say so (naming what works) instead of failing to compile; int4 and
    the interpreter are not affected."""
    from omnimem.backends.quantized_tiles import check_kernel_device

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    gpu = torch.device("cuda", 0)
    with pytest.raises(
        ValueError, match=r"compute capability 8.9 or later.*A100 is 8.0: use kv_format='int4'"
    ):
        check_kernel_device("fp8", gpu)
    check_kernel_device("int4", gpu)
    check_kernel_device("fp8", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_kernel_device("fp8", gpu)


def test_fp8_on_gpus_without_e4m3_routes_or_refuses_before_any_write(monkeypatch):
    """Where triton has no e4m3 (a faked compute capability 8.0): the gated layer's ``auto``
    runs an fp8 history on gather (int4 and capability 9.0 stay on triton), ``backend="triton"``
    is a ValueError; and both caches refuse such a call before writing the chunk (the check
    stands in for the GPU here), so a later call sees the state of before."""
    from omnimem import GatedCache, GatedConfig, OmniMemCache
    from omnimem.backends import quantized_tiles
    from omnimem.gated.attention import resolve_gated_backend

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    gpu = torch.device("cuda", 0)
    assert resolve_gated_backend(GatedConfig(), gpu, torch.bfloat16, "fp8") == "gather"
    assert resolve_gated_backend(GatedConfig(), gpu, torch.bfloat16, "int4") == "triton"
    assert resolve_gated_backend(GatedConfig(), gpu, torch.bfloat16) == "triton"
    with pytest.raises(ValueError, match=r"compute capability 8\.9 or later"):
        resolve_gated_backend(GatedConfig(backend="triton"), gpu, torch.bfloat16, "fp8")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_gated_backend(GatedConfig(), gpu, torch.bfloat16, "fp8") == "triton"

    def refuse(kv_format, device):
        raise ValueError(f"refused {kv_format}")

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 16, generator=gen).to(TEST_DEVICE) for _ in range(3))
    config = OmniMemConfig(block_size=4, top_k=2, sink_tokens=4, local_tokens=4, backend="triton")
    caches = [OmniMemCache(48, max_chunk_tokens=6, batch=1, num_kv_heads=2, head_dim=16, config=config,
                           kv_format="fp8", device=TEST_DEVICE) for _ in range(2)]  # fmt: skip
    for cache in caches:
        cache.attend_at(q, k, v, start=0)
        cache.attend_at(q, k, v, start=6)
    with monkeypatch.context() as patch:
        patch.setattr(quantized_tiles, "check_kernel_device", refuse)
        with pytest.raises(ValueError, match="refused fp8"):
            caches[0].attend_at(q, k + 1, v + 1, start=6)
    # the next call makes the chunk of before history: it must be the one written before
    assert torch.equal(caches[0].attend_at(q, k, v, start=12), caches[1].attend_at(q, k, v, start=12))

    gates = torch.rand(1, 2, 6, 3, generator=gen).to(TEST_DEVICE)
    gated = dict(batch=1, num_kv_heads=2, head_dim=16, block_size=4, query_group_size=3, top_k=2,
                 window_tokens=8, kv_format="fp8", max_chunk_tokens=6, device=TEST_DEVICE,
                 backend="triton")  # fmt: skip
    g_caches = [GatedCache(48, **gated, dtype=torch.float32) for _ in range(2)]
    for cache in g_caches:
        cache.attend(q, k, v, gates, start=0)
    with monkeypatch.context() as patch:
        patch.setattr(quantized_tiles, "check_kernel_device", refuse)
        with pytest.raises(ValueError, match="refused fp8"):
            g_caches[0].attend(q, k + 1, v + 1, gates, start=6)
    assert g_caches[0].end == 6
    again = [cache.attend(q, k, v, gates, start=0) for cache in g_caches]
    torch.testing.assert_close(again[0], again[1], atol=0, rtol=0)


def test_gluon_kernel_needs_int4_scales_at_even_offsets():
    """The Gluon kernel reads a block's bf16 int4 key scales as int32 pairs: a store's own scales
    qualify, scales at an odd element offset (a view no cache makes) do not, and ``skip_reason``
    then sends the call to the Triton-language kernel, saying why."""
    pytest.importorskip("triton.experimental.gluon")
    from omnimem.backends import gluon_attention
    from omnimem.store.blocks import QuantizedBlocks

    store = QuantizedBlocks("int4", batch=1, num_kv_heads=2, capacity=512, head_dim=128, block_size=128,
                            device="cpu")  # fmt: skip
    assert gluon_attention._pairs_aligned(store)
    store.k_min = torch.zeros(1, 2, 4, 129, dtype=torch.bfloat16)[..., 1:]  # offset 1, rows of 129
    assert not gluon_attention._pairs_aligned(store)


def test_quantized_attention_says_why_the_gluon_kernel_cannot_run():
    """``kernel="gluon"`` where it cannot run is a ValueError with the reason; an unknown
    ``kernel`` is refused before anything runs."""
    pytest.importorskip("triton.experimental.gluon")
    from omnimem.backends.quantized_attention import quantized_attention
    from omnimem.store.blocks import QuantizedBlocks

    store = QuantizedBlocks(
        "fp8", batch=1, num_kv_heads=1, capacity=256, head_dim=64, block_size=128, device="cpu"
    )
    q = torch.zeros(1, 1, 8, 64)
    tail = torch.zeros(1, 1, 8, 64)
    table = torch.zeros(1, 1, 1, 1, dtype=torch.int32)
    call = dict(block_idx=table, num_blocks=table[..., 0], block_attended=None, history_len=0, chunk_len=8,
                query_group_size=8, scale=0.125, return_lse=False)  # fmt: skip
    with pytest.raises(ValueError, match="kernel='gluon' cannot run this call: not a CUDA tensor"):
        quantized_attention(q, store, tail, tail, kernel="gluon", **call)
    with pytest.raises(ValueError, match="kernel must be 'auto', 'triton' or 'gluon'"):
        quantized_attention(q, store, tail, tail, kernel="flash", **call)
    with pytest.raises(ValueError, match="Triton-language tuning options"):
        quantized_attention(q, store, tail, tail, kernel="gluon", block_n=64, **call)
