"""Hypothesis state machines: random sequences of cache operations against a plain model of
what the cache must hold (a list of committed tokens), including refused operations, which
must leave the cache as it was."""

from __future__ import annotations

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from omnimem import GatedCache, OmniMemConfig, gated_attention, sparse_attention
from omnimem.sparse.cache import OmniMemCache
from tests.inputs import TEST_DEVICE

from .conftest import examples

HEADS, DIM, CAPACITY, MAX_CHUNK = 2, 8, 40, 8
CONFIG = OmniMemConfig(block_size=5, top_k=2, sink_tokens=3, local_tokens=6, backend="dense")


def rand(gen: torch.Generator, length: int) -> torch.Tensor:
    return torch.randn(1, HEADS, length, DIM, generator=gen).to(TEST_DEVICE)


class OmniMemCacheMachine(RuleBasedStateMachine):
    """A resident and an offloaded cache driven in lockstep; the model is the committed keys
    and values. Every attend equals the stateless call over the model's history."""

    @initialize(seed=st.integers(0, 2**16))
    def start(self, seed):
        self.gen = torch.Generator().manual_seed(seed)
        self.caches = [
            OmniMemCache(
                CAPACITY,
                max_chunk_tokens=MAX_CHUNK,
                batch=1,
                num_kv_heads=HEADS,
                head_dim=DIM,
                config=CONFIG,
                device=TEST_DEVICE,
                offload=offload,
            )
            for offload in (False, True)
        ]
        self.k = torch.zeros(1, HEADS, 0, DIM, device=TEST_DEVICE)
        self.v = torch.zeros_like(self.k)
        self.chunk = None  # attend_at's current chunk (k, v), not history yet

    def _expected(self, q, k, v):
        return sparse_attention(
            q,
            torch.cat([self.k, k], 2),
            torch.cat([self.v, v], 2),
            history_len=self.k.shape[2],
            config=CONFIG,
        )

    @rule(length=st.integers(1, MAX_CHUNK))
    def attend(self, length):
        q, k, v = rand(self.gen, length), rand(self.gen, length), rand(self.gen, length)
        want = sparse_attention(
            q,
            torch.cat([self.k, k], 2),
            torch.cat([self.v, v], 2),
            history_len=self.k.shape[2],
            config=CONFIG,
        )
        for cache in self.caches:
            torch.testing.assert_close(cache.attend(q, k, v), want, atol=1e-5, rtol=1e-5)
        self.chunk = None  # a plain attend replaces attend_at's chunk

    @rule(length=st.integers(1, MAX_CHUNK), next_chunk=st.booleans())
    def attend_at(self, length, next_chunk):
        """A pass at the current chunk's start, or the first pass of the next chunk (which
        makes the current chunk, as last written, history)."""
        q, k, v = rand(self.gen, length), rand(self.gen, length), rand(self.gen, length)
        promote = next_chunk and self.chunk is not None
        start = self.k.shape[2] + (self.chunk[0].shape[2] if promote else 0)
        if promote and start > CAPACITY:
            for cache in self.caches:
                try:
                    cache.attend_at(q, k, v, start=start)
                except ValueError as err:
                    assert "past the cache capacity" in str(err)
                else:
                    raise AssertionError("a history past the capacity was accepted")
            return
        if promote:
            self.k, self.v = torch.cat([self.k, self.chunk[0]], 2), torch.cat([self.v, self.chunk[1]], 2)
        want = self._expected(q, k, v)
        for cache in self.caches:
            torch.testing.assert_close(cache.attend_at(q, k, v, start=start), want, atol=1e-5, rtol=1e-5)
            assert cache.chunk_len == length
        self.chunk = (k, v)

    @rule(offset=st.integers(-5, 5).filter(bool))
    def attend_at_elsewhere(self, offset):
        """Any other start is refused and changes nothing."""
        allowed = {self.k.shape[2]} | ({self.k.shape[2] + self.chunk[0].shape[2]} if self.chunk else set())
        start = max(allowed) + offset
        if start in allowed:
            return
        q = k = v = rand(self.gen, 2)
        for cache in self.caches:
            try:
                cache.attend_at(q, k, v, start=start)
            except ValueError as err:
                assert f"got {start}" in str(err)
            else:
                raise AssertionError(f"attend_at(start={start}) was accepted; allowed {allowed}")

    @rule(data=st.data())
    def rewind(self, data):
        end = data.draw(st.integers(0, self.k.shape[2]))
        for cache in self.caches:  # resident and offloaded alike
            cache.rewind(end)
        self.k, self.v, self.chunk = self.k[:, :, :end], self.v[:, :, :end], None

    @rule(length=st.integers(1, MAX_CHUNK))
    def commit(self, length):
        k, v = rand(self.gen, length), rand(self.gen, length)
        fits = self.k.shape[2] + length <= CAPACITY
        for cache in self.caches:
            if fits:
                cache.commit(k, v)
            else:
                try:
                    cache.commit(k, v)
                except ValueError as err:
                    assert "exceed the cache capacity" in str(err)
                else:
                    raise AssertionError("a commit past the capacity was accepted")
        if fits:
            self.k, self.v = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
            self.chunk = None

    @rule()
    def round_trip(self):
        for cache in self.caches:
            state = cache.state_dict()
            cache.reset()
            assert cache.history_len == 0
            cache.load_state_dict(state)
        self.chunk = None

    @rule(corruption=st.sampled_from(["bool", "dtype", "shape", "missing", "too long"]))
    def load_corrupt(self, corruption):
        for cache in self.caches:
            state = cache.state_dict()
            if corruption == "bool":
                state["history_len"] = True
            elif corruption == "dtype":
                state["k"] = state["k"].double()
            elif corruption == "shape":
                state["v"] = torch.zeros(1, HEADS, self.k.shape[2] + 1, DIM)
            elif corruption == "missing":
                del state["v"]
            else:
                state["history_len"] = CAPACITY + 1
            try:
                cache.load_state_dict(state)
            except (TypeError, ValueError):
                pass
            else:
                raise AssertionError(f"a corrupt state ({corruption}) was accepted")

    @rule()
    def reset(self):
        for cache in self.caches:
            cache.reset()
        self.k, self.v, self.chunk = self.k[:, :, :0], self.v[:, :, :0], None

    @invariant()
    def holds_the_model(self):
        if not hasattr(self, "caches"):
            return
        for cache in self.caches:
            assert cache.history_len == self.k.shape[2]
            state = cache.state_dict()  # an offloaded cache's is on the host
            assert torch.equal(state["k"].to(self.k.device), self.k)
            assert torch.equal(state["v"].to(self.v.device), self.v)


