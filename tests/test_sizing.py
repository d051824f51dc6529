"""kv_cache_bytes equals what the caches allocate."""

from __future__ import annotations

import pytest
import torch

from omnimem import GatedCache, GatedConfig, OmniMemConfig, kv_cache_bytes
from omnimem.sparse.cache import OmniMemCache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sizes_match_the_allocations(dtype):
    config = OmniMemConfig(block_size=7)
    cache = OmniMemCache(
        50, max_chunk_tokens=9, batch=2, num_kv_heads=3, head_dim=8, config=config, dtype=dtype
    )
    held = (
        cache.k.untyped_storage().nbytes() + cache.v.untyped_storage().nbytes() + cache.key_block_sums.nbytes
    )
    sizes = dict(num_kv_heads=3, head_dim=8, batch=2, dtype=dtype)
    assert kv_cache_bytes(50, max_chunk_tokens=9, config=config, **sizes) == held
    assert kv_cache_bytes(50, max_chunk_tokens=9, config=config, layers=4, **sizes) == 4 * held

    gated = GatedConfig(block_size=6)
    cache = GatedCache(50, batch=2, num_kv_heads=3, head_dim=8, config=gated, dtype=dtype)
    pooled = cache.pooled
    held = sum(
        x.untyped_storage().nbytes() for x in (cache.k, cache.v, pooled.k, pooled.k_attn, pooled.v_attn)
    )
    assert kv_cache_bytes(50, config=gated, **sizes) == held


def test_bad_sizes_are_refused():
    with pytest.raises(TypeError, match="capacity must be a non-negative int"):
        kv_cache_bytes(-1, num_kv_heads=1, head_dim=8)
    with pytest.raises(TypeError, match="dtype must be a floating"):
        kv_cache_bytes(10, num_kv_heads=1, head_dim=8, dtype=torch.int8)
    with pytest.raises(TypeError, match="config must be an OmniMemConfig or a GatedConfig"):
        kv_cache_bytes(10, num_kv_heads=1, head_dim=8, config={"block_size": 4})


def test_offloaded_sizes_match_the_device_allocations():
    """offload=True: the block sums and the staging buffers an offloaded cache allocates."""
    config = OmniMemConfig(block_size=7, top_k=3, sink_tokens=7, local_tokens=9)
    cache = OmniMemCache(
        120, max_chunk_tokens=9, batch=2, num_kv_heads=3, head_dim=8, config=config, offload=True
    )
    staged = [*cache._offload.fresh, *(t for pair in cache._offload.work for t in pair)]
    held = cache.key_block_sums.nbytes + sum(t.untyped_storage().nbytes() for t in staged)
    sizes = dict(num_kv_heads=3, head_dim=8, batch=2, dtype=torch.float32, config=config, max_chunk_tokens=9)
    assert kv_cache_bytes(120, offload=True, **sizes) == held
    gated = GatedConfig(block_size=6, window_tokens=20)
    cache = GatedCache(
        120, batch=2, num_kv_heads=3, head_dim=8, config=gated, offload=True, max_chunk_tokens=9
    )
    pooled, live = cache.pooled, cache._offload
    held = sum(
        x.untyped_storage().nbytes() for x in (pooled.k, pooled.k_attn, pooled.v_attn, live._k, live._v)
    )
    sizes.update(config=gated)
    assert kv_cache_bytes(120, offload=True, **sizes) == held
    assert cache.k.device.type == "cpu"  # the history is in host memory
    with pytest.raises(TypeError, match="offload must be a bool"):
        kv_cache_bytes(120, num_kv_heads=3, head_dim=8, offload=1)


@pytest.mark.parametrize("kv_format", ["fp8", "int4"])
@pytest.mark.parametrize("layout", ["blhd", "bhld"])
def test_quantized_omnimem_cache_allocates_what_kv_cache_bytes_says(kv_format, layout):
    """A quantized OmniMemCache holds the quantized blocks, the staging buffers and the block
    sums (no native history): exactly kv_cache_bytes(kv_format=...); the history's share per
    token is the format's (token_bytes); bad formats are refused."""
    from omnimem.store.formats import token_bytes

    config = OmniMemConfig(block_size=7, top_k=3, sink_tokens=7, local_tokens=9)
    sizes = dict(num_kv_heads=3, head_dim=9, batch=2, dtype=torch.bfloat16, config=config, max_chunk_tokens=9)
    cache = OmniMemCache(119, **sizes, layout=layout, kv_format=kv_format)
    tier = cache._offload
    native = [*tier.fresh, *(t for pair in tier.work for t in pair)]
    held = (
        sum(store.nbytes for store in (tier.store, *tier.stores, tier.fresh_store))
        + cache.key_block_sums.nbytes
        + sum(t.untyped_storage().nbytes() for t in native)
    )
    assert tier.store.k.device == cache.device
    assert kv_cache_bytes(119, **sizes, kv_format=kv_format) == held
    assert cache.k.untyped_storage().nbytes() <= 2  # the history has no native buffer
    added = kv_cache_bytes(238, **sizes, kv_format=kv_format) - kv_cache_bytes(
        119, **sizes, kv_format=kv_format
    )
    per_token = token_bytes(kv_format, head_dim=9, block_size=7) * 2 * 3
    sums = 17 * 2 * 3 * 9 * 4  # 17 whole blocks more, and their float32 key sums
    assert added == pytest.approx(119 * per_token + sums, abs=1)
    with pytest.raises(ValueError, match="kv_format must be one of"):
        kv_cache_bytes(49, **sizes, kv_format="int8")


