"""OmniMemCache-driven attention equals stateless sparse_attention, across an AR rollout."""

from __future__ import annotations

import atexit
import shutil
import tempfile

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omnimem import OmniMemConfig, sparse_attention
from omnimem.selection import block_key_sums
from omnimem.sparse.cache import OmniMemCache
from omnimem.store.index import Int8BlockSums
from tests.inputs import TEST_DEVICE

from .cases import retrieval_configs
from .conftest import examples

MAX_CHUNK = 12  # the largest drawn chunk


@st.composite
def rollouts(draw):
    kv_heads = draw(st.integers(1, 2))
    return dict(
        batch=draw(st.integers(1, 2)),
        kv_heads=kv_heads,
        q_heads=kv_heads * draw(st.sampled_from([1, 2])),
        head_dim=draw(st.sampled_from([4, 8])),
        chunks=draw(st.lists(st.integers(1, 12), min_size=1, max_size=6)),
        steps=draw(st.integers(1, 3)),
        layout=draw(st.sampled_from(["bhld", "blhd"])),
        config=draw(retrieval_configs()),
        backend=draw(
            st.sampled_from(
                [
                    dict(backend="dense"),
                    dict(backend="flex", compile=False),
                    dict(backend="gather"),
                    dict(backend="triton"),
                ]
            )
        ),
        restore_after=draw(st.integers(0, 6)),
        index_format=draw(st.sampled_from(["float32", "int8"])),
        seed=draw(st.integers(0, 2**16)),
    )


class Rollout:
    """What a drawn rollout fixes: shapes, config, a cache factory and its random inputs."""

    def __init__(self, rollout: dict) -> None:
        self.gen = torch.Generator().manual_seed(rollout["seed"])
        self.batch, self.hq, self.hkv = rollout["batch"], rollout["q_heads"], rollout["kv_heads"]
        self.backend = rollout["backend"]["backend"]
        # Tensor-core tiles on GPUs need head dims >= 16.
        gpu_triton = self.backend == "triton" and str(TEST_DEVICE).startswith("cuda")
        self.dim = 16 if gpu_triton else rollout["head_dim"]
        self.config = OmniMemConfig(**rollout["config"], **rollout["backend"])
        self.capacity, self.layout = sum(rollout["chunks"]), rollout["layout"]
        self.index_format = rollout["index_format"]

    def index(self, k: torch.Tensor, history_len: int) -> torch.Tensor | Int8BlockSums | None:
        """What the cache keeps for ``k``'s history: nothing to pass (float32, the stateless
        call sums it alike) or the int8 index of those sums."""
        if self.index_format == "float32":
            return None
        sums = block_key_sums(k, torch.tensor(history_len, device=k.device), self.config.block_size)
        index = Int8BlockSums.zeros(*sums.shape, device=k.device)
        index[:, :, :] = sums
        return index

    def cache(self, **kwargs: object) -> OmniMemCache:
        return OmniMemCache(
            self.capacity,
            max_chunk_tokens=MAX_CHUNK,
            batch=self.batch,
            num_kv_heads=self.hkv,
            head_dim=self.dim,
            config=self.config,
            device=TEST_DEVICE,
            layout=self.layout,
            index_format=self.index_format,
            **kwargs,
        )

    def rand(self, heads: int, length: int) -> torch.Tensor:
        return torch.randn(self.batch, heads, length, self.dim, generator=self.gen).to(TEST_DEVICE)


