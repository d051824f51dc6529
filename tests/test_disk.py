"""The disk tier (``omnimem.store.disk``, ``OmniMemCache(offload=True, disk=...)``,
``patch_causal_wan(..., disk=...)``): a file-backed history staged through page-locked bounce
rows, bit-identical to the resident and the host-offloaded caches."""

from __future__ import annotations

import copy
import errno
import os

import pytest
import torch

from omnimem import OmniMemConfig
from omnimem.causal_wan import patch_causal_wan
from omnimem.gated.wan import wan_rope_freqs
from omnimem.positions import RelativeTime, wan_time_table
from omnimem.sparse.cache import OmniMemCache
from omnimem.store.disk import disk_zeros

from .inputs import TEST_DEVICE
from .test_causal_wan import CHUNK, FREQS, FULL, GRID, StandinPipeline, chunks, model


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("relative", [False, True])
def test_a_disk_history_equals_the_resident_and_host_ones_bit_for_bit(
    tmp_path, layout, relative, poisoned_allocations
):
    config = OmniMemConfig(block_size=4, top_k=2, sink_tokens=4, local_tokens=8, backend="gather",
                           query_group_size=3)  # fmt: skip
    time = RelativeTime(wan_time_table(wan_rope_freqs(8, positions=256)), frame_tokens=4)
    kw = dict(max_chunk_tokens=8, batch=2, num_kv_heads=2, head_dim=8, config=config, layout=layout,
              positions=time if relative else None, device=TEST_DEVICE)  # fmt: skip
    resident, host = OmniMemCache(200, **kw), OmniMemCache(200, **kw, offload=True)
    disk = OmniMemCache(200, **kw, offload=True, disk=tmp_path)
    assert os.listdir(tmp_path) == []  # unlinked once mapped: nothing stays behind
    gen, start = torch.Generator().manual_seed(0), 0
    for c in range(20):
        length = 8 if c % 3 else 5  # chunks that straddle blocks
        q = torch.randn(2, 4, length, 8, generator=gen).to(TEST_DEVICE)
        k, v = (torch.randn(2, 2, length, 8, generator=gen).to(TEST_DEVICE) for _ in "kv")
        for _ in range(2):  # a denoising pass, then the clean one
            want = resident.attend_at(q, k, v, start=start)
            torch.testing.assert_close(host.attend_at(q, k, v, start=start), want, rtol=0, atol=0)
            torch.testing.assert_close(disk.attend_at(q, k, v, start=start), want, rtol=0, atol=0)
        start += length
    assert disk.offload_stats.fetched_bytes == host.offload_stats.fetched_bytes > 0
    disk.reset()
    assert disk.history_len == 0


def test_disk_zeros_refuses_a_full_disk_and_a_bad_directory(tmp_path, monkeypatch):
    tensor = disk_zeros((2, 3), torch.float32, tmp_path)
    assert torch.equal(tensor, torch.zeros(2, 3)) and os.listdir(tmp_path) == []

    def full(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(ValueError, match=r"cannot hold the history: 0.00 GiB needed, .* GiB free \(No space"):
        disk_zeros((4, 4), torch.float32, tmp_path)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="must be a writable directory"):
        disk_zeros((4,), torch.float32, tmp_path / "missing")
    kw = dict(max_chunk_tokens=8, batch=1, num_kv_heads=1, head_dim=8, disk=tmp_path)
    with pytest.raises(TypeError, match="disk must be a directory path or None, got int"):
        OmniMemCache(16, **{**kw, "disk": 3}, offload=True)
    with pytest.raises(ValueError, match=r"the histories of 2 layers: .* GiB needed on disk="):
        OmniMemCache.for_layers(2, 2**40, **kw, offload=True)
    with pytest.raises(ValueError, match=r"OmniMemCache\(disk=...\) keeps an offloaded history in a file"):
        OmniMemCache(16, **kw)
    with pytest.raises(ValueError, match=r"the histories of 2 layers: .* GiB needed on disk="):
        OmniMemCache.for_layers(2, 2**40, **kw, offload=True, kv_format="int4")