class GatedCacheMachine(RuleBasedStateMachine):
    """Position-addressed writes (new chunk, rewrite, refused positions, rewind, reset); every
    attend equals the stateless layer over the model's keys/values, and an offloaded cache
    driven in lockstep gives the same bits."""

    @initialize(seed=st.integers(0, 2**16), window=st.sampled_from([3, 10]))
    def start(self, seed, window):
        self.gen = torch.Generator().manual_seed(seed)
        rules = dict(block_size=4, query_group_size=3, top_k=2, window_tokens=window)
        self.rules = rules
        shape = dict(batch=1, num_kv_heads=HEADS, head_dim=DIM, device=TEST_DEVICE)
        self.cache = GatedCache(CAPACITY, **shape, **rules)
        self.offloaded = GatedCache(CAPACITY, **shape, offload=True, max_chunk_tokens=MAX_CHUNK, **rules)
        self.k = torch.zeros(1, HEADS, 0, DIM, device=TEST_DEVICE)
        self.v = torch.zeros_like(self.k)
        self.last_start = 0

    def _attend(self, start, length):
        q, k, v = rand(self.gen, length), rand(self.gen, length), rand(self.gen, length)
        gates = torch.rand(1, HEADS, length, 3, generator=self.gen).to(TEST_DEVICE)
        got = self.cache.attend(q, k, v, gates, start=start)
        assert torch.equal(self.offloaded.attend(q, k, v, gates, start=start), got)
        self.k = torch.cat([self.k[:, :, :start], k], 2)
        self.v = torch.cat([self.v[:, :, :start], v], 2)
        self.last_start = start
        want = gated_attention(q, self.k, self.v, gates, history_len=start, **self.rules)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    @precondition(lambda self: hasattr(self, "cache"))
    @rule(length=st.integers(1, MAX_CHUNK))
    def next_chunk(self, length):
        if self.k.shape[2] + length <= CAPACITY:
            self._attend(self.k.shape[2], length)

    @precondition(lambda self: hasattr(self, "cache") and self.k.shape[2] > 0)
    @rule(length=st.integers(1, MAX_CHUNK))
    def rewrite_chunk(self, length):
        if self.last_start + length <= CAPACITY:
            self._attend(self.last_start, length)

    @precondition(lambda self: hasattr(self, "cache"))
    @rule(data=st.data(), length=st.integers(1, 3))
    def any_position(self, data, length):
        """A write anywhere: accepted exactly at the end or at the last write's start."""
        end = self.k.shape[2]
        start = data.draw(st.integers(0, CAPACITY))
        if start in (end, self.last_start) and start + length <= CAPACITY:
            self._attend(start, length)
            return
        q = k = v = rand(self.gen, length)
        for cache in (self.cache, self.offloaded):
            try:
                cache.attend(q, k, v, torch.rand(1, HEADS, length, 3).to(TEST_DEVICE), start=start)
            except ValueError:
                pass
            else:
                raise AssertionError(
                    f"a write at {start} (end {end}, last start {self.last_start}) was accepted"
                )

    @precondition(lambda self: hasattr(self, "cache"))
    @rule(data=st.data())
    def rewind(self, data):
        end = data.draw(st.integers(0, self.k.shape[2]))
        self.cache.rewind(end)
        self.offloaded.rewind(end)
        self.k, self.v, self.last_start = self.k[:, :, :end], self.v[:, :, :end], end

    @precondition(lambda self: hasattr(self, "cache"))
    @rule()
    def reset(self):
        self.cache.reset()
        self.offloaded.reset()
        self.k, self.v, self.last_start = self.k[:, :, :0], self.v[:, :, :0], 0

    @precondition(lambda self: hasattr(self, "cache"))
    @invariant()
    def positions_match(self):
        assert self.cache.end == self.offloaded.end == self.k.shape[2]
        assert torch.equal(self.cache.k[:, :, : self.cache.end], self.k)
        # The offloaded cache's host memory holds everything before the current chunk.
        if TEST_DEVICE.type == "cuda":
            torch.cuda.synchronize()
        flushed = self.offloaded._offload.flushed
        assert flushed >= self.last_start
        assert torch.equal(self.offloaded.k[:, :, :flushed].to(self.k.device), self.k[:, :, :flushed])


OmniMemCacheMachine.TestCase.settings = settings(max_examples=examples(50), stateful_step_count=15)
GatedCacheMachine.TestCase.settings = settings(max_examples=examples(50), stateful_step_count=15)
TestOmniMemCache = OmniMemCacheMachine.TestCase
TestGatedCache = GatedCacheMachine.TestCase
