"""Head-sharded OmniMem over ``torch.distributed`` (NCCL on GPUs, gloo on CPU).

Selection is per head, so sharding the heads needs no communication for retrieval: each rank
keeps the KV history, block sums and selection of its own heads. Two ways in:

- **Head (tensor) parallel**: the model already holds ``H / P`` heads per rank. Build the
  rank's cache with [`sharded_cache`][omnimem.distributed.sharded_cache] (or
  ``OmniMemCache.for_layers`` with the local head count) and call
  [`cached_attention`][omnimem.cached_attention] as on one GPU: nothing else changes.
- **Ulysses sequence parallel** (Self-Forcing's xDiT path): activations are sharded by tokens;
  [`ulysses_attention`][omnimem.distributed.ulysses_attention] turns ``[B, L/P, H, D]`` token
  shards into ``[B, L, H/P, D]`` head shards with one ``all_to_all``, attends through the rank's
  cache, and turns the result back with a second ``all_to_all``. With few heads per rank
  (fewer than ``FEW_HEADS_PER_RANK``) an eager step is host-bound and can be slower than one
  GPU; it says so once per shape through ``logging.getLogger("omnimem")``.

Head counts must divide by the world size (``ValueError`` otherwise: padding heads would change
nothing but cost, so we refuse rather than pad). Query head ``h`` and its KV head land on the
same rank because both are split into ``P`` contiguous groups.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.distributed as dist

from omnimem.compile import compile_static
from omnimem.integration import cached_attention
from omnimem.sparse.cache import OmniMemCache, graph_inputs, graph_pool, may_replay, no_replay

logger = logging.getLogger("omnimem")

# Below this many KV heads per rank a Ulysses step is short enough that, run eagerly, host launch
# overhead outweighs the halved attention (measured with 6 and 20 per rank: docs/benchmarks.md).
FEW_HEADS_PER_RANK = 8


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def head_shard(num_heads: int, group: dist.ProcessGroup | None = None) -> slice:
    """The heads ``[start, stop)`` this rank owns when ``num_heads`` are split over ``group``.

    Raises:
        ValueError: ``num_heads`` is not a multiple of the group's size.
    """
    world, rank = _world(group)
    if num_heads % world:
        raise ValueError(
            f"num_heads ({num_heads}) must be a multiple of the process group's size ({world}) "
            "for head sharding"
        )
    per_rank = num_heads // world
    return slice(rank * per_rank, (rank + 1) * per_rank)


def sharded_cache(
    capacity: int, *, num_kv_heads: int, group: dist.ProcessGroup | None = None, **kwargs: object
) -> OmniMemCache:
    """This rank's ``OmniMemCache`` for its share of ``num_kv_heads`` (the model's total).

    Args:
        capacity: history tokens, as for ``OmniMemCache``.
        num_kv_heads: the model's KV heads over all ranks; must divide by the group's size.
        group: the process group the heads are split over (default: the world).
        **kwargs: every other ``OmniMemCache`` argument (``max_chunk_tokens``, ``batch``,
            ``head_dim``, ``config``, ``dtype``, ``device``, ``layout``).

    Returns:
        An ``OmniMemCache`` with ``num_kv_heads / P`` heads.
    """
    shard = head_shard(num_kv_heads, group)
    return OmniMemCache(capacity, num_kv_heads=shard.stop - shard.start, **kwargs)


def _pack_parts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, world: int, parts: int) -> torch.Tensor:
    """The send buffer of a Ulysses exchange, ``[parts, P, B, L/P, h_q + h_k + h_v, D]``: for head
    group ``i`` and destination rank ``p``, this rank's tokens of the heads ``p`` attends in group
    ``i`` (q, then k, then v). One copy of each input, straight into place; each ``[i]`` slice is
    one contiguous all_to_all buffer."""
    views = [x.unflatten(2, (world, parts, -1)).permute(3, 2, 0, 1, 4, 5) for x in (q, k, v)]
    return torch.cat(views, dim=4)


def _unpack_parts(received: torch.Tensor) -> torch.Tensor:
    """``[parts, P, B, L/P, h, D]`` attention outputs (from rank ``p``, head group ``i``) ->
    this rank's ``[B, L/P, P * parts * h, D]`` token shard, heads in model order."""
    parts, world, batch, tokens, heads, dim = received.shape
    return received.permute(2, 3, 1, 0, 4, 5).reshape(batch, tokens, world * parts * heads, dim)


