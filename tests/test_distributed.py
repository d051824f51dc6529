"""Head-sharded OmniMem on 2 CPU processes (gloo) equals the single-process computation."""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from omnimem import OmniMemCache, OmniMemConfig, cached_attention, distributed
from omnimem.distributed import head_shard, sharded_cache, ulysses_attention

WORLD = 2
HQ, HKV, DIM, CHUNK, CHUNKS, STEPS = 4, 2, 8, 6, 4, 2
CONFIG = dict(block_size=4, top_k=2, sink_tokens=4, local_tokens=4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def inputs(chunk: int, step: int, hq: int = HQ, hkv: int = HKV) -> tuple[torch.Tensor, ...]:
    """The same chunk on every process: [B, L, H, D] q, k, v."""
    gen = torch.Generator().manual_seed(1000 * chunk + step)
    return tuple(torch.randn(1, CHUNK, heads, DIM, generator=gen) for heads in (hq, hkv, hkv))


def make_cache(heads: int, backend: str) -> dict:
    return dict(
        capacity=CHUNK * CHUNKS,
        max_chunk_tokens=CHUNK,
        batch=1,
        head_dim=DIM,
        config=OmniMemConfig(**CONFIG, backend=backend, compile=False),
        layout="blhd",
    ) | ({"num_kv_heads": heads})


def worker(rank: int, port: int, backend: str, mode: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        # Pipelined: 2 KV heads per rank, attended one at a time while the other is in transit.
        pipeline, hq, hkv = (2, 2 * HQ, 2 * HKV) if mode == "ulysses_pipelined" else (1, HQ, HKV)
        reference = OmniMemCache(**make_cache(hkv, backend))
        sharded = sharded_cache(**make_cache(hkv, backend))
        tokens = slice(rank * CHUNK // WORLD, (rank + 1) * CHUNK // WORLD)
        q_heads, kv_heads = head_shard(hq), head_shard(hkv)
        for chunk in range(CHUNKS):
            for step in range(STEPS + 1):
                commit = step == STEPS
                q, k, v = inputs(chunk, step, hq, hkv)
                expected = cached_attention(q, k, v, reference, commit=commit)
                if mode.startswith("ulysses"):
                    shards = (q[:, tokens], k[:, tokens], v[:, tokens])
                    out = ulysses_attention(*shards, sharded, commit=commit, pipeline=pipeline)
                    torch.testing.assert_close(out, expected[:, tokens], atol=0, rtol=0)
                else:  # plain head parallel: the rank already holds its heads
                    out = cached_attention(
                        q[:, :, q_heads], k[:, :, kv_heads], v[:, :, kv_heads], sharded, commit=commit
                    )
                    torch.testing.assert_close(out, expected[:, :, q_heads], atol=0, rtol=0)
        assert sharded.history_len == reference.history_len == CHUNK * CHUNKS
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ulysses", "ulysses_pipelined", "head_parallel"])
@pytest.mark.parametrize("backend", ["dense", "gather", "flex"])
def test_two_process_sharding_equals_one_process(backend, mode):
    mp.spawn(worker, args=(free_port(), backend, mode), nprocs=WORLD, join=True)


def uneven_worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        with pytest.raises(
            ValueError, match=r"num_heads \(3\) must be a multiple of the process group's size \(2\)"
        ):
            sharded_cache(**make_cache(3, "dense"))
        cache = sharded_cache(**make_cache(HKV, "dense"))
        q, k, v = inputs(0, 0)
        with pytest.raises(
            ValueError, match="pipeline must be a positive int dividing this rank's 1 KV heads"
        ):
            ulysses_attention(q[:, :3], k[:, :3], v[:, :3], cache, pipeline=2)
        with pytest.raises(TypeError, match="pipeline must be an int"):
            ulysses_attention(q[:, :3], k[:, :3], v[:, :3], cache, pipeline=True)
    finally:
        dist.destroy_process_group()


def test_uneven_heads_are_refused():
    mp.spawn(uneven_worker, args=(free_port(),), nprocs=WORLD, join=True)


def load_wan_block():
    """``benchmarks/wan_block.py`` (not a package): the block the 2-GPU benchmark times."""
    path = Path(__file__).parents[1] / "benchmarks" / "wan_block.py"
    spec = importlib.util.spec_from_file_location("wan_block", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def block_worker(rank: int, port: int, pipeline: int) -> None:
    """A Wan-shaped block under Ulysses (token-sharded projections and MLP, head-sharded
    attention) equals the block on one process, chunk after chunk through the caches."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        wan_block = load_wan_block()
        torch.manual_seed(0)
        heads, dim = 4, 8
        block = wan_block.WanBlock(heads * dim, heads, 48).double()
        kwargs = make_cache(heads, "dense") | dict(dtype=torch.float64)
        full, sharded = OmniMemCache(**kwargs), sharded_cache(**kwargs)
        tokens = slice(rank * CHUNK // WORLD, (rank + 1) * CHUNK // WORLD)
        for chunk in range(CHUNKS):
            gen = torch.Generator().manual_seed(chunk)
            x = torch.randn(1, CHUNK, heads * dim, generator=gen, dtype=torch.float64)
            e = torch.randn(1, 6, heads * dim, generator=gen, dtype=torch.float64)
            context = torch.randn(1, 5, heads * dim, generator=gen, dtype=torch.float64)
            rope = wan_block.rope_tables(torch.arange(chunk * CHUNK, (chunk + 1) * CHUNK), dim)
            for commit in (False, True):

                def one(q, k, v, commit=commit):
                    return cached_attention(q, k, v, full, commit=commit)

                def two(q, k, v, commit=commit):
                    return ulysses_attention(q, k, v, sharded, commit=commit, pipeline=pipeline)

                expected = block(x, e, context, rope, one)
                out = block(x[:, tokens], e, context, rope[tokens], two)
                torch.testing.assert_close(out, expected[:, tokens], atol=1e-12, rtol=1e-12)
        assert sharded.history_len == full.history_len == CHUNK * CHUNKS
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("pipeline", [1, 2])
def test_wan_block_under_ulysses_equals_one_process(pipeline):
    mp.spawn(block_worker, args=(free_port(), pipeline), nprocs=WORLD, join=True)


@pytest.mark.parametrize("kv_heads", [2, 8])
def test_few_heads_per_rank_are_logged_once(kv_heads, caplog):
    """Sharding that cannot pay run eagerly says so once per shape; the call still works."""
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        distributed._say_few_heads.cache_clear()
        cache = sharded_cache(**make_cache(kv_heads, "dense"))
        q, k, v = inputs(0, 0, hq=kv_heads, hkv=kv_heads)
        with caplog.at_level(logging.INFO, logger="omnimem"):
            for _ in range(2):
                out = ulysses_attention(q, k, v, cache)
        expected = cached_attention(q, k, v, OmniMemCache(**make_cache(kv_heads, "dense")))
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
        said = [r.getMessage() for r in caplog.records if "KV heads per rank" in r.getMessage()]
        if kv_heads < distributed.FEW_HEADS_PER_RANK:
            assert len(said) == 1
            assert said[0].startswith(f"ulysses_attention: {kv_heads} KV heads per rank over 1 ranks")
        else:
            assert said == []
    finally:
        dist.destroy_process_group()
