"""The int8 selection index (``omnimem.store.index``, ``OmniMemCache(index_format="int8")``):
its rounding, its documented score bound against float64, the selection it certifies equal to
the float32 index's, the fused kernel that reads it, and its bytes."""

from __future__ import annotations

import pytest
import torch

from omnimem import OmniMemConfig, kv_cache_bytes, select_blocks, sparse_attention
from omnimem.selection import block_key_sums
from omnimem.sparse.cache import OmniMemCache
from omnimem.store.index import Int8BlockSums, quantize_sums

from .inputs import TEST_DEVICE, exact_queries_and_keys


def test_codes_are_the_sums_rounded_to_each_rows_step():
    gen = torch.Generator().manual_seed(0)
    sums = torch.randn(2, 3, 9, 16, generator=gen) * torch.rand(2, 3, 9, 1, generator=gen) * 50
    sums[0, 1, 4] = 0.0  # an empty block: step 0, codes 0
    codes, step = quantize_sums(sums)
    assert codes.dtype == torch.int8 and step.dtype == torch.float32 and codes.abs().max() <= 127
    assert step[0, 1, 4] == 0 and not codes[0, 1, 4].any()
    exact = sums.double()
    error = (codes.double() * step.double()[..., None] - exact).abs()
    assert (error <= step.double()[..., None] / 2 * (1 + 1e-6)).all()
    # each row's largest magnitude is a full-scale code
    assert (codes.abs().amax(-1)[step > 0] == 127).all()


def test_an_index_is_written_viewed_and_cleared_like_the_tensor_it_replaces():
    index = Int8BlockSums.zeros(1, 4, 6, 8, device=TEST_DEVICE)
    sums = torch.randn(1, 4, 2, 8, device=TEST_DEVICE)
    index[:, :, 2:4] = sums
    codes, step = quantize_sums(sums)
    assert torch.equal(index.codes[:, :, 2:4], codes) and torch.equal(index.step[:, :, 2:4], step)
    assert not index.codes[:, :, :2].any() and not index.step[:, :, 4:].any()
    view = index[:, 1:3]  # a head slice shares storage
    assert view.shape == (1, 2, 6, 8) and view.codes.data_ptr() == index.codes[:, 1:3].data_ptr()
    assert index.nbytes == 4 * 6 * 8 + 4 * 4 * 6
    assert repr(index).startswith("Int8BlockSums(B=1, H=4, blocks=6, D=8")
    assert index.to("cpu").device.type == "cpu"
    index.zero_()
    assert not index.codes.any() and not index.step.any()
    with pytest.raises(ValueError, match="int8 codes"):
        Int8BlockSums(index.codes.float(), index.step)
    with pytest.raises(IndexError, match=r"\[B, H, NB\]"):
        index[..., 0]


def _scores64(q, sums, tokens, scale):
    pooled = q.double().mean(2, keepdim=True)  # one query group: [B, Hq, 1, D]
    kv_heads = sums.shape[1]
    pooled = pooled.unflatten(1, (kv_heads, -1)).sum(2)  # [B, Hkv, 1, D]
    return torch.einsum("bhgd,bhjd->bhgj", pooled, sums.double()) * scale / tokens, pooled


