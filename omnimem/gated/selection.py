"""Fine-grained selection for the gated layer: per (batch, KV head, query group), the ``top_k``
pooled blocks of the whole sequence (history and chunk) whose mean key best matches the
group's mean query, among the candidates of ``GatedConfig.candidates`` (docs/gated.md).

It is ``omnimem.selection`` generalised: the same pooled queries, the same packed keys (score,
then lower block index on ties) and top-k; the blocks tile the whole sequence and the
candidates are one range of them (``candidate_span``: every valid block, the authors' chunk
exclusion, or the blocks entirely before the sliding window once ``top_k`` of them exist). On CUDA the scores
and the top-k run in Triton kernels (``omnimem/kernels/group_queries.py``: the pooled queries
and the candidates' span; ``omnimem/kernels/group_topk.py``: bucket maxima, then exact scores of
the few candidate buckets) that never write the ``[G, NB]`` score matrix.
"""

from __future__ import annotations

import dataclasses

import torch
from einops import reduce

from omnimem.selection import attended_blocks, pooled_queries, ranked_top_blocks


@dataclasses.dataclass(frozen=True)
class GroupSelection:
    """The blocks each query group's selected branch attends.

    Attributes:
        block_idx: ``[B, Hkv, G, top_k]`` int32, best first, ``-1`` padded (fewer candidates
            than ``top_k``).
        num_blocks: ``[B, Hkv, G]`` int32, valid entries of ``block_idx``.
        seq_len: 0-d int64 tensor, history + chunk tokens.
        block_size: tokens per block.
        query_group_size: queries per group.
        num_slots: static number of block slots of the pooled buffers.
    """

    block_idx: torch.Tensor
    num_blocks: torch.Tensor
    seq_len: torch.Tensor
    block_size: int
    query_group_size: int
    num_slots: int

    def __repr__(self) -> str:
        b, h, g, k = self.block_idx.shape
        return (
            f"GroupSelection(B={b}, Hkv={h}, groups={g}, top_k={k}, block_size={self.block_size}, "
            f"query_group_size={self.query_group_size}, device={self.block_idx.device})"
        )

    @property
    def num_groups(self) -> int:
        return self.block_idx.shape[2]

    def to(self, device: torch.device | str) -> GroupSelection:
        return dataclasses.replace(
            self,
            block_idx=self.block_idx.to(device),
            num_blocks=self.num_blocks.to(device),
            seq_len=self.seq_len.to(device),
        )

    def attended_block_mask(self) -> torch.Tensor:
        """Dense ``[B, Hkv, G, num_slots]`` bool: group ``g`` attends block ``j``."""
        return attended_blocks(self.block_idx, self.num_slots)