@settings(max_examples=examples(30))
@given(rollout=rollouts())
def test_cache_attention_equals_stateless_attention_bit_for_bit(rollout):
    run = Rollout(rollout)
    cache = run.cache()
    history_k = torch.zeros(run.batch, run.hkv, 0, run.dim, device=TEST_DEVICE)
    history_v = torch.zeros_like(history_k)
    for index, chunk_len in enumerate(rollout["chunks"]):
        if index == rollout["restore_after"]:
            restored = run.cache()
            restored.load_state_dict(cache.state_dict())
            cache = restored
        for _ in range(rollout["steps"]):  # denoising steps: attend, never store
            q = run.rand(run.hq, chunk_len)
            k_chunk, v_chunk = run.rand(run.hkv, chunk_len), run.rand(run.hkv, chunk_len)
            out, lse = cache.attend(q, k_chunk, v_chunk, return_lse=True)
            # The same call, stateless, on a fresh buffer of the cache's shape.
            k_ref, v_ref = torch.zeros_like(cache.k), torch.zeros_like(cache.v)
            history_len = history_k.shape[2]
            k_ref[:, :, : history_len + chunk_len] = torch.cat([history_k, k_chunk], dim=2)
            v_ref[:, :, : history_len + chunk_len] = torch.cat([history_v, v_chunk], dim=2)
            expected, expected_lse = sparse_attention(
                q,
                k_ref,
                v_ref,
                history_len=history_len,
                chunk_len=chunk_len,
                config=run.config,
                return_lse=True,
                key_block_sums=run.index(k_ref, history_len),
            )
            assert torch.equal(out, expected)
            assert torch.equal(lse, expected_lse)
            # And the plain definition: history and chunk concatenated, no spare buffer.
            plain = sparse_attention(
                q,
                k_ref[:, :, : history_len + chunk_len],
                v_ref[:, :, : history_len + chunk_len],
                config=run.config,
                key_block_sums=run.index(k_ref[:, :, : history_len + chunk_len], history_len),
            )
            torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)
        cache.commit(k_chunk, v_chunk)
        history_k, history_v = torch.cat([history_k, k_chunk], 2), torch.cat([history_v, v_chunk], 2)
        assert cache.history_len == history_k.shape[2]


DISK = tempfile.mkdtemp(prefix="omnimem-property-")  # the disk tier's files: unlinked at once
atexit.register(shutil.rmtree, DISK, True)


@settings(max_examples=examples(30))
@given(rollout=rollouts(), commits_between_calls=st.booleans(), on_disk=st.booleans())
def test_offloaded_cache_equals_resident_cache(rollout, commits_between_calls, on_disk):
    """Host offload changes where blocks live, not the math: triton and gather (same blocks, same
    order) are bit-identical; dense and flex (another buffer length) agree to float32 rounding.
    Every source of a staged block is exercised: the previous call, the last commit, the host
    (always, when chunks are committed without a call in between). ``on_disk``: the history in
    a file (``disk=``), its blocks staged through the bounce rows."""
    run = Rollout(rollout)
    where = dict(offload=True, disk=DISK if on_disk else None)
    resident, offloaded = run.cache(), run.cache(**where)
    for index, chunk_len in enumerate(rollout["chunks"]):
        if index == rollout["restore_after"]:
            state = offloaded.state_dict()
            offloaded = run.cache(**where)
            offloaded.load_state_dict(state)
        k_chunk, v_chunk = run.rand(run.hkv, chunk_len), run.rand(run.hkv, chunk_len)
        for _ in range(0 if commits_between_calls and index % 2 else rollout["steps"]):
            q = run.rand(run.hq, chunk_len)
            k_chunk, v_chunk = run.rand(run.hkv, chunk_len), run.rand(run.hkv, chunk_len)
            expected, expected_lse = resident.attend(q, k_chunk, v_chunk, return_lse=True)
            out, lse = offloaded.attend(q, k_chunk, v_chunk, return_lse=True)
            if run.backend in ("triton", "gather"):
                assert torch.equal(out, expected) and torch.equal(lse, expected_lse)
            else:
                torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        resident.commit(k_chunk, v_chunk)
        offloaded.commit(k_chunk, v_chunk)
        if run.index_format == "int8":
            assert torch.equal(offloaded.key_block_sums.codes, resident.key_block_sums.codes)
            assert torch.equal(offloaded.key_block_sums.step, resident.key_block_sums.step)
        else:
            assert torch.equal(offloaded.key_block_sums, resident.key_block_sums)
    assert 0.0 <= offloaded.offload_stats.hit_rate <= 1.0