@pytest.mark.parametrize("seed", range(4))
def test_scores_lie_within_the_documented_bound_and_certified_rows_select_as_float32(seed):
    """Scores from the int8 index are within ``scale * ||p||_1 * step / (2 * tokens)`` of the
    float64 scores of the exact sums; wherever that bound separates a row's chosen blocks from
    the rest, the selection is the float32 index's, block for block."""
    gen = torch.Generator().manual_seed(seed)
    batch, q_heads, kv_heads, q_len, d, bs = 2, 4, 2, 24, 32, 16
    history = 150 * bs + 5  # a partial last block
    config = OmniMemConfig(block_size=bs, top_k=12, sink_tokens=bs, local_tokens=3 * bs)
    q = torch.randn(batch, q_heads, q_len, d, generator=gen).to(TEST_DEVICE)
    # top_k blocks stand out (aligned with the chunk's queries, as a revisited scene's are):
    # the bound can separate them from the noise, which it cannot do inside the noise.
    k = torch.randn(batch, kv_heads, history + q_len, d, generator=gen)
    direction = q.cpu().mean(2).unflatten(1, (kv_heads, -1)).sum(2)  # [B, Hkv, D]
    hot = 1 + torch.randperm(140, generator=gen)[: config.top_k]
    for j in hot.tolist():
        k[:, :, j * bs : (j + 1) * bs] += 2 * direction[:, :, None] / direction.norm(dim=-1)[..., None, None]
    k = k.to(TEST_DEVICE)
    sums = block_key_sums(k, torch.tensor(history, device=TEST_DEVICE), bs)
    index = Int8BlockSums.zeros(*sums.shape, device=TEST_DEVICE)
    index[:, :, :] = sums
    scale = d**-0.5
    tokens = (history - torch.arange(sums.shape[2], device=TEST_DEVICE) * bs).clamp(1, bs).double()
    exact, pooled = _scores64(q, sums, tokens, scale)
    approx, _ = _scores64(q, index.dequantize(), tokens, scale)
    bound = scale * pooled.abs().sum(-1, keepdim=True) * index.step.double()[:, :, None] / (2 * tokens)
    assert ((approx - exact).abs() <= bound * (1 + 1e-6) + 1e-9).all()

    flat = select_blocks(q, k, history_len=history, config=config, key_block_sums=sums)
    small = select_blocks(q, k, history_len=history, config=config, key_block_sums=index)
    assert torch.equal(flat.fixed_block_mask, small.fixed_block_mask)
    candidates = ~flat.fixed_block_mask[: sums.shape[2]] & (
        torch.arange(sums.shape[2], device=TEST_DEVICE) * bs < history
    )
    certified = 0
    for b in range(batch):
        for h in range(kv_heads):
            chosen = small.selected_block_idx[b, h, 0].long()
            chosen = chosen[chosen >= 0]
            rest = candidates.clone()
            rest[chosen] = False
            low = (approx - bound)[b, h, 0, chosen].min()
            high = (approx + bound)[b, h, 0, rest].max()
            if low > high:  # the bound separates them: the float32 index chooses the same
                certified += 1
                assert torch.equal(small.kv_block_idx[b, h], flat.kv_block_idx[b, h])
    assert certified >= 2  # the data makes the statement testable (it can fail)
    assert not torch.equal(index.dequantize(), sums)  # and the index is not exact


