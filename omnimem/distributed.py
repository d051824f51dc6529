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


def _tokens_to_heads(*shards: torch.Tensor, world: int, group) -> list[torch.Tensor]:
    """``[B, L/P, H_i, D]`` token shards -> ``[B, L, H_i/P, D]`` head shards, all in one all_to_all
    (one collective for q, k and v: the exchange is latency-bound at these sizes)."""
    batch, tokens, _, dim = shards[0].shape
    widths = [x.shape[2] // world for x in shards]
    per_rank = [x.reshape(batch, tokens, world, w, dim) for x, w in zip(shards, widths, strict=True)]
    send = torch.cat(per_rank, dim=3).permute(2, 0, 1, 3, 4).contiguous()  # [P, B, L/P, sum H_i/P, D]
    received = torch.empty_like(send)  # [P (source rank = token shard), B, L/P, sum H_i/P, D]
    dist.all_to_all_single(received, send, group=group)
    full = received.permute(1, 0, 2, 3, 4).reshape(batch, world * tokens, sum(widths), dim)
    return list(full.split(widths, dim=2))


def _heads_to_tokens(x: torch.Tensor, world: int, group) -> torch.Tensor:
    """``[B, L, H/P, D]`` head shard -> ``[B, L/P, H, D]`` token shard (one all_to_all)."""
    batch, tokens, heads, dim = x.shape
    send = x.reshape(batch, world, tokens // world, heads, dim).permute(1, 0, 2, 3, 4).contiguous()
    received = torch.empty_like(send)  # [P (source rank = head group), B, L/P, H/P, D]
    dist.all_to_all_single(received, send, group=group)
    return received.permute(1, 2, 0, 3, 4).reshape(batch, tokens // world, world * heads, dim)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: OmniMemCache,
    *,
    commit: bool = False,
    group: dist.ProcessGroup | None = None,
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

    Returns:
        ``[B, L/P, Hq, D]``: this rank's tokens of the attention output, all heads.

    Raises:
        ValueError: head counts not divisible by the group size, or shapes that disagree.
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
    q_heads, k_heads, v_heads = _tokens_to_heads(q, k, v, world=world, group=group)
    out = cached_attention(q_heads, k_heads, v_heads, cache, commit=commit)
    return _heads_to_tokens(out.contiguous(), world, group)
