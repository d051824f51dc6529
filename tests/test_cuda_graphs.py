"""CUDA graphs and the cache: positions live on the device, so a graph of an ``attend`` stays
valid as the history grows; ``OmniMemCache(cuda_graphs=True)`` replays its own graphs."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from omnimem import OmniMemConfig, cached_attention
from omnimem.distributed import sharded_cache, ulysses_attention
from omnimem.sparse.cache import OmniMemCache
from tests.inputs import TEST_DEVICE

CUDA = pytest.mark.skipif(TEST_DEVICE.type != "cuda", reason="CUDA graphs exist on CUDA only")


def _cache(device, *, heads=4, head_dim=64, block_size=64, cuda_graphs=False, capacity=1024, chunk=96):
    config = OmniMemConfig(
        block_size=block_size, top_k=3, sink_tokens=block_size, local_tokens=chunk, backend="triton"
    )
    return OmniMemCache(
        capacity, max_chunk_tokens=chunk, batch=1, num_kv_heads=heads, head_dim=head_dim, config=config,
        dtype=torch.bfloat16, device=device, layout="blhd", cuda_graphs=cuda_graphs,
    )  # fmt: skip


def _chunks(num_chunks, steps, *, heads=4, head_dim=64, chunk=96, seed=0):
    """Per chunk: ``steps`` denoising (q, k, v) triples in ``[B, L, H, D]``, the last committed."""
    gen = torch.Generator().manual_seed(seed)
    shape = (1, chunk, heads, head_dim)
    return [
        [tuple(torch.randn(shape, generator=gen).to(torch.bfloat16) for _ in range(3)) for _ in range(steps)]
        for _ in range(num_chunks)
    ]


def test_cuda_graphs_is_validated():
    with pytest.raises(TypeError, match="cuda_graphs must be a bool"):
        OmniMemCache(64, max_chunk_tokens=8, batch=1, num_kv_heads=1, head_dim=8, cuda_graphs=1)
    with pytest.raises(ValueError, match="needs a resident CUDA cache, got device cpu"):
        OmniMemCache(64, max_chunk_tokens=8, batch=1, num_kv_heads=1, head_dim=8, cuda_graphs=True)


def test_the_device_position_follows_the_history():
    config = OmniMemConfig(block_size=8, top_k=2, sink_tokens=8, local_tokens=8, backend="dense")
    cache = OmniMemCache(64, max_chunk_tokens=16, batch=1, num_kv_heads=2, head_dim=8, config=config)
    q = k = v = torch.randn(1, 2, 12, 8)
    steps = [
        lambda: cache.commit(k, v),
        lambda: cache.attend_at(q, k, v, start=cache.history_len + cache.chunk_len),
        lambda: cache.attend_at(q, k, v, start=cache.history_len + cache.chunk_len),
        lambda: cache.rewind(5),
        lambda: cache.load_state_dict(cache.state_dict()),
        cache.reset,
    ]
    for step in steps:
        step()
        assert int(cache._history) == cache.history_len


@CUDA
# (128, 128): the Hopper kernel; (64, 32): the Triton-language kernel (blocks of under 128 tokens).
@pytest.mark.parametrize("head_dim, block_size", [(128, 128), (64, 32)])
@pytest.mark.parametrize("return_lse", [False, True])
def test_replayed_rollout_equals_the_eager_one(head_dim, block_size, return_lse, poisoned_allocations):
    """Denoising passes and commits over several chunks: the graphed cache returns exactly what
    the eager one does, and its outputs are its own (a later replay does not change them)."""
    eager, graphed = (
        _cache(TEST_DEVICE, head_dim=head_dim, block_size=block_size, cuda_graphs=g) for g in (False, True)
    )
    outputs = {False: [], True: []}
    for chunk in _chunks(5, 3, head_dim=head_dim):
        for step, qkv in enumerate(chunk):
            q, k, v = (x.to(TEST_DEVICE).transpose(1, 2) for x in qkv)
            for cache in (eager, graphed):
                outputs[cache is graphed].append(cache.attend(q, k, v, return_lse=return_lse))
                if step == len(chunk) - 1:
                    cache.commit(k, v)
    assert len(graphed._graphs) == 1 and all(entry is not False for entry in graphed._graphs.values())
    for a, b in zip(outputs[False], outputs[True], strict=True):
        for x, y in zip(*((o,) if isinstance(o, torch.Tensor) else o for o in (a, b)), strict=True):
            assert torch.isfinite(y).all()
            torch.testing.assert_close(y, x, rtol=0, atol=0)


@CUDA
def test_head_slices_replay_their_own_graphs():
    """Head groups of one cache (what ``ulysses_attention(pipeline=2)`` attends) capture one
    graph each and equal the eager cache's groups."""
    eager, graphed = (_cache(TEST_DEVICE, cuda_graphs=g) for g in (False, True))
    for chunk in _chunks(3, 2):
        for step, (q, k, v) in enumerate(chunk):
            q, k, v = (x.to(TEST_DEVICE) for x in (q, k, v))
            results = []
            for cache in (eager, graphed):
                heads = [slice(h, h + 2) for h in (0, 2)]
                parts = [
                    cached_attention(q[:, :, h], k[:, :, h], v[:, :, h], cache._head_slice(h)) for h in heads
                ]
                results.append(torch.cat(parts, dim=2))
                if step == len(chunk) - 1:
                    cache.commit(k.transpose(1, 2), v.transpose(1, 2))
            torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
    assert len(graphed._graphs) == 2