@functools.cache
def _compiled(fn: Callable) -> Callable:
    # Inductor fuses each into one vectorised copy kernel; eager torch runs the permuting copies
    # through its generic strided path at about half the memory bandwidth.
    return compile_static(fn)


def _layout_fn(fn: Callable, x: torch.Tensor, cache: OmniMemCache) -> Callable:
    return _compiled(fn) if cache.config.compile and x.is_cuda else fn


def _tokens_of_heads(received: torch.Tensor) -> torch.Tensor:
    """``[P, B, L/P, h, D]`` (token shards from every rank) -> ``[B, L, h, D]`` (a view when
    ``B == 1``)."""
    world, batch, tokens, heads, dim = received.shape
    return received.transpose(0, 1).reshape(batch, world * tokens, heads, dim)


def _log_few_heads(kv_per_rank: int, world: int) -> None:
    if kv_per_rank < FEW_HEADS_PER_RANK:
        _say_few_heads(kv_per_rank, world)


@functools.cache
def _say_few_heads(kv_per_rank: int, world: int) -> None:
    logger.info(
        "ulysses_attention: %d KV heads per rank over %d ranks (fewer than %d): each rank's step "
        "is short, so run eagerly it is bound by host launch overhead and can be slower than one "
        "GPU (wan-1.3b on 2 H200s: a block at 0.69x); create the caches with cuda_graphs=True (the "
        "step replays as one graph), capture the model in CUDA graphs (1.60x there) or shard only "
        "for memory (docs/integration.md, 'Past one GPU')",
        kv_per_rank,
        world,
        FEW_HEADS_PER_RANK,
    )


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: OmniMemCache,
    *,
    commit: bool = False,
    group: dist.ProcessGroup | None = None,
    pipeline: int = 1,
) -> torch.Tensor:
    """OmniMem attention of a token-sharded chunk through this rank's head-sharded cache.

    Call it on every rank of ``group`` in place of the model's attention, with the rank's token
    shard of the chunk (rank ``r`` holds tokens ``[r * L/P, (r + 1) * L/P)``).

    Args:
        q: ``[B, L/P, Hq, D]`` this rank's tokens of the chunk's queries, after RoPE, all heads.
        k: ``[B, L/P, Hkv, D]`` the same tokens' keys after RoPE.
        v: ``[B, L/P, Hkv, D]`` their values.
        cache: this rank's cache for heads ``head_shard(Hkv)`` (see ``sharded_cache``).
        commit: also append the chunk to the history (the clean final pass).
        group: the process group (default: the world); all ranks pass equal shapes.
        pipeline: split the rank's heads into this many groups and attend each while the next
            one's q/k/v and the previous one's output are in transit (overlaps communication
            with compute; same results). Each group costs one more ``cached_attention`` call of
            host time, so it pays in a CUDA graph or with a ``cuda_graphs=True`` cache, not
            eagerly (2x H200, wan-14b: 1.49 vs 1.54 ms per step in a graph). The rank's KV
            heads must divide by it; resident caches only.

    With a ``cuda_graphs=True`` cache and NCCL, a call without ``commit`` replays the whole
    step (pack, both all_to_alls, attention, unpack) from one CUDA graph, captured on every rank
    at the first call per shape (docs/integration.md, "CUDA graphs").

    Returns:
        ``[B, L/P, Hq, D]``: this rank's tokens of the attention output, all heads.

    Raises:
        ValueError: head counts not divisible by the group size (or the rank's heads by
            ``pipeline``), or shapes that disagree.
        TypeError: a ``pipeline`` that is not an int.
    """
    world, _ = _world(group)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D [B, L/P, H, D] token shard, got {tuple(x.shape)}")
        head_shard(x.shape[2], group)  # divisibility
    if k.shape != v.shape or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"q, k, v must share [B, L/P]; k and v one shape: {q.shape}, {k.shape}, {v.shape}")
    if k.shape[2] // world != cache.k.shape[1]:
        raise ValueError(
            f"cache holds {cache.k.shape[1]} KV heads, but this rank's share of k's heads "
            f"is {k.shape[2] // world}"
        )
    kv_per_rank = k.shape[2] // world
    if isinstance(pipeline, bool) or not isinstance(pipeline, int):
        raise TypeError(f"pipeline must be an int, got {type(pipeline).__name__}")
    if pipeline < 1 or kv_per_rank % pipeline:
        raise ValueError(
            f"pipeline must be a positive int dividing this rank's {kv_per_rank} KV heads, got {pipeline!r}"
        )
    _log_few_heads(kv_per_rank, world)
    if cache._graphs is not None and not commit and may_replay() and dist.get_backend(group) == "nccl":
        return _replayed(q, k, v, cache, group, pipeline)
    return _ulysses_step(q, k, v, cache, commit, group, pipeline)


