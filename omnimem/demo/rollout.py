"""Chunk-wise AR rollout of the tiny DiT with three memories: OmniMem, dense, truncation."""

from __future__ import annotations

import dataclasses
import resource
import time

import torch
import torch.nn.functional as F

from omnimem.cache import OmniMemCache
from omnimem.config import OmniMemConfig
from omnimem.demo.model import TinyCausalDiT
from omnimem.integration import cached_attention

MODES = ("omnimem", "dense", "truncated")


class BaselineKVStore:
    """Preallocated per-layer KV history for the baselines (SDPA layout ``[B, H, L, D]``).

    ``dense`` attends the whole history (today's cost without truncation); ``truncated``
    attends the sink and the local window only (today's Self-Forcing-style models).
    """

    def __init__(
        self, mode: str, capacity: int, max_chunk: int, shape: tuple, sink: int, local: int, **factory
    ):
        batch, heads, head_dim = shape
        self.mode, self.sink, self.local = mode, sink, local
        self.k = torch.zeros(batch, heads, capacity + max_chunk, head_dim, **factory)
        self.v = torch.zeros_like(self.k)
        self.history_len = 0

    def attend(self, q, k_chunk, v_chunk, commit: bool) -> torch.Tensor:
        start, end = self.history_len, self.history_len + k_chunk.shape[2]
        self.k[:, :, start:end], self.v[:, :, start:end] = k_chunk, v_chunk
        if self.mode == "dense":
            keys, values = self.k[:, :, :end], self.v[:, :, :end]
        else:
            sink = min(self.sink, start)
            window = slice(max(sink, start - self.local), end)
            keys = torch.cat([self.k[:, :, :sink], self.k[:, :, window]], dim=2)
            values = torch.cat([self.v[:, :, :sink], self.v[:, :, window]], dim=2)
        out = F.scaled_dot_product_attention(q, keys, values)
        if commit:
            self.history_len = end
        return out


@dataclasses.dataclass
class ChunkStats:
    chunk: int
    history_tokens: int
    attended_tokens: int
    attention_ms: float
    step_ms: float
    peak_memory_mib: float
    latents: torch.Tensor = dataclasses.field(repr=False)


class Memory:
    """One mode's per-layer KV memory, with timing around every attention call."""

    def __init__(
        self, mode: str, model: TinyCausalDiT, capacity: int, config: OmniMemConfig, batch: int, **factory
    ):
        c = model.config
        chunk_tokens = c.frames_per_chunk * c.tokens_per_frame
        self.mode, self.config, self.device = mode, config, factory["device"]
        if mode == "omnimem":
            self.caches = OmniMemCache.for_layers(
                c.layers,
                capacity,
                max_chunk_tokens=chunk_tokens,
                batch=batch,
                num_kv_heads=c.heads,
                head_dim=c.head_dim,
                config=config,
                layout="blhd",
                **factory,
            )
        else:
            shape = (batch, c.heads, c.head_dim)
            self.caches = [
                BaselineKVStore(
                    mode, capacity, chunk_tokens, shape, config.sink_tokens, config.local_tokens, **factory
                )
                for _ in range(c.layers)
            ]
        self.attention_seconds = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, layer: int, q, k, v, commit: bool) -> torch.Tensor:
        self._sync()
        start = time.perf_counter()
        if self.mode == "omnimem":
            out = cached_attention(q, k, v, self.caches[layer], commit=commit)
        else:
            out = self.caches[layer].attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), commit)
            out = out.transpose(1, 2)
        self._sync()
        self.attention_seconds += time.perf_counter() - start
        return out

    def history_len(self) -> int:
        return self.caches[0].history_len

    def attended_tokens(self, chunk_tokens: int) -> int:
        history = self.history_len()
        if self.mode == "dense":
            return history + chunk_tokens
        c = self.config
        if self.mode == "truncated":
            sink = min(c.sink_tokens, history)
            return sink + min(c.local_tokens, history - sink) + chunk_tokens
        blocks = -(-c.sink_tokens // c.block_size) + -(-c.local_tokens // c.block_size) + 1 + c.top_k
        return min(history, blocks * c.block_size) + chunk_tokens


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@torch.no_grad()
def rollout(
    model: TinyCausalDiT,
    memory: Memory,
    *,
    chunks: int,
    steps: int,
    batch: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    on_chunk=None,
) -> list[ChunkStats]:
    """Generate ``chunks`` chunks; each: ``steps`` flow-matching Euler steps, then a commit pass."""
    c = model.config
    device = memory.device
    stats = []
    for index in range(chunks):
        gen = torch.Generator(device=device).manual_seed(seed * 100003 + index)  # same noise in every mode
        shape = (batch, c.frames_per_chunk, c.channels, c.height, c.width)
        x = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        first_frame = index * c.frames_per_chunk
        history = memory.history_len()
        attended = memory.attended_tokens(c.frames_per_chunk * c.tokens_per_frame)
        memory.attention_seconds = 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for step in range(steps):
            t = 1.0 - step / steps
            x = x - (1.0 / steps) * model(x, t, first_frame, memory)
        model(x, 0.0, first_frame, memory, commit=True)  # the clean pass writes the chunk's KV
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_ms = (time.perf_counter() - start) * 1e3 / (steps + 1)
        stats.append(
            ChunkStats(
                chunk=index,
                history_tokens=history,
                attended_tokens=attended,
                attention_ms=memory.attention_seconds * 1e3 / (steps + 1),
                step_ms=step_ms,
                peak_memory_mib=peak_memory_mib(device),
                latents=x.float().cpu(),
            )
        )
        if on_chunk is not None:
            on_chunk()
    return stats
