"""CPU micro-benchmarks (pytest-benchmark): a regression shows up without a GPU.

Small shapes (4 heads x 32, chunks of 192 queries, 4,608 history tokens, 64-token blocks):
selection from a cache's block sums, a cache commit, ``attend_at``, and every CPU backend.
Not part of the test run (``testpaths`` leaves ``benchmarks/`` out). Save a baseline, then
compare against it (``STORE=--benchmark-storage=benchmarks/results/cpu``):

    pytest benchmarks/test_cpu_micro.py --benchmark-only $STORE --benchmark-autosave
    pytest benchmarks/test_cpu_micro.py --benchmark-only $STORE --benchmark-compare
"""

from __future__ import annotations

import pytest
import torch

from omnimem import OmniMemCache, OmniMemConfig, select_blocks, sparse_attention

pytest.importorskip("pytest_benchmark")

HEADS, DIM, FRAME, HISTORY = 4, 32, 64, 72 * 64
CHUNK = 3 * FRAME
CONFIG = OmniMemConfig(block_size=FRAME, top_k=8, sink_tokens=FRAME, local_tokens=CHUNK, compile=False)


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, CHUNK, DIM, generator=gen)
    k = torch.randn(1, HEADS, HISTORY + CHUNK, DIM, generator=gen)
    return q, k, torch.randn_like(k)


@pytest.fixture(scope="module")
def cache(inputs) -> OmniMemCache:
    _, k, v = inputs
    sizes = dict(max_chunk_tokens=CHUNK, batch=1, num_kv_heads=HEADS, head_dim=DIM, config=CONFIG)
    cache = OmniMemCache(HISTORY + 4 * CHUNK, **sizes)
    cache.load_state_dict(dict(k=k[:, :, :HISTORY], v=v[:, :, :HISTORY], history_len=HISTORY))
    return cache


def test_selection_from_block_sums(benchmark, inputs, cache):
    q, *_ = inputs
    sums = cache.key_block_sums
    benchmark(
        select_blocks, q, cache.k, history_len=HISTORY, chunk_len=CHUNK, config=CONFIG, key_block_sums=sums
    )


@pytest.mark.parametrize("backend", ["gather", "dense", "flex"])
def test_backend(benchmark, inputs, backend):
    q, k, v = inputs
    benchmark(sparse_attention, q, k, v, history_len=HISTORY, config=CONFIG.replace(backend=backend))


def test_sdpa_over_the_whole_history(benchmark, inputs):
    q, k, v = inputs
    benchmark(torch.nn.functional.scaled_dot_product_attention, q, k, v)


def test_cache_commit_and_rewind(benchmark, inputs, cache):
    _, k, v = inputs
    chunk_k, chunk_v = k[:, :, HISTORY:], v[:, :, HISTORY:]

    def commit():
        cache.commit(chunk_k, chunk_v)
        cache.rewind(HISTORY)

    benchmark(commit)


def test_attend_at(benchmark, inputs, cache):
    q, k, v = inputs
    chunk_k, chunk_v = k[:, :, HISTORY:], v[:, :, HISTORY:]
    cache.rewind(HISTORY)
    benchmark(cache.attend_at, q, chunk_k, chunk_v, start=HISTORY)
