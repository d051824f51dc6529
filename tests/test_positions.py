"""Relative temporal positions (``omnimem.positions``, ``OmniMemCache(positions=...)``,
``patch_causal_wan(positions="relative")``) against float64 references written from the rule."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from omnimem import OmniMemConfig
from omnimem.causal_wan import patch_causal_wan
from omnimem.gated.wan import wan_rope_freqs
from omnimem.positions import RelativeTime, relative_frames, reserve, wan_time_table
from omnimem.sparse.cache import OmniMemCache

from .inputs import TEST_DEVICE
from .reference import relative_attention_reference, relative_frame_rule
from .test_causal_wan import DIM, FRAME, FREQS, GRID, HEADS, StandinPipeline, chunks, model

D, TPF, H = 12, 4, 2
TIME = RelativeTime(wan_time_table(wan_rope_freqs(D, positions=256)), frame_tokens=TPF)


def test_relative_frames_follow_the_rule():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        window = int(torch.randint(0, 30, (), generator=gen))
        frames = torch.randint(0, 40, (2, 3, 17), generator=gen).sort(-1).values
        valid = torch.rand(2, 3, 17, generator=gen) < 0.8
        rank = min(window, 20)
        got = relative_frames(frames, valid, window_frame=window, reserve=rank)
        for b in range(2):
            for h in range(3):
                kept = [int(f) for f, ok in zip(frames[b, h], valid[b, h], strict=True) if ok]
                want = iter(relative_frame_rule(kept, window, rank))
                for ok, p in zip(valid[b, h], got[b, h], strict=True):
                    assert int(p) == (next(want) if ok else rank)


def test_relative_time_repr_to_and_validation():
    assert repr(TIME) == "RelativeTime(positions=256, pairs=2, frame_tokens=4)"
    assert TIME.to("cpu").freqs.device.type == "cpu"
    with pytest.raises(TypeError, match="complex"):
        RelativeTime(torch.zeros(4, 2), frame_tokens=4)
    with pytest.raises(ValueError, match="frame_tokens must be a positive int"):
        RelativeTime(TIME.freqs, frame_tokens=0)
    with pytest.raises(ValueError, match="with cuda_graphs=True is not supported"):
        OmniMemCache(64, max_chunk_tokens=8, batch=1, num_kv_heads=H, head_dim=D, positions=TIME,
                     cuda_graphs=True)  # fmt: skip
    with pytest.raises(TypeError, match=r"positions must be an omnimem\.positions\.RelativeTime"):
        OmniMemCache(64, max_chunk_tokens=8, batch=1, num_kv_heads=H, head_dim=D, positions="relative")


def _rollout(config, chunks_: int, length: int = 8, q_heads: int = H, seed: int = 0):
    """A float64 rollout through a relative cache: per chunk, two passes at the same start."""
    gen = torch.Generator().manual_seed(seed)
    cache = OmniMemCache(chunks_ * length, max_chunk_tokens=length, batch=1, num_kv_heads=H, head_dim=D,
                         config=config, dtype=torch.float64, positions=TIME)  # fmt: skip
    for c in range(chunks_):
        q = torch.randn(1, q_heads, length, D, dtype=torch.float64, generator=gen)
        k, v = (torch.randn(1, H, length, D, dtype=torch.float64, generator=gen) for _ in "kv")
        for _ in range(2):
            out = cache.attend_at(q, k, v, start=c * length)
        yield cache, q, k, v, out


def test_at_full_budget_relative_positions_are_the_absolute_ones():
    """Every frame before the window attended and the history under the reserve: relative
    positions equal absolute ones, so the cache equals dense attention at true frames."""
    config = OmniMemConfig(block_size=4, top_k=100, sink_tokens=4, local_tokens=8, backend="dense")
    keys, values = [], []
    for _, q, k, v, out in _rollout(config, 8):
        keys.append(k), values.append(v)
        k_all, v_all = torch.cat(keys, 2), torch.cat(values, 2)
        frames = torch.arange(k_all.shape[2]) // TPF
        scores = TIME.rotate(q, frames[-q.shape[2] :]) @ TIME.rotate(k_all, frames).transpose(-1, -2)
        want = (scores * D**-0.5).softmax(-1) @ v_all
        torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("groups", [None, 3])
def test_with_a_budget_the_cache_equals_the_rule_in_float64(groups, poisoned_allocations):
    """Past the budget (the reserve smaller than the frames before the window): GQA and query
    groups against ``relative_attention_reference`` (per KV head, with sets). Every
    ``torch.empty`` the library allocates starts as NaN."""
    config = OmniMemConfig(block_size=4, top_k=2, sink_tokens=4, local_tokens=8, backend="gather",
                           query_group_size=groups)  # fmt: skip
    keys, values = [], []
    for cache, q, k, v, out in _rollout(config, 12, 8, q_heads=2 * H, seed=1):
        keys.append(k), values.append(v)
        want = relative_attention_reference(
            q, torch.cat(keys, 2), torch.cat(values, 2), history=cache.history_len, chunk_len=8,
            config=config, time=TIME,
        )  # fmt: skip
        torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
    window = (cache.history_len - config.local_tokens) // TPF
    assert reserve(window, 24, 4, TPF) < window  # the retrieved frames were packed


def test_positions_past_the_table_are_refused_before_anything_changes():
    short = RelativeTime(TIME.freqs[:5], frame_tokens=TPF)
    config = OmniMemConfig(block_size=4, top_k=100, sink_tokens=4, local_tokens=8, backend="dense")
    cache = OmniMemCache(64, max_chunk_tokens=8, batch=1, num_kv_heads=H, head_dim=D, config=config,
                         dtype=torch.float64, positions=short)  # fmt: skip
    x = torch.randn(1, H, 8, D, dtype=torch.float64)
    cache.attend_at(x, x, x, start=0)  # frames 0-1
    cache.attend_at(x, x, x, start=8)  # frames 2-3: reach 3 < 5
    with pytest.raises(ValueError, match="relative positions reach frame 5, past the RoPE table's 5 frames"):
        cache.attend_at(x, x, x, start=16)
    assert (cache.history_len, cache.chunk_len) == (8, 8)  # the chunk at 8 was not promoted
    cache.rewind(16)  # its chunk becomes history: a chunk now would reach frame 5
    with pytest.raises(ValueError, match="relative positions reach frame 5"):
        cache.attend(x, x, x)
    assert (cache.history_len, cache.chunk_len) == (16, 0)


def test_the_patched_model_runs_past_its_table_with_relative_positions():
    """patch_causal_wan(positions="relative"): at full budget on a short video it equals their
    model (relative = absolute there); with a budget it runs 1,100 latent frames (their own
    dies at 1,024) with every position inside the table. Refusals at patch time."""
    everything = OmniMemConfig(block_size=128, top_k=128, sink_tokens=0, local_tokens=0, backend="dense")
    theirs = model()
    ours = copy.deepcopy(theirs)
    patch_causal_wan(ours, everything, max_frames=40, positions="relative")
    inputs = [x * 0.1 for x in chunks(20, seed=3)]
    want = StandinPipeline(theirs, buffer_tokens=40 * FRAME).inference(inputs, GRID, FREQS, passes=2)
    got = StandinPipeline(ours, buffer_tokens=40 * FRAME).inference(inputs, GRID, FREQS, passes=2)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)

    budget = OmniMemConfig(
        block_size=12, top_k=4, sink_tokens=FRAME, local_tokens=2 * FRAME, backend="gather"
    )
    long = copy.deepcopy(theirs)
    patch_causal_wan(long, budget, max_frames=1100, positions="relative")
    inputs = [x * 0.1 for x in chunks(550, seed=7)]  # 1,100 frames of 12 tokens
    pipeline = StandinPipeline(long, buffer_tokens=1100 * FRAME)
    out = pipeline.inference(inputs, GRID, FREQS, passes=1)
    assert len(out) == 550 and all(torch.isfinite(x).all() for x in out)
    assert pipeline.kv_cache1[0]["omnimem"].history_len + CHUNK_TOKENS == 1100 * FRAME
    assert FREQS.shape[0] == 1024 and math.ceil(1100 / 1024) == 2  # the table was never extended

    with pytest.raises(ValueError, match="positions must be 'absolute' or 'relative'"):
        patch_causal_wan(copy.deepcopy(theirs), max_frames=8, positions="rope")


CHUNK_TOKENS = 2 * FRAME
assert DIM // HEADS == 16


@pytest.mark.parametrize(("backend", "tol"), [("gather", 0.0), ("dense", 1e-12)])
def test_an_offloaded_relative_cache_equals_the_resident_one(backend, tol, poisoned_allocations):
    """offload=True stages the selected blocks, then rotates the staged copy: the same tokens at
    the same positions in the same order as the resident cache's compact copy, bit for bit on
    gather (dense reduces over buffers of other lengths: float64 rounding)."""
    config = OmniMemConfig(block_size=4, top_k=2, sink_tokens=4, local_tokens=8, backend=backend,
                           query_group_size=3)  # fmt: skip
    kw = dict(max_chunk_tokens=8, batch=1, num_kv_heads=H, head_dim=D, config=config, dtype=torch.float64)
    caches = [OmniMemCache(96, **kw, positions=TIME, offload=offload) for offload in (False, True)]
    gen = torch.Generator().manual_seed(2)
    for c in range(12):
        q = torch.randn(1, 2 * H, 8, D, dtype=torch.float64, generator=gen)
        k, v = (torch.randn(1, H, 8, D, dtype=torch.float64, generator=gen) for _ in "kv")
        for _ in range(2):
            resident, offloaded = (cache.attend_at(q, k, v, start=c * 8) for cache in caches)
            torch.testing.assert_close(offloaded, resident, rtol=tol, atol=tol)


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("kv_format", ["native", "fp8", "int4"])
@pytest.mark.parametrize("groups", [None, 3])
def test_the_triton_kernel_rotates_the_keys_where_they_lie(
    groups, kv_format, offload, monkeypatch, poisoned_allocations
):
    """On the triton backend the kernel reads the selected blocks where they lie (the cache, its
    quantized store, or an offloaded cache's staging) and rotates each key tile in time after
    its load: no compact copy, no rotated or dequantized copy (those paths are made to fail
    here). Against the float64 rule over the keys it holds (quantized: the dequantized ones),
    GQA, query groups, blocks straddling frames."""
    import omnimem.backends.quantized_attention
    import omnimem.sparse.offload
    from omnimem.sparse.cache import OmniMemCache as Cache
    from omnimem.store.formats import dequantize, quantize

    def no_copy(*args, **kwargs):
        raise AssertionError("a copy path ran")

    monkeypatch.setattr(Cache, "_attend_relative", no_copy)
    monkeypatch.setattr(omnimem.sparse.offload, "sparse_attention", no_copy)
    monkeypatch.setattr(omnimem.backends.quantized_attention, "dequantized_history", no_copy)
    d, length = 16, 8
    time = RelativeTime(wan_time_table(wan_rope_freqs(d, positions=256)), frame_tokens=3)
    config = OmniMemConfig(block_size=4, top_k=2, sink_tokens=4, local_tokens=8, backend="triton",
                           query_group_size=groups)  # fmt: skip
    cache = OmniMemCache(12 * length, max_chunk_tokens=length, batch=1, num_kv_heads=H, head_dim=d,
                         config=config, positions=time, device=TEST_DEVICE, kv_format=kv_format,
                         offload=offload)  # fmt: skip
    gen = torch.Generator().manual_seed(4)
    keys, values = [], []
    for c in range(12):
        q = torch.randn(1, 2 * H, length, d, generator=gen).to(TEST_DEVICE)
        k, v = (torch.randn(1, H, length, d, generator=gen).to(TEST_DEVICE) for _ in "kv")
        for _ in range(2):
            out = cache.attend_at(q, k, v, start=c * length)
        keys.append(k), values.append(v)
        k_all, v_all = torch.cat(keys, 2), torch.cat(values, 2)
        k_read, v_read = k_all.clone(), v_all.clone()
        whole = cache.history_len // 4 * 4
        if kv_format != "native" and whole:  # the whole history blocks are read dequantized
            for x, role in ((k_read, "key"), (v_read, "value")):
                x[:, :, :whole] = dequantize(
                    quantize(x[:, :, :whole], kv_format, role=role, block_size=4), x.dtype
                )
        want = relative_attention_reference(
            q, k_read, v_read, history=cache.history_len, chunk_len=length, config=config, time=time,
            k_select=k_all,
        )  # fmt: skip
        torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    assert cache.history_len // 3 - config.local_tokens // 3 > 8  # past the budget: frames were packed
