"""Chunk-wise AR rollout of the tiny DiT with three memories: OmniMem, dense, truncation.

The stream is synthetic: every chunk's starting latents come from its *scene* (a fixed random
latent per scene, plus fresh noise), and the schedule returns to the first scene now and then
(a camera coming back), so a later chunk has something far in its past worth retrieving.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F

from omnimem.config import OmniMemConfig
from omnimem.demo.model import TinyCausalDiT
from omnimem.integration import cached_attention
from omnimem.sizing import kv_cache_bytes
from omnimem.sparse.cache import OmniMemCache

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
    """One chunk of one mode: sizes, costs, and how far its attention is from full attention.

    ``attention_error``: over the clean pass's layers, ``|out - full| / |full|`` where ``full``
    is attention over the mode's whole history (0 for dense). ``retrieved_frames``: layer 0's
    far history frames OmniMem selected (all heads; empty for other modes). ``kv_device_mib``:
    KV bytes the mode keeps on the compute device, from the buffers (not the process's RSS);
    ``kv_device_mib_offloaded``: the same for OmniMem with ``offload=True`` (block sums and
    staging buffers; 0 for other modes).
    """

    chunk: int
    scene: int
    history_tokens: int
    attended_tokens: int
    attention_gflop: float
    attention_ms: float
    step_ms: float
    attention_error: float
    kv_device_mib: float
    kv_device_mib_offloaded: float
    retrieved_frames: list[int] = dataclasses.field(repr=False)
    latents: torch.Tensor = dataclasses.field(repr=False)


def scene_schedule(chunks: int, *, revisit_every: int = 5, scene_chunks: int = 2) -> list[int]:
    """Scene per chunk: scene 0 first, then new scenes of ``scene_chunks`` chunks each, and from
    the middle of the run on every ``revisit_every``-th chunk returns to scene 0."""
    scenes, new = [], 0
    for index in range(chunks):
        if index >= chunks // 2 and index % revisit_every == 0:
            scenes.append(0)
        else:
            new = index // scene_chunks
            scenes.append(new)
    return scenes


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
        self.diagnostic_seconds = 0.0
        self.errors: list[float] = []
        self.retrieved: list[int] = []
        itemsize = torch.empty((), dtype=factory.get("dtype", torch.float32)).element_size()
        self._bytes_per_token = c.layers * batch * c.heads * c.head_dim * 2 * itemsize  # keys and values
        self._offload_mib = 0.0
        if mode == "omnimem":  # what offload=True would keep on the device: sums and staging
            self._offload_mib = kv_cache_bytes(
                capacity, num_kv_heads=c.heads, head_dim=c.head_dim, batch=batch, layers=c.layers,
                dtype=factory.get("dtype", torch.float32), config=config, max_chunk_tokens=chunk_tokens,
                offload=True,
            ) / 2**20  # fmt: skip

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, layer: int, q, k, v, commit: bool) -> torch.Tensor:
        self._sync()
        start = time.perf_counter()
        history = self.caches[layer].history_len
        if self.mode == "omnimem":
            out = cached_attention(q, k, v, self.caches[layer], commit=commit)
        else:
            out = self.caches[layer].attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), commit)
            out = out.transpose(1, 2)
        self._sync()
        self.attention_seconds += time.perf_counter() - start
        if commit:  # the clean pass: compare with full attention (untimed)
            begin = time.perf_counter()
            self._diagnose(layer, q, k, out, history)
            self.diagnostic_seconds += time.perf_counter() - begin
        return out

    def _diagnose(self, layer: int, q, k, out, history: int) -> None:
        cache, end = self.caches[layer], history + k.shape[1]
        full = F.scaled_dot_product_attention(
            q.transpose(1, 2), cache.k[:, :, :end].to(q.dtype), cache.v[:, :, :end].to(q.dtype)
        ).transpose(1, 2)
        self.errors.append(float((out.float() - full.float()).norm() / full.float().norm()))
        if self.mode == "omnimem" and layer == 0 and history:
            # The committed chunk is history now; ask what the chunk's queries retrieved before it.
            selection = _selection_before(cache, q, history)
            frame = self.config.block_size
            far_end = max(0, history - self.config.local_tokens) // frame
            first = -(-self.config.sink_tokens // frame)
            blocks = selection.kv_block_idx[0, :, 0].flatten().tolist()
            self.retrieved = sorted({b for b in blocks if first <= b < far_end})

    def device_kv_mib(self, chunk_tokens: int, offloaded: bool = False) -> float:
        """KV the mode keeps on the device after this chunk, from its buffers' element sizes."""
        history = self.history_len()
        if self.mode == "truncated":
            c = self.config
            tokens = min(history, c.sink_tokens + c.local_tokens) + chunk_tokens
        else:
            tokens = history + chunk_tokens
        if self.mode == "omnimem" and offloaded:
            return self._offload_mib
        return tokens * self._bytes_per_token / 2**20

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


def _selection_before(cache: OmniMemCache, q: torch.Tensor, history: int):
    """What ``q`` retrieved with ``history`` committed tokens (the cache has one chunk more)."""
    committed = cache.history_len
    cache.history_len = history
    try:
        return cache.selection(q.transpose(1, 2))
    finally:
        cache.history_len = committed


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
    scenes: list[int] | None = None,
    jitter: float = 0.3,
    on_chunk=None,
) -> list[ChunkStats]:
    """Generate ``chunks`` chunks; each: ``steps`` flow-matching Euler steps, then a commit pass.

    Chunk ``i`` starts from its scene's latents (``scenes[i]``; default: every chunk its own
    scene) mixed with ``jitter`` of fresh noise: the same inputs in every mode."""
    c = model.config
    device = memory.device
    scenes = list(range(chunks)) if scenes is None else scenes
    chunk_tokens = c.frames_per_chunk * c.tokens_per_frame
    stats = []
    for index in range(chunks):
        shape = (batch, c.frames_per_chunk, c.channels, c.height, c.width)
        scene_gen = torch.Generator(device=device).manual_seed(seed * 100003 + 7919 * (scenes[index] + 1))
        noise_gen = torch.Generator(device=device).manual_seed(seed * 100003 + index)
        x = torch.randn(shape, generator=scene_gen, device=device, dtype=dtype)
        x = (x + jitter * torch.randn(shape, generator=noise_gen, device=device, dtype=dtype)) / (
            1 + jitter**2
        ) ** 0.5
        first_frame = index * c.frames_per_chunk
        history = memory.history_len()
        attended = memory.attended_tokens(chunk_tokens)
        memory.attention_seconds = memory.diagnostic_seconds = 0.0
        memory.errors, memory.retrieved = [], []
        start = time.perf_counter()
        for step in range(steps):
            t = 1.0 - step / steps
            x = x - (1.0 / steps) * model(x, t, first_frame, memory)
        model(x, 0.0, first_frame, memory, commit=True)  # the clean pass writes the chunk's KV
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_ms = (time.perf_counter() - start - memory.diagnostic_seconds) * 1e3 / (steps + 1)
        stats.append(
            ChunkStats(
                chunk=index,
                scene=scenes[index],
                history_tokens=history,
                attended_tokens=attended,
                attention_gflop=4 * chunk_tokens * attended * c.head_dim * c.heads * c.layers / 1e9,
                attention_ms=memory.attention_seconds * 1e3 / (steps + 1),
                step_ms=step_ms,
                attention_error=sum(memory.errors) / len(memory.errors),
                kv_device_mib=memory.device_kv_mib(chunk_tokens),
                kv_device_mib_offloaded=memory.device_kv_mib(chunk_tokens, offloaded=True),
                retrieved_frames=memory.retrieved,
                latents=x.float().cpu(),
            )
        )
        if on_chunk is not None:
            on_chunk()
    return stats