@pytest.mark.parametrize("kv_format", ["fp8", "int4"])
@pytest.mark.parametrize("layout", ["blhd", "bhld"])
def test_offloaded_quantized_omnimem_cache_allocates_what_kv_cache_bytes_says(kv_format, layout):
    """Offloaded and quantized: the device holds the block sums, two quantized staging stores,
    the last commit's blocks quantized and the native tail, exactly kv_cache_bytes(offload=True,
    kv_format=...), which grows with the capacity only by the block sums; the history is in
    host memory at the format's bytes."""
    from omnimem.sizing import host_history_bytes
    from omnimem.store.formats import token_bytes

    config = OmniMemConfig(block_size=7, top_k=3, sink_tokens=7, local_tokens=9)
    sizes = dict(num_kv_heads=3, head_dim=9, batch=2, dtype=torch.bfloat16, config=config, max_chunk_tokens=9)
    cache = OmniMemCache(119, **sizes, layout=layout, kv_format=kv_format, offload=True)
    tier = cache._offload
    native = [*tier.fresh, *(t for pair in tier.work for t in pair)]
    held = (
        sum(store.nbytes for store in (*tier.stores, tier.fresh_store))
        + cache.key_block_sums.nbytes
        + sum(t.untyped_storage().nbytes() for t in native)
    )
    assert all(t.device == cache.device for pair in tier.work for t in pair)
    assert kv_cache_bytes(119, **sizes, kv_format=kv_format, offload=True) == held
    assert tier.store.k.device.type == "cpu"
    per_token = token_bytes(kv_format, head_dim=9, block_size=7) * 2 * 3
    assert tier.store.nbytes == pytest.approx(119 * per_token, abs=1)
    host = dict(num_kv_heads=3, head_dim=9, batch=2, block_size=7)
    assert tier.store.nbytes == host_history_bytes(119, kv_format=kv_format, **host)
    grown = kv_cache_bytes(238, **sizes, kv_format=kv_format, offload=True)
    assert grown - held == 17 * 2 * 3 * 9 * 4  # only the float32 key sums of 17 more blocks


@pytest.mark.parametrize("kv_format", ["fp8", "int4"])
@pytest.mark.parametrize("layout", ["blhd", "bhld"])
def test_quantized_gated_cache_allocates_what_kv_cache_bytes_says(kv_format, layout):
    """A quantized GatedCache holds the quantized blocks, the native live region and the block
    means on the device (no native history): exactly kv_cache_bytes(kv_format=...)."""
    gated = GatedConfig(block_size=6, window_tokens=20)
    sizes = dict(batch=2, num_kv_heads=3, head_dim=9, dtype=torch.bfloat16, config=gated)
    cache = GatedCache(121, **sizes, layout=layout, kv_format=kv_format, max_chunk_tokens=9)
    pooled, tier = cache.pooled, cache._offload
    held = tier.store.nbytes + sum(
        x.untyped_storage().nbytes()
        for x in (pooled.k, pooled.k_attn, pooled.v_attn, pooled.k_bounds, tier._k, tier._v)
    )
    bounds = pooled.k_bounds.nbytes  # bf16 caches keep bounds for the first selection pass
    assert kv_cache_bytes(121, **sizes, kv_format=kv_format, max_chunk_tokens=9) + bounds == held
    assert cache.k.untyped_storage().nbytes() <= 2  # the history has no native buffer


@pytest.mark.parametrize("kv_format", ["fp8", "int4"])
def test_offloaded_quantized_gated_cache_allocates_what_kv_cache_bytes_says(kv_format):
    """Offloaded and quantized, a GatedCache keeps on the device the native live region, the
    block means, a scratch store (one flush) and a staging store (every group's top_k blocks):
    exactly kv_cache_bytes(offload=True, kv_format=...); the quantized history is in host
    memory (host_history_bytes)."""
    from omnimem.sizing import host_history_bytes

    gated = GatedConfig(block_size=6, window_tokens=20)
    sizes = dict(batch=2, num_kv_heads=3, head_dim=9, dtype=torch.bfloat16, config=gated)
    cache = GatedCache(121, **sizes, kv_format=kv_format, max_chunk_tokens=9, offload=True)
    pooled, tier = cache.pooled, cache._offload
    held = (
        tier.scratch.nbytes
        + tier.staged.nbytes
        + sum(
            x.untyped_storage().nbytes()
            for x in (pooled.k, pooled.k_attn, pooled.v_attn, pooled.k_bounds, tier._k, tier._v)
        )
    )
    need = kv_cache_bytes(121, **sizes, kv_format=kv_format, max_chunk_tokens=9, offload=True)
    assert need + pooled.k_bounds.nbytes == held
    assert tier.store.k.device.type == "cpu" and cache.offloaded
    host = dict(num_kv_heads=3, head_dim=9, batch=2, block_size=6)
    assert tier.store.nbytes == host_history_bytes(121, kv_format=kv_format, **host)