def _replayed(q, k, v, cache: OmniMemCache, group, pipeline: int) -> torch.Tensor:
    """A ``cuda_graphs`` cache's denoising step: the whole exchange and attention replayed from
    one CUDA graph (NCCL included), captured on the first call per shape. Every rank captures
    at the same call (equal shapes on every rank), and the first runs eagerly to compile and
    connect what the graph holds. Commits run eagerly (they move the history)."""
    key = ("ulysses", q.shape, k.shape, q.dtype, pipeline, id(group), cache._k_storage.data_ptr())
    entry = cache._graphs.get(key)
    if entry is None:
        with no_replay():
            static = graph_inputs(q, k, v)
            # Eagerly first, on the graph's own inputs (their strides may differ from the
            # caller's): what they compile (the packing copy) compiles here, not in the capture.
            out = _ulysses_step(*static, cache, False, group, pipeline)
            graph = torch.cuda.CUDAGraph()
            # thread_local: NCCL's watchdog thread queries events while this thread captures.
            with torch.cuda.graph(graph, pool=graph_pool(q.device), capture_error_mode="thread_local"):
                static_out = _ulysses_step(*static, cache, False, group, pipeline)
        cache._graphs[key] = graph, static, static_out
        return out
    graph, static, static_out = entry
    for buffer, x in zip(static, (q, k, v), strict=True):
        buffer.copy_(x)
    graph.replay()
    return static_out.clone()  # the next replay overwrites the graph's own


def _ulysses_step(q, k, v, cache: OmniMemCache, commit: bool, group, pipeline: int) -> torch.Tensor:
    world, _ = _world(group)
    kv_per_rank = k.shape[2] // world
    parts = pipeline
    q_part, kv_part = q.shape[2] // world // parts, kv_per_rank // parts
    send = _layout_fn(_pack_parts, q, cache)(q, k, v, world, parts)
    received = torch.empty_like(send)
    # All parts' inputs are queued at once (NCCL runs them in order on its own stream); part i
    # attends as soon as its inputs are in, while part i + 1's are in flight and part i - 1's
    # output travels back: the compute stream waits on events, the host never does.
    incoming = [
        dist.all_to_all_single(received[i], send[i], group=group, async_op=True) for i in range(parts)
    ]
    batch, tokens, _, dim = q.shape
    returned = q.new_empty(parts, world, batch, tokens, q_part, dim)
    outgoing, chunk = [], []
    for i, arrival in enumerate(incoming):
        arrival.wait()
        q_i, k_i, v_i = _tokens_of_heads(received[i]).split([q_part, kv_part, kv_part], dim=2)
        part_cache = cache if parts == 1 else cache._head_slice(slice(i * kv_part, (i + 1) * kv_part))
        out = cached_attention(q_i, k_i, v_i, part_cache, commit=commit and parts == 1)
        # [B, L, h, D] -> [P, B, L/P, h, D]: free when B == 1 and the backend wrote token-major.
        out = out.unflatten(1, (world, tokens)).transpose(0, 1).contiguous()
        outgoing.append(dist.all_to_all_single(returned[i], out, group=group, async_op=True))
        chunk.append((k_i, v_i))
    if commit and parts > 1:
        cache.commit(*(torch.cat(x, dim=2).transpose(1, 2) for x in zip(*chunk, strict=True)))
    for departure in outgoing:
        departure.wait()
    return _layout_fn(_unpack_parts, q, cache)(returned)
