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
  cache, and turns the result back with a second ``all_to_all``.

Head counts must divide by the world size (``ValueError`` otherwise: padding heads would change
nothing but cost, so we refuse rather than pad). Query head ``h`` and its KV head land on the
same rank because both are split into ``P`` contiguous groups.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from omnimem.cache import OmniMemCache
from omnimem.integration import cached_attention


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


def _start_tokens_to_heads(*shards: torch.Tensor, world: int, group) -> Callable[[], list[torch.Tensor]]:
    """Start turning ``[B, L/P, H_i, D]`` token shards into ``[B, L, H_i/P, D]`` head shards, all
    in one all_to_all (the exchange is bandwidth-bound: one collective for q, k and v); the
    returned function waits for it and returns the head shards.

    Each shard is copied once, straight into its slot of the send buffer (no ``cat`` followed by
    a second, permuting copy); with ``B == 1`` the received buffer already is ``[B, L, H/P, D]``
    and the head shards are views of it."""
    batch, tokens, _, dim = shards[0].shape
    widths = [x.shape[2] // world for x in shards]
    send = shards[0].new_empty(world, batch, tokens, sum(widths), dim)  # [P (destination), B, L/P, h, D]
    start = 0
    for x, width in zip(shards, widths, strict=True):
        send[..., start : start + width, :].copy_(x.unflatten(2, (world, width)).permute(2, 0, 1, 3, 4))
        start += width
    received = torch.empty_like(send)  # [P (source rank = token shard), B, L/P, h, D]
    work = dist.all_to_all_single(received, send, group=group, async_op=True)

    def finish() -> list[torch.Tensor]:
        work.wait()
        full = received.transpose(0, 1).reshape(batch, world * tokens, sum(widths), dim)
        return list(full.split(widths, dim=2))

    return finish


def _tokens_to_heads(*shards: torch.Tensor, world: int, group) -> list[torch.Tensor]:
    """``[B, L/P, H_i, D]`` token shards -> ``[B, L, H_i/P, D]`` head shards (one all_to_all)."""
    return _start_tokens_to_heads(*shards, world=world, group=group)()


def _start_heads_to_tokens(x: torch.Tensor, world: int, group) -> Callable[[], torch.Tensor]:
    """Start turning a ``[B, L, H/P, D]`` head shard into a ``[B, L/P, H, D]`` token shard."""
    batch, tokens, heads, dim = x.shape
    send = x.reshape(batch, world, tokens // world, heads, dim).permute(1, 0, 2, 3, 4).contiguous()
    received = torch.empty_like(send)  # [P (source rank = head group), B, L/P, H/P, D]
    work = dist.all_to_all_single(received, send, group=group, async_op=True)

    def finish() -> torch.Tensor:
        work.wait()
        return received.permute(1, 2, 0, 3, 4).reshape(batch, tokens // world, world * heads, dim)

    return finish


def _heads_to_tokens(x: torch.Tensor, world: int, group) -> torch.Tensor:
    """``[B, L, H/P, D]`` head shard -> ``[B, L/P, H, D]`` token shard (one all_to_all)."""
    return _start_heads_to_tokens(x, world, group)()


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
            with compute; same results). The rank's KV heads must divide by it; resident
            caches only.

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
    if pipeline == 1:
        q_heads, k_heads, v_heads = _tokens_to_heads(q, k, v, world=world, group=group)
        out = cached_attention(q_heads, k_heads, v_heads, cache, commit=commit)
        return _heads_to_tokens(out.contiguous(), world, group)

    def heads_part(x: torch.Tensor, part: int) -> torch.Tensor:
        """Every rank's ``part``-th head group of a token shard: ``[B, L/P, P * H/P/parts, D]``."""
        per = x.shape[2] // world // pipeline
        return x.unflatten(2, (world, pipeline, per))[:, :, :, part].flatten(2, 3)

    incoming = [
        _start_tokens_to_heads(heads_part(q, p), heads_part(k, p), heads_part(v, p), world=world, group=group)
        for p in range(pipeline)
    ]  # queued on the communication stream in order: part 0 arrives first
    kv_per_part = kv_per_rank // pipeline
    outgoing, chunk_parts = [], []
    for p, arrival in enumerate(incoming):
        q_p, k_p, v_p = arrival()
        part_cache = cache._head_slice(slice(p * kv_per_part, (p + 1) * kv_per_part))
        outgoing.append(
            _start_heads_to_tokens(cached_attention(q_p, k_p, v_p, part_cache).contiguous(), world, group)
        )
        chunk_parts.append((k_p, v_p))
    if commit:
        k_full = torch.cat([k_p for k_p, _ in chunk_parts], dim=2)
        v_full = torch.cat([v_p for _, v_p in chunk_parts], dim=2)
        cache.commit(k_full.transpose(1, 2), v_full.transpose(1, 2))
    q_per_part = q.shape[2] // world // pipeline
    parts = [arrival().unflatten(2, (world, q_per_part)) for arrival in outgoing]  # [B, L/P, P, h, D]
    return torch.stack(parts, dim=3).flatten(2, 4)  # heads ordered (rank, part, head)