@dataclasses.dataclass(frozen=True)
class CandidateRule:
    """Which blocks a call's groups may select: ``GatedConfig.candidates`` and the settings it
    reads (docs/gated.md, "Candidates"). Hashable, so launchers may key on it."""

    mode: str
    block_size: int
    top_k: int
    window_tokens: int
    exclude_window_chunks: int = 0
    exclude_sink_chunks: int = 0
    progressive_exclude: bool = True

    @classmethod
    def of(cls, config) -> CandidateRule:
        """The rule of a ``GatedConfig``."""
        return cls(
            config.candidates, config.block_size, config.top_k, config.window_tokens,
            config.exclude_window_chunks, config.exclude_sink_chunks, config.progressive_exclude,
        )  # fmt: skip

    def sink_end(self, q_len: int) -> int:
        """``"chunks"``: the first block past the excluded leading chunks (static)."""
        return -(-self.exclude_sink_chunks * q_len // self.block_size)


def candidate_span(seq_len: torch.Tensor, q_len: int, rule: CandidateRule) -> torch.Tensor:
    """``[2]`` int64 ``(start, end)``: the candidates are the blocks ``[start, end)`` of a call
    whose chunk of ``q_len`` queries ends at ``seq_len`` (a 0-d integer tensor; device
    arithmetic, no host sync).

    ``"all"``: every block of ``[0, seq_len)``. ``"awe"``: the blocks entirely before the
    window ``[seq_len - window_tokens, seq_len)`` when there are at least ``top_k`` of them,
    else every block. ``"chunks"`` (the authors'): in units of ``q_len`` tokens, the call is
    chunk ``c = (seq_len - q_len) // q_len`` and block ``j`` lies in chunk ``j * block_size //
    q_len``; where the exclusion applies, chunks ``< exclude_sink_chunks`` and ``>= c -
    exclude_window_chunks + 1`` hold no candidate, which leaves one range of blocks.
    """
    bs = rule.block_size
    valid = (seq_len + bs - 1) // bs
    start = torch.zeros_like(valid)
    if rule.mode == "all":
        return torch.stack((start, valid))
    if rule.mode == "awe":
        before = (seq_len - rule.window_tokens).clamp(min=0) // bs
        return torch.stack((start, torch.where(before >= rule.top_k, before, valid)))
    chunk = (seq_len - q_len) // q_len
    end = valid
    if rule.exclude_window_chunks:  # ceil(first excluded chunk's first token / block_size)
        first_excluded = (chunk - rule.exclude_window_chunks + 1).clamp(min=0)
        end = torch.minimum((first_excluded * q_len + bs - 1) // bs, valid)
    applies = chunk >= rule.exclude_sink_chunks + rule.exclude_window_chunks
    if not rule.progressive_exclude:
        applies = torch.ones_like(applies)
    return torch.stack((torch.where(applies, rule.sink_end(q_len), start), torch.where(applies, end, valid)))


def as_span(candidates: torch.Tensor) -> torch.Tensor:
    """``[2]`` ``(start, end)`` from a span, or from a 0-d ``end`` (the blocks ``[0, end)``)."""
    return candidates if candidates.dim() == 1 else torch.stack((torch.zeros_like(candidates), candidates))


def group_queries(q: torch.Tensor, query_group_size: int, num_kv_heads: int, precision: str) -> torch.Tensor:
    """``[B, Hkv, G, D]`` float32: each group's mean query, summed over a KV head's query heads
    (summed scores of the heads = the score of the summed queries). ``precision="input"``
    rounds each head's mean to ``q.dtype`` first, as the authors' code does."""
    pooled = pooled_queries(q, query_group_size)
    if precision == "input":
        pooled = pooled.to(q.dtype).float()
    return reduce(pooled, "b (hkv r) g d -> b hkv g d", "sum", hkv=num_kv_heads)


def selection_keys(k_means: torch.Tensor, precision: str, dtype: torch.dtype) -> torch.Tensor:
    """The block means selection scores: float32, or rounded through ``dtype`` (``"input"``)."""
    return k_means.to(dtype).float() if precision == "input" else k_means


def select_groups_torch(
    pooled_q: torch.Tensor, k_means: torch.Tensor, span: torch.Tensor, *, top_k: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of every (group, block), then the ranked top-k (the kernel's reference); the
    candidates are the blocks ``[start, end)`` of ``span`` (``candidate_span``; a 0-d ``end``
    means ``[0, end)``).

    Returns ``(block_idx [B, Hkv, G, top_k] int32, num_blocks [B, Hkv, G] int32)``.
    """
    scores = torch.einsum("bhgd,bhjd->bhgj", pooled_q, k_means) * scale
    start, end = as_span(span).unbind()
    block = torch.arange(k_means.shape[2], device=k_means.device)
    # A block whose mean holds a NaN (a corrupted block) is no candidate, as in the kernels.
    candidate = (block >= start) & (block < end) & ~scores.isnan()
    ranked = ranked_top_blocks(torch.where(scores.isnan(), 0.0, scores), candidate, top_k)
    if ranked.shape[-1] < top_k:  # fewer slots than top_k: pad to the static width
        ranked = torch.nn.functional.pad(ranked, (0, top_k - ranked.shape[-1]), value=-1)
    return ranked.int(), (ranked >= 0).sum(-1, dtype=torch.int32)


def select_groups(
    q: torch.Tensor,
    k_means: torch.Tensor,
    seq_len: torch.Tensor,
    *,
    query_group_size: int,
    rule: CandidateRule,
    precision: str,
    scale: float,
    use_kernel: bool,
    approx_keys: torch.Tensor | None = None,
    key_bounds: torch.Tensor | None = None,
) -> GroupSelection:
    """Fine-grained selection for validated inputs (public: ``omnimem.select_group_blocks``).

    Args:
        q: ``[B, Hq, Lq, D]`` chunk queries; k_means: ``[B, Hkv, NB, D]`` float32 block means.
        seq_len: 0-d int64 tensor on q's device (history + chunk tokens).
        rule: the candidates (``CandidateRule.of(config)``); ``rule.top_k`` blocks are selected.
        use_kernel: score and rank in the Triton kernel (CUDA, or CPU under the interpreter).
        approx_keys: the block means in bfloat16 (a bfloat16 model's ``k_attn``), for the
            kernel's approximate first pass on CUDA; the result is the same.
        key_bounds: ``[B, Hkv, NB, 2]`` (``PooledKV.k_bounds``): required with ``approx_keys``.
    """
    group_size = min(query_group_size, q.shape[2])
    keys = selection_keys(k_means, precision, q.dtype)
    if use_kernel:
        from omnimem.kernels.group_queries import group_queries_and_span
        from omnimem.kernels.group_topk import group_topk
        from omnimem.kernels.pdl import pdl_available

        # Three short kernels in a chain: on Hopper each starts while its predecessor drains.
        pdl = pdl_available(q.device)
        pooled_q, span = group_queries_and_span(
            q, seq_len, query_group_size=group_size, num_kv_heads=k_means.shape[1], precision=precision,
            rule=rule, pdl_trigger=pdl,
        )  # fmt: skip
        block_idx, num_blocks = group_topk(
            pooled_q, keys, span, top_k=rule.top_k, scale=scale, approx_keys=approx_keys,
            key_bounds=key_bounds, pdl=pdl,
        )  # fmt: skip
    else:
        pooled_q = group_queries(q, group_size, k_means.shape[1], precision)
        span = candidate_span(seq_len, q.shape[2], rule)
        block_idx, num_blocks = select_groups_torch(pooled_q, keys, span, top_k=rule.top_k, scale=scale)
    return GroupSelection(
        block_idx=block_idx,
        num_blocks=num_blocks,
        seq_len=seq_len,
        block_size=rule.block_size,
        query_group_size=group_size,
        num_slots=k_means.shape[2],
    )