@pytest.mark.parametrize(
    ("kv_format", "backend", "relative"),
    [("fp8", "gather", False), ("int4", "gather", True), ("fp8", "triton", True), ("int4", "triton", False)],
)
def test_a_quantized_history_on_disk_equals_the_one_in_host_memory_bit_for_bit(
    tmp_path, kv_format, backend, relative, poisoned_allocations
):
    """The store's bytes (scales included) in files: a call gathers the blocks it fetches into
    page-locked bounce slots, then stages them like host memory. Same bits as the store in host
    memory, on the reference path (gather) and the in-place kernel (triton), relative positions
    too; nothing stays on disk."""
    if backend == "triton" and TEST_DEVICE.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton kernels run on CUDA or under TRITON_INTERPRET=1")
    config = OmniMemConfig(block_size=4, top_k=2, sink_tokens=4, local_tokens=8, backend=backend,
                           query_group_size=3 if backend == "gather" else None)  # fmt: skip
    time = RelativeTime(wan_time_table(wan_rope_freqs(16, positions=256)), frame_tokens=4)
    kw = dict(max_chunk_tokens=8, batch=1, num_kv_heads=2, head_dim=16, config=config, offload=True,
              kv_format=kv_format, positions=time if relative else None, device=TEST_DEVICE)  # fmt: skip
    host, disk = OmniMemCache(200, **kw), OmniMemCache(200, **kw, disk=tmp_path)
    assert os.listdir(tmp_path) == []
    gen, start = torch.Generator().manual_seed(1), 0
    for c in range(12):
        length = 8 if c % 3 else 5
        q = torch.randn(1, 4, length, 16, generator=gen).to(TEST_DEVICE)
        k, v = (torch.randn(1, 2, length, 16, generator=gen).to(TEST_DEVICE) for _ in "kv")
        for _ in range(2):
            want = host.attend_at(q, k, v, start=start)
            torch.testing.assert_close(disk.attend_at(q, k, v, start=start), want, rtol=0, atol=0)
        start += length
    assert disk.offload_stats.fetched_bytes == host.offload_stats.fetched_bytes > 0
    assert disk._offload.store.k.data_ptr() != 0 and os.listdir(tmp_path) == []


def test_the_patched_model_keeps_its_history_on_disk(tmp_path):
    theirs = model()
    ours = copy.deepcopy(theirs)
    patch_causal_wan(ours, FULL, max_frames=12, offload=True, disk=tmp_path)
    inputs = chunks(5)
    want = StandinPipeline(theirs, buffer_tokens=5 * CHUNK).inference(inputs, GRID, FREQS)
    pipeline = StandinPipeline(ours, buffer_tokens=5 * CHUNK)
    got = pipeline.inference(inputs, GRID, FREQS)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)
    assert pipeline.kv_cache1[0]["omnimem"].disk == os.fspath(tmp_path)
    with pytest.raises(ValueError, match="disk= needs offload=True"):
        patch_causal_wan(copy.deepcopy(theirs), FULL, max_frames=12, disk=tmp_path)
    quantized = copy.deepcopy(theirs)  # int4 on disk: the same call, 0.27x the bytes
    patch_causal_wan(quantized, FULL, max_frames=12, offload=True, disk=tmp_path, kv_format="int4")
    pipeline = StandinPipeline(quantized, buffer_tokens=5 * CHUNK)
    pipeline.inference(inputs, GRID, FREQS)
    assert pipeline.kv_cache1[0]["omnimem"]._offload.quantized_bounce is not None
    missing = copy.deepcopy(theirs)
    patch_causal_wan(missing, FULL, max_frames=12, offload=True, disk=tmp_path / "missing")
    with pytest.raises(ValueError, match=r"disk=.*missing' must be a writable directory"):
        StandinPipeline(missing, buffer_tokens=5 * CHUNK).inference(inputs, GRID, FREQS)


def test_the_authors_layers_keep_their_history_on_disk(tmp_path):
    """GatedCache(offload=True, disk=...) through patch_causal_wan: the same outputs as
    resident, bit for bit (the host gathers the selected blocks from the file)."""
    from omnimem import GatedCache, GatedConfig

    from .test_causal_wan import _nsa_model, chunks

    resident, on_disk = _nsa_model(), _nsa_model()
    patch_causal_wan(resident, GatedConfig(backend="gather"), max_frames=10)
    patch_causal_wan(on_disk, GatedConfig(backend="gather"), max_frames=10, offload=True, disk=tmp_path)
    for start_frame in (0, 2, 4, 6, 8):
        x = chunks(1, seed=start_frame)[0]
        for _ in range(2):  # a denoising pass, then the commit pass
            want = resident[0](x, None, GRID, FREQS, start_frame)
            torch.testing.assert_close(on_disk[0](x, None, GRID, FREQS, start_frame), want, atol=0, rtol=0)
    assert on_disk[0]._cache.disk == os.fspath(tmp_path) and os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match=r"GatedCache\(disk=...\) keeps an offloaded history in a file"):
        GatedCache(16, batch=1, num_kv_heads=1, head_dim=8, disk=tmp_path)
    # Quantized too: the store's bytes in files, the host gathers a call's selected blocks.
    host, disk = _nsa_model(), _nsa_model()
    rules = dict(max_frames=10, offload=True, kv_format="int4")
    patch_causal_wan(host, GatedConfig(backend="gather"), **rules)
    patch_causal_wan(disk, GatedConfig(backend="gather"), **rules, disk=tmp_path)
    for start_frame in (0, 2, 4, 6, 8):
        x = chunks(1, seed=start_frame)[0]
        for _ in range(2):
            want = host[0](x, None, GRID, FREQS, start_frame)
            torch.testing.assert_close(disk[0](x, None, GRID, FREQS, start_frame), want, atol=0, rtol=0)
    assert disk[0]._cache._offload.store.disk == os.fspath(tmp_path) and os.listdir(tmp_path) == []
    with pytest.raises(TypeError, match="GatedCache disk must be a directory path or None, got int"):
        GatedCache(16, batch=1, num_kv_heads=1, head_dim=8, offload=True, max_chunk_tokens=4, disk=1)