def test_the_fused_kernel_reads_the_codes_and_multiplies_each_blocks_step():
    """``block_tables_from_sums`` on int8 codes and steps equals the torch path on the
    dequantized sums bit for bit, on codes and steps that make every score exact."""
    from omnimem.kernels.block_tables import block_tables_from_sums
    from omnimem.kernels.pooled_queries import pooled_queries as pooled_queries_kernel
    from omnimem.selection import (
        RetrievalRules,
        _scores_from_block_sums,
        kernel_table_rules,
        selection_tables,
    )

    gen = torch.Generator().manual_seed(5)
    bs, q_len, d = 4, 12, 16
    history = 203
    q, _ = exact_queries_and_keys(2, 4, 2, q_len, q_len, d, 8, gen)
    blocks = -(-(history + q_len) // bs)
    codes = torch.randint(-127, 128, (2, 2, blocks, d), generator=gen, dtype=torch.int8).to(TEST_DEVICE)
    step = (2.0 ** torch.randint(-4, 2, (2, 2, blocks), generator=gen).float()).to(TEST_DEVICE)
    index = Int8BlockSums(codes, step)
    rules = RetrievalRules.from_config(OmniMemConfig(block_size=bs, top_k=9, sink_tokens=4, local_tokens=8))
    history_t = torch.tensor(history, device=TEST_DEVICE)
    expected = selection_tables(
        _scores_from_block_sums(q, index.dequantize(), history_t, rules, q_len, 0.5), history_t, rules
    )
    got = block_tables_from_sums(
        pooled_queries_kernel(q, q_len, rows=4, steps=1), codes, history_t, scale=0.5, blocks=16,
        sum_steps=step, **kernel_table_rules(rules, blocks),
    )  # fmt: skip
    for name, a, b in zip(("kv_block_idx", "kv_num_blocks", "selected", "fixed"), got, expected, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("offload", [False, True])
def test_a_cache_with_an_int8_index_attends_as_sparse_attention_over_that_index(
    offload, poisoned_allocations
):
    """Rolled chunk by chunk, an ``index_format="int8"`` cache keeps the quantized sums of its
    history (block by block, as a whole-history quantization gives them), selects exactly the
    blocks the stateless call given that index selects, and attends as it does."""
    gen = torch.Generator().manual_seed(1)
    bs, chunk, heads, d = 8, 12, 2, 16
    config = OmniMemConfig(block_size=bs, top_k=3, sink_tokens=bs, local_tokens=chunk, backend="gather")
    cache = OmniMemCache(
        200, max_chunk_tokens=chunk, batch=1, num_kv_heads=heads, head_dim=d, config=config,
        device=TEST_DEVICE, offload=offload, index_format="int8",
    )  # fmt: skip
    assert isinstance(cache.key_block_sums, Int8BlockSums)
    keys, values = [], []
    for _ in range(9):
        q, k, v = (torch.randn(1, heads, chunk, d, generator=gen).to(TEST_DEVICE) for _ in "qkv")
        out = cache.attend(q, k, v)
        if keys:
            hist_k, hist_v = torch.cat(keys, 2), torch.cat(values, 2)
            full_k, full_v = torch.cat([hist_k, k], 2), torch.cat([hist_v, v], 2)
            length = full_k.shape[2]
            sums = block_key_sums(full_k, torch.tensor(hist_k.shape[2], device=TEST_DEVICE), bs)
            index = Int8BlockSums.zeros(*sums.shape, device=TEST_DEVICE)
            index[:, :, :] = sums
            codes = cache.key_block_sums.codes[:, :, : sums.shape[2]]
            assert torch.equal(codes, index.codes), "the cache's index is the whole history's, quantized"
            want = sparse_attention(
                q, full_k, full_v, history_len=length - chunk, config=config, key_block_sums=index
            )
            torch.testing.assert_close(out, want)  # (buffers of other lengths: float32 rounding)
            chosen = cache.selection(q).selected_block_idx.sort(-1).values
            expected = select_blocks(
                q, full_k, history_len=length - chunk, config=config, key_block_sums=index
            )
            assert torch.equal(chosen, expected.selected_block_idx.sort(-1).values)
        cache.commit(k, v)
        keys.append(k)
        values.append(v)


def test_index_bytes_are_counted_and_misuse_is_refused():
    sizes = dict(
        num_kv_heads=12, head_dim=128, max_chunk_tokens=4680, config=OmniMemConfig.preset("wan2.1-1.3b")
    )
    hour = 14_400 * 1560
    blocks = -(-(hour + 4680) // 128)
    flat, small = (kv_cache_bytes(hour, **sizes, offload=True, index_format=f) for f in ("float32", "int8"))
    small = blocks * 12 * 128 * 4 - (flat - small)  # the int8 index: all else is alike
    assert small == blocks * (12 * 128 + 4 * 12)  # one byte a channel and a float32 step per block
    assert 30 * small < 8 * 2**30  # an hour's index for 30 layers within 8 GiB
    cache = OmniMemCache(64, max_chunk_tokens=8, batch=1, num_kv_heads=2, head_dim=8, index_format="int8",
                         config=OmniMemConfig(block_size=4))  # fmt: skip
    counted = kv_cache_bytes(64, num_kv_heads=2, head_dim=8, max_chunk_tokens=8, dtype=torch.float32,
                             config=OmniMemConfig(block_size=4), index_format="int8")  # fmt: skip
    assert counted == 2 * cache.k.numel() * 4 + cache.key_block_sums.nbytes
    with pytest.raises(ValueError, match="index_format must be one of"):
        OmniMemCache(64, max_chunk_tokens=8, batch=1, num_kv_heads=2, head_dim=8, index_format="int4")
    with pytest.raises(ValueError, match="index_format must be one of"):
        kv_cache_bytes(64, num_kv_heads=2, head_dim=8, index_format="fp16")
    with pytest.raises(TypeError, match=r"key_block_sums must be a torch\.Tensor or an Int8BlockSums"):
        q = torch.randn(1, 2, 4, 8)
        select_blocks(q, torch.randn(1, 2, 12, 8), config=OmniMemConfig(block_size=4), key_block_sums=[1])
