"""No host syncs on the hot path (GPU only).

Every per-call entry point runs its steady-state calls under
``torch.cuda.set_sync_debug_mode("error")``, where a synchronizing CUDA call (``.item()``, a
device-to-host copy, ``nonzero``, a pageable host-to-device copy, a stream synchronize) raises.
First calls may plan, compile and capture; the calls checked are the ones that follow, with the
history grown in between (a rollout), as a model runs them.
"""

from __future__ import annotations

import contextlib
import socket

import pytest
import torch
import torch.distributed as dist

from omnimem import (
    GatedCache,
    GatedConfig,
    OmniMemCache,
    OmniMemConfig,
    cached_attention,
    gated_attention,
    select_blocks,
    sparse_attention,
)
from omnimem.distributed import sharded_cache, ulysses_attention
from tests.inputs import ON_HOPPER, TEST_DEVICE

pytestmark = pytest.mark.skipif(TEST_DEVICE.type != "cuda", reason="host syncs exist on CUDA only")


@contextlib.contextmanager
def no_host_sync():
    """Raise on any synchronizing CUDA call inside the block."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()


def _randn(*shape, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device=TEST_DEVICE).manual_seed(seed)
    return torch.randn(*shape, device=TEST_DEVICE, dtype=dtype, generator=gen)


def test_the_check_catches_a_sync():
    """The mode this file relies on does raise, on this torch, for what would sync."""
    x = torch.ones(3, device=TEST_DEVICE)
    for sync in (lambda: x.sum().item(), lambda: x.cpu(), lambda: x.nonzero()):
        with pytest.raises(RuntimeError, match="synchroniz"), no_host_sync():
            sync()


@pytest.mark.parametrize("backend", ["triton", "flex", "gather", "dense"])
@pytest.mark.parametrize("return_lse", [False, True])
def test_sparse_attention(backend, return_lse):
    config = OmniMemConfig(block_size=128, top_k=3, sink_tokens=128, local_tokens=256, backend=backend)
    q = _randn(1, 4, 256, 128)
    k, v = _randn(1, 2, 2048, 128, seed=1), _randn(1, 2, 2048, 128, seed=2)

    def calls():
        for history in (1792, 1536):  # the history grows and shrinks between calls
            k_seen, v_seen = k[:, :, : history + 256], v[:, :, : history + 256]
            sparse_attention(q, k_seen, v_seen, history_len=history, config=config, return_lse=return_lse)
            select_blocks(q, k_seen, history_len=history, config=config)

    calls()  # plans and compiles for both shapes
    with no_host_sync():
        calls()


@pytest.mark.parametrize("backend", ["triton", "gather"])
def test_sparse_attention_backward(backend):
    config = OmniMemConfig(block_size=128, top_k=3, sink_tokens=128, local_tokens=256, backend=backend)
    q = _randn(1, 4, 256, 128).requires_grad_()
    k, v = (_randn(1, 2, 2048, 128, seed=i).requires_grad_() for i in (1, 2))

    def step():
        out = sparse_attention(q, k, v, history_len=1792, config=config)
        out.float().square().mean().backward()

    step()
    with no_host_sync():
        step()


@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("kv_format", ["native", "fp8", "int4"])
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_an_omnimem_cache_rollout(offload, cuda_graphs, kv_format, relative):
    """Denoising passes (``attend_at`` and ``cached_attention``) and commits, chunk after chunk;
    with relative positions (``omnimem.positions``) too."""
    if offload and cuda_graphs:
        pytest.skip("cuda_graphs needs a resident cache")
    if (kv_format != "native" or relative) and cuda_graphs:
        pytest.skip("quantized caches and relative positions run without CUDA graphs")
    from omnimem.gated.wan import wan_rope_freqs
    from omnimem.positions import RelativeTime, wan_time_table

    time = RelativeTime(wan_time_table(wan_rope_freqs(128, positions=1024)), frame_tokens=64)
    config = OmniMemConfig(block_size=128, top_k=3, sink_tokens=128, local_tokens=256, backend="triton")
    cache = OmniMemCache(
        4096, max_chunk_tokens=256, batch=1, num_kv_heads=4, head_dim=128, config=config,
        dtype=torch.bfloat16, device=TEST_DEVICE, layout="blhd", offload=offload, cuda_graphs=cuda_graphs,
        kv_format=kv_format, positions=time if relative else None,
    )  # fmt: skip
    chunks = [
        [tuple(_randn(1, 256, 4, 128, seed=100 * c + 10 * s + i) for i in range(3)) for s in range(3)]
        for c in range(6)
    ]

    def run(chunk, start):
        for step, (q, k, v) in enumerate(chunk):
            cache.attend_at(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), start=start)
            cached_attention(q, k, v, cache, commit=False)
            if step == len(chunk) - 1:
                cached_attention(q, k, v, cache, commit=True)

    for c in range(3):  # warm: plans, kernels, graphs
        run(chunks[c], c * 256)
    with no_host_sync():
        for c in range(3, 6):
            run(chunks[c], c * 256)


@pytest.mark.parametrize(
    ("offload", "hopper_dense", "kv_format"),
    [(False, False, "native"), (False, True, "native"), (True, False, "native"), (True, True, "native"),
     (False, False, "fp8"), (True, False, "int4")],
)  # fmt: skip
def test_a_gated_cache_rollout(offload, hopper_dense, kv_format, monkeypatch):
    """The authors' shapes scaled down (blocks of 30, groups of 15), kernels on the GPU; the
    dense branches on SDPA, or (on Hopper) on the Gluon kernel with its key threshold lowered."""
    from omnimem.backends import gated_branches

    if hopper_dense and not ON_HOPPER:
        pytest.skip("the Hopper Gluon kernel runs on compute capability 9.x only")
    monkeypatch.setattr(gated_branches, "HOPPER_MIN_KEYS", 1 if hopper_dense else 1 << 30)
    launches, hopper = [], gated_branches._hopper_dense

    def counted(*args, **kwargs):
        launches.append(1)
        return hopper(*args, **kwargs)

    monkeypatch.setattr(gated_branches, "_hopper_dense", counted)
    config = GatedConfig(block_size=30, query_group_size=15, top_k=4, window_tokens=180, backend="triton")
    cache = GatedCache(
        1800, batch=1, num_kv_heads=2, head_dim=64, config=config, dtype=torch.bfloat16, device=TEST_DEVICE,
        offload=offload, max_chunk_tokens=180 if offload or kv_format != "native" else None,
        kv_format=kv_format,
    )  # fmt: skip
    gates = torch.rand(1, 4, 180, 3, device=TEST_DEVICE, dtype=torch.bfloat16)

    def run(chunk):
        for step in range(3):
            q = _randn(1, 4, 180, 64, seed=100 * chunk + 3 * step)
            k, v = (_randn(1, 2, 180, 64, seed=100 * chunk + 3 * step + i) for i in (1, 2))
            cache.attend(q, k, v, gates, start=chunk * 180)

    for chunk in range(3):
        run(chunk)
    with no_host_sync():
        for chunk in range(3, 7):
            run(chunk)
    assert bool(launches) == hopper_dense


def test_gated_attention_forward_and_backward(monkeypatch):
    from omnimem.backends import gated_branches

    monkeypatch.setattr(gated_branches, "HOPPER_MIN_KEYS", 1)  # the no-grad call's dense branches
    q = _randn(1, 4, 180, 64).requires_grad_()
    k, v = (_randn(1, 2, 1800, 64, seed=i).requires_grad_() for i in (1, 2))
    gates = torch.rand(1, 4, 180, 3, device=TEST_DEVICE, requires_grad=True)
    rules = dict(
        history_len=1620, block_size=30, query_group_size=15, top_k=4, window_tokens=360, backend="triton"
    )

    def step():
        with torch.no_grad():
            gated_attention(q, k, v, gates, **rules)
        gated_attention(q, k, v, gates, **rules).float().square().mean().backward()

    step()
    with no_host_sync():
        step()


@pytest.mark.parametrize("pipeline", [1, 2])
def test_a_ulysses_rollout(pipeline):
    """One NCCL rank: the exchange, the head-sharded cache and the commits."""
    own_group = not dist.is_initialized()
    if own_group:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        config = OmniMemConfig(block_size=128, top_k=3, sink_tokens=128, local_tokens=256, backend="triton")
        cache = sharded_cache(
            4096, max_chunk_tokens=256, batch=1, num_kv_heads=4, head_dim=128, config=config,
            dtype=torch.bfloat16, device=TEST_DEVICE, layout="blhd",
        )  # fmt: skip

        def run(c):
            for step in range(3):
                q, k, v = (_randn(1, 256, 4, 128, seed=10 * c + 3 * step + i) for i in range(3))
                ulysses_attention(q, k, v, cache, commit=step == 2, pipeline=pipeline)

        for c in range(2):
            run(c)
        with no_host_sync():
            for c in range(2, 5):
                run(c)
    finally:
        if own_group:
            dist.destroy_process_group()
