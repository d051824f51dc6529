"""Block selection: block scores, Adaptive Window Exclusion and query-shared top-k.

Everything here is vectorised torch with static shapes: the number of history blocks is taken
from the key buffer's length (``ceil(Lkv / block_size)``), and ``history_len`` enters only as a
0-d device tensor, so a growing history inside a preallocated buffer changes no shape, launches
the same kernels and never synchronises with the host.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import NamedTuple

import torch
from einops import reduce

from omnimem.compile import compile_static
from omnimem.config import OmniMemConfig
from omnimem.store.index import Int8BlockSums

# Selection keys pack (tier, score, -block index) into one int64 so a single top-k gives a
# deterministic order: tier first, then score, then the lower block index on ties.
_INDEX_BITS = 29
_MAX_BLOCKS = 1 << _INDEX_BITS
_TIER_SHIFT = 32 + _INDEX_BITS

# Tiers: 0 = not a candidate; higher tiers are preferred whatever their score.
_TIER_FAR, _TIER_RECENT = 2, 1


@dataclasses.dataclass(frozen=True)
class Selection:
    """The per-(batch, KV head, query group) table of attended history blocks.

    Selection is made per KV head (with GQA, query head ``h`` uses row
    ``h // (Hq // Hkv)``) and per query group (queries ``[g*query_group_size,
    (g+1)*query_group_size)``; one group unless ``OmniMemConfig.query_group_size`` is set).

    A plain frozen dataclass rather than a ``tensordict`` tensorclass: construction is on the
    per-call hot path and a tensorclass costs ~12x more there (see docs/design.md);
    [`to_tensordict`][omnimem.Selection.to_tensordict] gives the tensordict view when wanted.

    Attributes:
        kv_block_idx: ``[B, Hkv, G, K]`` int32. Attended history blocks (sink, local window and
            retrieved, each once) in ascending order; entries past ``kv_num_blocks`` are ``-1``.
            ``K`` is a static bound: ``min(num_history_blocks, sink + local + top_k blocks)``.
        kv_num_blocks: ``[B, Hkv, G]`` int32. Number of valid entries of ``kv_block_idx``.
        selected_block_idx: ``[B, Hkv, G, min(top_k, num_history_blocks)]`` int32. The top-k
            budget in rank order (best first); ``-1`` where a slot found no candidate.
        fixed_block_mask: ``[num_history_blocks]`` bool. Sink and local-window blocks (always
            attended, shared by every head).
        history_len: 0-d int64 tensor on the inputs' device.
        block_size: tokens per history block.
        query_group_size: queries per selection group (``Lq`` when the chunk is one group).
        num_history_blocks: static number of block slots, ``ceil(Lkv / block_size)``; blocks
            at or past ``ceil(history_len / block_size)`` are empty and never attended.
        planned_history_len: the history length (host int) it was planned for, checked when it
            is passed to ``sparse_attention(selection=...)``; ``None`` when unknown.
    """

    kv_block_idx: torch.Tensor
    kv_num_blocks: torch.Tensor
    selected_block_idx: torch.Tensor
    fixed_block_mask: torch.Tensor
    history_len: torch.Tensor
    block_size: int
    query_group_size: int
    num_history_blocks: int
    planned_history_len: int | None = None

    @property
    def num_query_groups(self) -> int:
        """Number of query groups ``G``."""
        return self.kv_block_idx.shape[2]

    @property
    def retrieved_block_idx(self) -> torch.Tensor:
        """``selected_block_idx`` with ``-1`` where the slot holds a sink or local-window block.

        What the budget bought beyond the always-attended blocks; a ``-1`` in a slot that
        ``selected_block_idx`` fills is a wasted slot (possible with ``window_exclusion="never"``,
        or with ``"adaptive"`` when too little far history exists).
        """
        sel = self.selected_block_idx
        fixed = self.fixed_block_mask[sel.clamp(min=0).long()]
        return torch.where(fixed, -1, sel)

    def attended_block_mask(self) -> torch.Tensor:
        """Dense ``[B, Hkv, G, num_history_blocks]`` bool: block ``j`` is attended."""
        return attended_blocks(self.kv_block_idx, self.num_history_blocks)

    def to_tensordict(self):  # -> tensordict.TensorDict (optional dependency)
        """The per-(batch, KV head, query group) tensors as a ``tensordict.TensorDict``."""
        from tensordict import TensorDict

        return TensorDict(
            {
                "kv_block_idx": self.kv_block_idx,
                "kv_num_blocks": self.kv_num_blocks,
                "selected_block_idx": self.selected_block_idx,
                "retrieved_block_idx": self.retrieved_block_idx,
            },
            batch_size=self.kv_num_blocks.shape,
        )


def attended_blocks(kv_block_idx: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Dense ``[..., num_blocks]`` bool from an ascending, ``-1``-padded block table."""
    index = kv_block_idx.long()
    dense = torch.zeros((*index.shape[:-1], num_blocks + 1), dtype=torch.bool, device=index.device)
    # Padding (-1) lands in the extra last column, which is dropped.
    dense.scatter_(-1, torch.where(index < 0, num_blocks, index), True)
    return dense[..., :-1]