@CUDA
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_a_graph_captured_at_one_chunk_replays_at_later_ones(cuda_graphs):
    """The caller captures a denoising pass once and replays it at every later chunk (commits
    run eagerly in between): the launched work reads the position from the device, so each
    replay attends the history as it is then. Inside the caller's capture a ``cuda_graphs``
    cache runs its eager path."""
    eager, captured = _cache(TEST_DEVICE), _cache(TEST_DEVICE, cuda_graphs=cuda_graphs)
    chunks = [[tuple(x.to(TEST_DEVICE) for x in step) for step in chunk] for chunk in _chunks(5, 2)]
    static = [torch.empty_like(x) for x in chunks[0][0]]
    graph = None
    for chunk in chunks:
        (q, k, v), final = chunk
        expected = cached_attention(q, k, v, eager)
        for buffer, x in zip(static, (q, k, v), strict=True):
            buffer.copy_(x)
        if graph is None:
            cached_attention(*static, captured)  # warm-up: compiles the kernels (and captures its own)
            own = dict(captured._graphs or {})
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = cached_attention(*static, captured)
            assert (captured._graphs or {}) == own  # inside the caller's capture: the eager path
        graph.replay()
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        for cache in (eager, captured):
            cache.commit(final[1].transpose(1, 2), final[2].transpose(1, 2))


@CUDA
@pytest.mark.parametrize("pipeline", [1, 2])
def test_a_ulysses_step_replays_as_one_graph(pipeline):
    """One NCCL rank: ``ulysses_attention`` through a ``cuda_graphs`` cache captures the whole
    step (exchange included) once and replays it; commits run eagerly; results equal the eager
    cache's exactly."""
    own_group = not dist.is_initialized()
    if own_group:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        config = OmniMemConfig(block_size=64, top_k=3, sink_tokens=64, local_tokens=96, backend="triton")
        kwargs = dict(max_chunk_tokens=96, batch=1, head_dim=64, config=config, dtype=torch.bfloat16)
        eager, graphed = (
            sharded_cache(1024, num_kv_heads=4, **kwargs, device=TEST_DEVICE, layout="blhd", cuda_graphs=g)
            for g in (False, True)
        )
        for chunk in _chunks(4, 3, heads=4):
            for step, qkv in enumerate(chunk):
                q, k, v = (x.to(TEST_DEVICE) for x in qkv)
                commit = step == len(chunk) - 1
                outs = [
                    ulysses_attention(q, k, v, c, commit=commit, pipeline=pipeline) for c in (eager, graphed)
                ]
                torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
        # One graph for the denoising steps; the commit passes run eagerly (their attends through
        # the cache's own graphs).
        assert sum(key[0] == "ulysses" for key in graphed._graphs) == 1
    finally:
        if own_group:
            dist.destroy_process_group()
