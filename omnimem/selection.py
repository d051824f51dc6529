"""Block selection: block scores, Adaptive Window Exclusion and query-shared top-k.

Everything here is vectorised torch with static shapes: the number of history blocks is taken
from the key buffer's length (``ceil(Lkv / block_size)``), and ``history_len`` enters only as a
0-d device tensor, so a growing history inside a preallocated buffer changes no shape, launches
the same kernels and never synchronises with the host.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from einops import reduce

from omnimem.config import OmniMemConfig

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
    """

    kv_block_idx: torch.Tensor
    kv_num_blocks: torch.Tensor
    selected_block_idx: torch.Tensor
    fixed_block_mask: torch.Tensor
    history_len: torch.Tensor
    block_size: int
    query_group_size: int
    num_history_blocks: int

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
        idx = self.kv_block_idx.long()
        dense = torch.zeros(
            (*idx.shape[:-1], self.num_history_blocks + 1), dtype=torch.bool, device=idx.device
        )
        # Padding (-1) lands in the extra last column, which is dropped.
        dense.scatter_(-1, torch.where(idx < 0, self.num_history_blocks, idx), True)
        return dense[..., :-1]

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


def segment_sums(x: torch.Tensor, segment: int) -> torch.Tensor:
    """Float32 sums of consecutive ``segment``-token runs along dim -2 (last run may be short).

    ``[..., L, D] -> [..., ceil(L / segment), D]``; no float32 copy of ``x`` is made.
    """
    length = x.shape[-2]
    n_full = length // segment
    parts = []
    if n_full:
        parts.append(
            x[..., : n_full * segment, :].unflatten(-2, (n_full, segment)).sum(-2, dtype=torch.float32)
        )
    if length % segment:
        parts.append(x[..., n_full * segment :, :].sum(-2, keepdim=True, dtype=torch.float32))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


def block_key_means(k: torch.Tensor, history_len: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean key of every history block: ``[B, Hkv, Lkv, D] -> [B, Hkv, ceil(Lkv/bs), D]`` float32.

    Only the ``history_len`` valid tokens count (the last block may be partial); blocks past
    the history are zero. The boundary block is summed from its own valid tokens with
    ``torch.where`` so that whatever lies past the history never leaks into a mean.
    """
    length = k.shape[-2]
    num_blocks = math.ceil(length / block_size)
    block_sums = segment_sums(k, block_size)
    block_start = torch.arange(num_blocks, device=k.device) * block_size
    valid_tokens = (history_len - block_start).clamp(0, block_size)

    boundary_block = history_len // block_size
    offsets = torch.arange(block_size, device=k.device)
    token = boundary_block * block_size + offsets
    in_history = token < history_len
    boundary_keys = k.index_select(-2, token.clamp(max=length - 1))
    boundary_sum = torch.where(in_history[:, None], boundary_keys, 0).sum(-2, dtype=torch.float32)

    is_boundary = (torch.arange(num_blocks, device=k.device) == boundary_block)[:, None]
    block_sums = torch.where(is_boundary, boundary_sum.unsqueeze(-2), block_sums)
    block_sums = torch.where((valid_tokens > 0)[:, None], block_sums, 0.0)
    return block_sums / valid_tokens.clamp(min=1)[:, None]


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
        block_means: ``[B, Hkv, NB, D]`` float32 mean keys (``block_key_means``).
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


def window_masks(
    history_len: torch.Tensor, num_blocks: int, config: OmniMemConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-block ``(valid, fixed, recent)`` bool masks ``[num_blocks]`` (DESIGN.md section 2).

    ``fixed`` is sink ∪ local (always attended); ``recent`` is the exclusion window ``E``
    (which contains the local window); far blocks are ``valid & ~fixed & ~recent``.
    """
    bs = config.block_size
    start = torch.arange(num_blocks, device=history_len.device) * bs
    end = start + bs
    valid = start < history_len
    sink = valid & (start < config.sink_tokens)
    # A block intersects [history_len - w, history_len) iff it ends after its left edge.
    none = torch.zeros_like(valid)
    local = valid & ~sink & (end > history_len - config.local_tokens) if config.local_tokens else none
    exclusion = config.effective_exclusion_tokens
    recent = valid & ~sink & (end > history_len - exclusion) if exclusion else none
    return valid, sink | local, recent | local


def _order_preserving_bits(scores: torch.Tensor) -> torch.Tensor:
    """Map float32 to int64 in [0, 2**32) with the same order (-0.0 and +0.0 equal)."""
    bits = (scores.float() + 0.0).view(torch.int32).long()
    return torch.where(bits >= 0, bits + (1 << 31), (1 << 31) - 1 - (bits & 0x7FFFFFFF))


def select_from_scores(
    scores: torch.Tensor,
    history_len: torch.Tensor,
    config: OmniMemConfig,
    *,
    query_group_size: int,
) -> Selection:
    """Apply the window rules and the top-k budget to block scores.

    Args:
        scores: ``[B, Hkv, G, NB]`` float32 block scores (``block_scores``).
        history_len: 0-d integer tensor on ``scores.device``.
        config: retrieval configuration.
        query_group_size: queries per group (recorded in the result).

    Returns:
        The [`Selection`][omnimem.Selection].
    """
    num_blocks = scores.shape[-1]
    if num_blocks >= _MAX_BLOCKS:
        raise ValueError(f"k holds {num_blocks} blocks; at most {_MAX_BLOCKS - 1} are supported")
    valid, fixed, recent = window_masks(history_len, num_blocks, config)
    far = valid & ~fixed & ~recent
    if config.window_exclusion == "never":
        tier = torch.where(far | recent, _TIER_FAR, 0)
    elif config.window_exclusion == "always":
        tier = torch.where(far, _TIER_FAR, 0)
    else:  # adaptive: recent blocks only fill slots the far history leaves empty
        tier = torch.where(far, _TIER_FAR, torch.where(recent, _TIER_RECENT, 0))

    block = torch.arange(num_blocks, device=scores.device)
    key = (tier << _TIER_SHIFT) | (_order_preserving_bits(scores) << _INDEX_BITS) | (_MAX_BLOCKS - 1 - block)
    budget = min(config.top_k, num_blocks)
    top_key, top_block = torch.topk(key, budget, dim=-1, sorted=True)
    is_candidate = (top_key >> _TIER_SHIFT) > 0
    selected = torch.where(is_candidate, top_block, -1)

    attended = torch.zeros((*scores.shape[:-1], num_blocks + 1), dtype=torch.bool, device=scores.device)
    attended.scatter_(-1, torch.where(is_candidate, top_block, num_blocks), True)
    attended = attended[..., :num_blocks] | fixed

    # Compact the dense mask into an ascending table of static width by a prefix-sum scatter.
    bs = config.block_size
    max_sink = math.ceil(config.sink_tokens / bs)
    max_local = math.ceil(config.local_tokens / bs) + 1 if config.local_tokens else 0
    width = min(num_blocks, max_sink + max_local + budget)
    slot = attended.cumsum(-1) - 1
    table = torch.full((*scores.shape[:-1], width + 1), -1, dtype=torch.int32, device=scores.device)
    table.scatter_(-1, torch.where(attended, slot, width), block.int().expand_as(slot))
    return Selection(
        kv_block_idx=table[..., :width],
        kv_num_blocks=attended.sum(-1, dtype=torch.int32),
        selected_block_idx=selected.int(),
        fixed_block_mask=fixed,
        history_len=history_len,
        block_size=bs,
        query_group_size=query_group_size,
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