def segment_sums(x: torch.Tensor, segment: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sums (in ``dtype``, float32 by default) of consecutive ``segment``-token runs along dim
    -2 (last run may be short).

    ``[..., L, D] -> [..., ceil(L / segment), D]``; no ``dtype`` copy of ``x`` is made.
    """
    length = x.shape[-2]
    n_full = length // segment
    parts = []
    if n_full:
        parts.append(x[..., : n_full * segment, :].unflatten(-2, (n_full, segment)).sum(-2, dtype=dtype))
    if length % segment:
        parts.append(x[..., n_full * segment :, :].sum(-2, keepdim=True, dtype=dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


def block_key_sums_reference(k: torch.Tensor, history_len: torch.Tensor, block_size: int) -> torch.Tensor:
    """Float32 sums of each block's history tokens: ``[B, H, Lkv, D] -> [B, H, ceil(Lkv/bs), D]``.

    Plain torch (any device); ``omnimem.kernels.block_sums`` is the GPU kernel it specifies.
    Tokens at or past ``history_len`` are masked with ``torch.where`` so whatever lies there
    never leaks into a sum; blocks past the history are zero.

    Each block is summed token by token in order (elementwise adds): unlike a library
    reduction, whose order depends on the whole tensor's shape and strides, this gives the
    same bits for a block whether it is summed alone (a commit), within the whole history (a
    restore) or from another buffer (host offload).
    """
    length = k.shape[-2]
    num_blocks = math.ceil(length / block_size)
    sums = torch.zeros((*k.shape[:-2], num_blocks, k.shape[-1]), dtype=torch.float32, device=k.device)
    block_start = torch.arange(num_blocks, device=k.device) * block_size
    for offset in range(min(block_size, length)):
        keys = k[..., offset::block_size, :]  # token `offset` of every block that has one
        blocks = keys.shape[-2]
        valid = (block_start[:blocks] + offset < history_len)[:, None]
        sums[..., :blocks, :] += torch.where(valid, keys, 0).float()
    return sums


# The kernel unrolls a block's rows at compile time: past this, compiling would take minutes
# (a block larger than the whole buffer is legal: it acts as one block), so torch sums it.
_KERNEL_MAX_BLOCK = 8192


def block_key_sums(k: torch.Tensor, history_len: torch.Tensor, block_size: int) -> torch.Tensor:
    """``block_key_sums_reference``, through a memory-bound Triton kernel on CUDA devices (for
    blocks of up to 8,192 tokens)."""
    if k.device.type == "cuda" and block_size <= _KERNEL_MAX_BLOCK:
        from omnimem.kernels.block_sums import block_sums

        return block_sums(k, history_len, block_size)
    return block_key_sums_reference(k, history_len, block_size)


def block_means_from_sums(
    block_sums: torch.Tensor, history_len: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Divide per-block key sums ``[B, H, NB, D]`` by each block's count of history tokens."""
    start = torch.arange(block_sums.shape[-2], device=block_sums.device) * block_size
    valid_tokens = (history_len - start).clamp(0, block_size)
    return block_sums / valid_tokens.clamp(min=1)[:, None]


def block_key_means(k: torch.Tensor, history_len: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean key of every history block: ``[B, Hkv, Lkv, D] -> [B, Hkv, ceil(Lkv/bs), D]`` float32.

    Only the ``history_len`` valid tokens count (the last block may be partial); blocks past
    the history are zero.
    """
    return block_means_from_sums(block_key_sums(k, history_len, block_size), history_len, block_size)


def pooled_queries(q: torch.Tensor, query_group_size: int) -> torch.Tensor:
    """Mean query of every query group: ``[B, Hq, Lq, D] -> [B, Hq, G, D]`` float32."""
    length = q.shape[-2]
    group_sums = segment_sums(q, query_group_size)
    group_start = torch.arange(group_sums.shape[-2], device=q.device) * query_group_size
    group_len = (length - group_start).clamp(max=query_group_size)
    return group_sums / group_len[:, None]


def block_scores(
    q: torch.Tensor,
    block_means: torch.Tensor,
    *,
    query_group_size: int,
    scale: float,
) -> torch.Tensor:
    """``score[b, kvh, g, j]``: pooled query . mean key, summed over the query heads of a KV head.

    Args:
        q: ``[B, Hq, Lq, D]`` chunk queries.
        block_means: ``[B, Hkv, NB, D]`` float32 mean keys (``block_key_means``), or key
            sums (scores then scale with each block's token count).
        query_group_size: queries per group.
        scale: softmax scale (positive; applied for fidelity to the contract).

    Returns:
        ``[B, Hkv, G, NB]`` float32 scores.
    """
    num_kv_heads = block_means.shape[1]
    pooled = pooled_queries(q, query_group_size)
    # Summing scores over a GQA group equals scoring the summed pooled queries once.
    pooled = reduce(pooled, "b (hkv r) g d -> b hkv g d", "sum", hkv=num_kv_heads)
    return torch.einsum("bhgd,bhjd->bhgj", pooled, block_means) * scale


class RetrievalRules(NamedTuple):
    """The config fields selection depends on, as plain values (compile-friendly constants)."""

    block_size: int
    top_k: int
    sink_tokens: int
    local_tokens: int
    exclusion_tokens: int
    window_exclusion: str

    @classmethod
    def from_config(cls, config: OmniMemConfig) -> RetrievalRules:
        return cls(
            config.block_size,
            config.top_k,
            config.sink_tokens,
            config.local_tokens,
            config.effective_exclusion_tokens,
            config.window_exclusion,
        )

    def fixed_blocks(self, num_blocks: int) -> tuple[int, int]:
        """Static bounds ``(sink, local)`` on sink and local-window blocks (the local window
        spans one block more when misaligned), at most ``num_blocks`` each."""
        num_sink = min(num_blocks, math.ceil(self.sink_tokens / self.block_size))
        local = math.ceil(self.local_tokens / self.block_size) + 1 if self.local_tokens else 0
        return num_sink, min(num_blocks, local)

    def table_width(self, num_blocks: int) -> int:
        """Static bound on attended history blocks: sink + local (+1 if misaligned) + budget."""
        return min(num_blocks, sum(self.fixed_blocks(num_blocks)) + min(self.top_k, num_blocks))


def window_masks(
    history_len: torch.Tensor, num_blocks: int, rules: RetrievalRules
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-block ``(valid, fixed, recent)`` bool masks ``[num_blocks]`` (docs/concepts.md, "The exact rule").

    ``fixed`` is sink ∪ local (always attended); ``recent`` is the exclusion window ``E``
    (which contains the local window); far blocks are ``valid & ~fixed & ~recent``.
    """
    start = torch.arange(num_blocks, device=history_len.device) * rules.block_size
    end = start + rules.block_size
    valid = start < history_len
    sink = valid & (start < rules.sink_tokens)
    # A block intersects [history_len - w, history_len) iff it ends after its left edge.
    none = torch.zeros_like(valid)
    local = valid & ~sink & (end > history_len - rules.local_tokens) if rules.local_tokens else none
    recent = valid & ~sink & (end > history_len - rules.exclusion_tokens) if rules.exclusion_tokens else none
    return valid, sink | local, recent | local


def _order_preserving_bits(scores: torch.Tensor) -> torch.Tensor:
    """Map float32 to int64 in [0, 2**32) with the same order (-0.0 and +0.0 equal)."""
    bits = (scores.float() + 0.0).view(torch.int32)
    # Negative floats: flip the 31 magnitude bits (int32 arithmetic, no select: compiled for
    # 256-bit CPU vectors, torch 2.13's int64 select on the sign picked the wrong branch).
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long() + (1 << 31)


def compact_indices(mask: torch.Tensor, width: int, pad: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending positions of the ``True`` entries along the last dim, as int32 ``(count, index)``.

    ``index`` has static width ``width`` (which must bound every row's count), padded with
    ``pad``. A prefix sum and a scatter: no sort, and it fuses under ``torch.compile``.
    """
    length = mask.shape[-1]
    slot = mask.cumsum(-1) - 1
    index = torch.full((*mask.shape[:-1], width + 1), pad, dtype=torch.int32, device=mask.device)
    # Unselected entries all land in the extra last column, which is dropped.
    position = torch.arange(length, device=mask.device, dtype=torch.int32).expand(mask.shape)
    index.scatter_(-1, torch.where(mask, slot, width), position)
    return mask.sum(-1, dtype=torch.int32), index[..., :width]


def selection_tables(
    scores: torch.Tensor, history_len: torch.Tensor, rules: RetrievalRules
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply the window rules and the top-k budget to block scores.

    Args:
        scores: ``[B, Hkv, G, NB]`` float32 block scores (``block_scores``).
        history_len: 0-d integer tensor on ``scores.device``.
        rules: the retrieval rules.

    Returns:
        ``(kv_block_idx, kv_num_blocks, selected_block_idx, fixed_block_mask)`` as documented
        on [`Selection`][omnimem.Selection].
    """
    num_blocks = scores.shape[-1]
    valid, fixed, recent = window_masks(history_len, num_blocks, rules)
    far = valid & ~fixed & ~recent
    if rules.window_exclusion == "never":
        tier = torch.where(far | recent, _TIER_FAR, 0)
    elif rules.window_exclusion == "always":
        tier = torch.where(far, _TIER_FAR, 0)
    else:  # adaptive: recent blocks only fill slots the far history leaves empty
        tier = torch.where(far, _TIER_FAR, torch.where(recent, _TIER_RECENT, 0))
    # A block whose keys hold a NaN (a corrupted frame) is no candidate: retrieval leaves it out
    # whatever the budget, so the NaN reaches no output (sink and local blocks are attended
    # regardless, as always).
    tier = torch.where(scores.isnan(), 0, tier)
    scores = torch.where(scores.isnan(), 0.0, scores)

    selected = ranked_top_blocks(scores, tier, rules.top_k)

    kv_block_idx, kv_num_blocks = _attended_table(selected, history_len, num_blocks, rules)
    return kv_block_idx, kv_num_blocks, selected.int(), fixed


def ranked_top_blocks(scores: torch.Tensor, tier: torch.Tensor, top_k: int) -> torch.Tensor:
    """The ``min(top_k, NB)`` best blocks per row of ``scores [..., NB]``, best first, ``-1``
    where no candidate is left. ``tier [..., NB]`` (broadcast; 0 = not a candidate) ranks
    before the score; equal scores rank the lower block index first."""
    num_blocks = scores.shape[-1]
    block = torch.arange(num_blocks, device=scores.device)
    key = (
        (tier.long() << _TIER_SHIFT)
        | (_order_preserving_bits(scores) << _INDEX_BITS)
        | (_MAX_BLOCKS - 1 - block)
    )
    top_key, top_block = torch.topk(key, min(top_k, num_blocks), dim=-1, sorted=True)
    return torch.where((top_key >> _TIER_SHIFT) > 0, top_block, -1)


def triton_tables_supported(num_blocks: int, rules: RetrievalRules) -> bool:
    """Whether ``triton_selection_tables`` takes these sizes: each of its sorts holds at most
    ``MAX_SORT`` (4096) keys in one program (up to ~524k blocks at top_k 32, three hours of
    Wan2.1-1.3B), and the table holds at most 256 sink, local and top-k blocks."""
    from omnimem.kernels.block_tables import MAX_SORT, plan_sizes

    chunk, keys_pad, union_pad = plan_sizes(num_blocks, rules.top_k, sum(rules.fixed_blocks(num_blocks)))
    return chunk <= MAX_SORT and keys_pad <= MAX_SORT and union_pad <= 256


def kernel_table_rules(rules: RetrievalRules, num_blocks: int) -> dict:
    """The retrieval rules as the table kernels' keyword arguments (``block_tables`` and
    ``block_tables_from_sums`` in ``omnimem/kernels/block_tables.py``)."""
    num_sink, num_local = rules.fixed_blocks(num_blocks)
    return dict(
        num_sink=num_sink,
        num_local=num_local,
        block_size=rules.block_size,
        top_k=rules.top_k,
        sink_tokens=rules.sink_tokens,
        local_tokens=rules.local_tokens,
        exclusion_tokens=rules.exclusion_tokens,
        window_exclusion=rules.window_exclusion,
        table_width=rules.table_width(num_blocks),
        index_bits=_INDEX_BITS,
        tier_shift=_TIER_SHIFT,
        tier_far=_TIER_FAR,
        tier_recent=_TIER_RECENT,
    )


def triton_selection_tables(
    scores: torch.Tensor, history_len: torch.Tensor, rules: RetrievalRules
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``selection_tables`` in two Triton kernels (``omnimem/kernels/block_tables.py``): the
    same keys, so the same tables bit for bit."""
    from omnimem.kernels.block_tables import block_tables

    return block_tables(scores.float(), history_len, **kernel_table_rules(rules, scores.shape[-1]))


def triton_selection_from_sums(
    q: torch.Tensor,
    block_sums: torch.Tensor,
    history_len: torch.Tensor,
    rules: RetrievalRules,
    query_group_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_tables_from_block_sums`` in two Triton kernels: the pooled queries
    (``omnimem/kernels/pooled_queries.py``), then scores, top-k and tables in one launch
    (``block_tables.block_tables_from_sums``). Scores equal the torch path's up to float32
    rounding order, so only near-ties can rank differently. Each (KV head, query group) scores
    the block sums on its own: meant for one query group (the default)."""
    from omnimem.kernels.block_tables import block_tables_from_sums, num_table_tickets
    from omnimem.kernels.pooled_queries import pooled_queries as pooled_queries_kernel

    batch, num_heads, q_len, _ = q.shape
    num_kv_heads, num_blocks = block_sums.shape[1], block_sums.shape[2]
    num_groups = math.ceil(q_len / query_group_size)
    # One zeroed buffer for both kernels' tickets, so that nothing runs between them.
    num_pooled = batch * num_heads * num_groups
    rows = batch * num_kv_heads * num_groups
    tickets = torch.zeros(
        num_pooled + num_table_tickets(rows, num_blocks, rules.top_k, sum(rules.fixed_blocks(num_blocks))),
        device=q.device,
        dtype=torch.int32,
    )
    pooled = pooled_queries_kernel(q, query_group_size, tickets=tickets[:num_pooled])
    int8 = isinstance(block_sums, Int8BlockSums)
    return block_tables_from_sums(
        pooled,
        block_sums.codes if int8 else block_sums,
        history_len,
        scale=scale,
        **kernel_table_rules(rules, num_blocks),
        tickets=tickets[num_pooled:],
        sum_steps=block_sums.step if int8 else None,
    )


_RANK_SORT_MAX_WIDTH = 256  # [.., width, width] comparisons stay small


def block_union(blocks: torch.Tensor, member: torch.Tensor, *, width: int, none: int) -> torch.Tensor:
    """The distinct ``blocks [B, H, N]`` where ``member``, ascending in ``width`` slots per
    ``(b, h)``: ``union [B, H, width]``, ``none`` in unused slots (``none`` exceeds every
    block). ``torch.searchsorted(union, block)`` gives a member block's slot."""
    return sorted_unique(torch.where(member, blocks, none), none=none)[..., :width].contiguous()


def gather_block_union(
    blocks: torch.Tensor, member: torch.Tensor, *, width: int, none: int, block_size: int, buffers
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``block_union``, and the union's tokens copied out of each of ``buffers`` ``[B, H, L,
    D]`` into ``[B, H, width * block_size, D]`` (zeros in unused slots). The caches train on
    such compact copies."""
    union = block_union(blocks, member, width=width, none=none)
    return union, gather_union_rows(union, none=none, block_size=block_size, buffers=buffers)


def gather_union_rows(union: torch.Tensor, *, none: int, block_size: int, buffers) -> list[torch.Tensor]:
    """The tokens of the ``union [B, H, W]`` blocks (``none``: an empty slot) copied out of each of
    ``buffers`` ``[B, H, L, D]`` into ``[B, H, W * block_size, D]`` (zeros in empty slots)."""
    tokens = union[..., None] * block_size + torch.arange(block_size, device=union.device)
    valid = (union < none)[..., None].expand_as(tokens).flatten(2)
    index = torch.where(valid, tokens.flatten(2), 0)[..., None]
    return [
        torch.where(valid[..., None], x.gather(2, index.expand(-1, -1, -1, x.shape[-1])), 0) for x in buffers
    ]


def compact_numbering(blocks: torch.Tensor, live_first: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``blocks [B, H, N]`` (block indices, ``-1`` empty) renumbered onto compact keys: first
    the union of the blocks before ``live_first`` (``W = min(N, live_first)`` slots, ascending),
    then the blocks from ``live_first`` on, contiguous. Returns ``(union [B, H, W], renumbered)``
    (``union`` is ``None`` when ``W == 0``; ``live_first + 1`` marks its empty slots)."""
    in_history = (blocks >= 0) & (blocks < live_first)
    width = min(blocks.shape[-1], live_first)  # static slots for the selected history blocks
    renumbered = torch.where(blocks >= live_first, width + blocks - live_first, -1)
    if not width:
        return None, renumbered
    none = live_first + 1
    union = block_union(blocks, in_history, width=width, none=none)
    position = torch.searchsorted(union, torch.where(in_history, blocks, none).contiguous())
    return union, torch.where(in_history, position, renumbered)


def sorted_unique(indices: torch.Tensor, *, none: int) -> torch.Tensor:
    """Sort each row ascending and replace repeats by ``none`` (which sorts last).

    ``none`` must exceed every real index; rows keep their static width.

    Without ``torch.sort``: Inductor lowers it into an in-kernel sorting network whose LLVM
    compile took ~1 min at 12 heads and never finished at 40 (torch 2.11), and ``topk`` costs
    ~16 us per call on an H100 at these sizes. Rows are short (the sink, local and top-k
    blocks), so each element's place is counted directly (``O(width^2)`` comparisons in fused
    reductions) and the row is scattered into place; wide rows (many query groups) go through
    ``topk``.
    """
    width = indices.shape[-1]
    if width > _RANK_SORT_MAX_WIDTH:
        ascending = torch.topk(indices, width, dim=-1, largest=False, sorted=True).values
        first = torch.zeros_like(ascending[..., :1], dtype=torch.bool)
        repeated = torch.cat([first, ascending[..., 1:] == ascending[..., :-1]], dim=-1)
        unique = torch.where(repeated, none, ascending)
        return torch.topk(unique, width, dim=-1, largest=False, sorted=True).values
    order = torch.arange(width, device=indices.device)
    mine, other = indices.unsqueeze(-1), indices.unsqueeze(-2)  # [..., i, 1], [..., 1, j]
    earlier = order < order[:, None]  # j before i in the row
    first = ~((other == mine) & earlier).any(-1)  # i holds the first occurrence of its value
    distinct_below = ((other < mine) & first.unsqueeze(-2)).sum(-1)
    repeats_before = (~first.unsqueeze(-2) & earlier).sum(-1)
    place = torch.where(first, distinct_below, first.sum(-1, keepdim=True) + repeats_before)
    return torch.empty_like(indices).scatter_(-1, place, torch.where(first, indices, none))


def _attended_table(
    selected: torch.Tensor, history_len: torch.Tensor, num_blocks: int, rules: RetrievalRules
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending, de-duplicated sink ∪ local ∪ selected blocks, ``-1`` padded to a static width.

    Sorts the few candidate indices (sink, local window, budget) instead of scanning every block:
    the cost does not grow with the history.
    """
    bs, device = rules.block_size, selected.device
    num_sink, num_local = rules.fixed_blocks(num_blocks)
    sink = torch.arange(num_sink, device=device)
    sink = torch.where(sink * bs < history_len, sink, num_blocks)
    first_local = (history_len - rules.local_tokens).clamp(min=0) // bs
    local = first_local + torch.arange(num_local, device=device)
    local = torch.where(local * bs < history_len, local, num_blocks)
    fixed = torch.cat([sink, local]).expand(*selected.shape[:-1], -1)
    candidates = torch.cat([fixed, torch.where(selected < 0, num_blocks, selected)], dim=-1)
    candidates = sorted_unique(candidates, none=num_blocks)
    candidates = candidates[..., : rules.table_width(num_blocks)]
    is_block = candidates < num_blocks
    return torch.where(is_block, candidates, -1).int(), is_block.sum(-1, dtype=torch.int32)


def _scores_from_block_sums(
    q: torch.Tensor,
    block_sums: torch.Tensor,
    history_len: torch.Tensor,
    rules: RetrievalRules,
    query_group_size: int,
    scale: float,
) -> torch.Tensor:
    scores = block_scores(q, block_sums, query_group_size=query_group_size, scale=scale)
    # Dividing the [B, H, G, NB] scores by block sizes, not the [B, H, NB, D] sums: a D-times
    # smaller pass (score of a mean key = score of the sum / token count).
    start = torch.arange(block_sums.shape[-2], device=block_sums.device) * rules.block_size
    return scores / (history_len - start).clamp(1, rules.block_size)


def _tables_from_block_sums(
    q: torch.Tensor,
    block_sums: torch.Tensor,
    history_len: torch.Tensor,
    rules: RetrievalRules,
    query_group_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    scores = _scores_from_block_sums(q, block_sums, history_len, rules, query_group_size, scale)
    return selection_tables(scores, history_len, rules)


@functools.cache
def _compiled_tables_from_block_sums():
    # Eager selection is ~60 small kernels, launch-bound on a GPU; compiled, Inductor fuses it.
    return compile_static(_tables_from_block_sums)


@functools.cache
def _compiled_scores_from_block_sums():
    return compile_static(_scores_from_block_sums)


@functools.cache
def _say_int8_index_dequantized() -> None:
    logging.getLogger("omnimem").info(
        "an int8 selection index is read in place by the fused selection kernel (one query group "
        "per chunk); with several query groups or past the kernel's limits it is dequantized "
        "per call (a float32 copy of the index)"
    )


def select(
    q: torch.Tensor,
    k: torch.Tensor,
    history_len: torch.Tensor,
    config: OmniMemConfig,
    *,
    scale: float,
    compiled: bool = False,
    key_block_sums: torch.Tensor | None = None,
) -> Selection:
    """Block selection for validated inputs (the public entry point is ``omnimem.select_blocks``).

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lkv, D]``; history_len: 0-d int64 tensor on q's device.
        config: retrieval configuration; scale: the softmax scale.
        key_block_sums: cached ``block_key_sums(k, history_len, block_size)`` (float32, or
            ``Int8BlockSums``); then ``k`` is not read (a full pass over the key history
            otherwise).
        compiled: run the pipeline through ``torch.compile`` (static shapes: one compile per
            buffer shape and config, none as ``history_len`` changes).
    """
    num_blocks = math.ceil(k.shape[-2] / config.block_size)
    if num_blocks >= _MAX_BLOCKS:
        raise ValueError(f"k holds {num_blocks} blocks; at most {_MAX_BLOCKS - 1} are supported")
    q_len = q.shape[-2]
    group_size = min(config.query_group_size or q_len, q_len)
    rules = RetrievalRules.from_config(config)
    if key_block_sums is None:
        key_block_sums = block_key_sums(k, history_len, config.block_size)
    fused = q.is_cuda and triton_tables_supported(num_blocks, rules) and group_size == q_len
    if isinstance(key_block_sums, Int8BlockSums) and not fused:
        if q.is_cuda:
            _say_int8_index_dequantized()
        key_block_sums = key_block_sums.dequantize()  # the reference path
    args = (q, key_block_sums, history_len, rules, group_size, scale)
    if q.is_cuda and triton_tables_supported(num_blocks, rules):
        if group_size == q_len:
            # Two Triton kernels (pooled queries; scores, top-k and tables) instead of seven.
            kv_block_idx, kv_num_blocks, selected, fixed = triton_selection_from_sums(*args)
        else:
            # Several query groups: one cuBLAS GEMM scores them all from one read of the block
            # sums (measured faster at 3 groups, 60 s), then the table kernels.
            scores = (_compiled_scores_from_block_sums() if compiled else _scores_from_block_sums)(*args)
            kv_block_idx, kv_num_blocks, selected, fixed = triton_selection_tables(scores, history_len, rules)
    else:
        tables = _compiled_tables_from_block_sums() if compiled else _tables_from_block_sums
        kv_block_idx, kv_num_blocks, selected, fixed = tables(*args)
    return Selection(
        kv_block_idx=kv_block_idx,
        kv_num_blocks=kv_num_blocks,
        selected_block_idx=selected,
        fixed_block_mask=fixed,
        history_len=history_len,
        block_size=config.block_size,
        query_group_size=group_size,
        num_history_blocks=num_blocks,
    )


def token_mask_mod(
    selection: Selection,
    *,
    num_q_heads: int,
    chunk_len: int,
    block_attended: torch.Tensor | None = None,
):
    """The attended set as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool``.

    Token ``kv_idx`` is attended by query ``q_idx`` of query head ``h`` iff it is a history
    token of an attended block (for that head's KV head and the query's group) or a token of
    the current chunk ``[history_len, history_len + chunk_len)``. The function broadcasts, so
    it also builds a dense mask from broadcastable index tensors. ``block_attended`` reuses an
    already computed ``selection.attended_block_mask()``.
    """
    attended = selection.attended_block_mask() if block_attended is None else block_attended
    heads_per_kv = num_q_heads // attended.shape[1]
    last_group = attended.shape[2] - 1
    last_block = selection.num_history_blocks - 1
    history_len = selection.history_len
    chunk_end = history_len + chunk_len
    block_size, group_size = selection.block_size, selection.query_group_size

    def mask_mod(b, h, q_idx, kv_idx):
        # Clamps keep padded tile indices of compiled kernels inside the table.
        group = (q_idx // group_size).clamp(max=last_group)
        block = (kv_idx // block_size).clamp(max=last_block)
        in_history = kv_idx < history_len
        block_attended = attended[b, h // heads_per_kv, group, block]
        return (in_history & block_attended) | (~in_history & (kv_idx < chunk_end))

    return mask_mod
