"""Top-k and block tables from block scores in two kernels (reference: ``selection_tables``).

Torch's path spends ~40 us at wan-1.3b 60 s in a 64-bit ``topk`` and a dozen small kernels that
assemble the table; here:

1. ``_chunk_topk_kernel``: one program per (row, chunk of blocks) applies the window rules,
   packs each block's selection key (tier, score bits, -index: the same int64 keys as the
   torch path, so the same order and ties), sorts its chunk and keeps its best ``K_PAD`` keys.
2. ``_merge_tables_kernel``: one program per row sorts the chunks' survivors, writes the
   top-k in rank order, then the ascending union of sink, local and selected blocks.

A row is one (batch, KV head, query group) of the ``[B, Hkv, G, NB]`` scores.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _chunk_topk_kernel(
    scores_ptr, keys_ptr, fixed_ptr, history_len_ptr, stride_row, stride_block,
    num_blocks, num_chunks, sink_tokens, local_tokens, exclusion_tokens,
    BLOCK_SIZE: tl.constexpr, MODE: tl.constexpr, CHUNK: tl.constexpr, K_PAD: tl.constexpr,
    INDEX_BITS: tl.constexpr, TIER_SHIFT: tl.constexpr, TIER_FAR: tl.constexpr,
    TIER_RECENT: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    block = chunk * CHUNK + tl.arange(0, CHUNK)
    in_range = block < num_blocks
    score = tl.load(
        scores_ptr + row.to(tl.int64) * stride_row + block * stride_block, mask=in_range, other=0.0
    )
    history_len = tl.load(history_len_ptr)

    # Window rules (DESIGN.md section 2), as in ``window_masks``.
    start = block.to(tl.int64) * BLOCK_SIZE
    end = start + BLOCK_SIZE
    valid = start < history_len
    sink = valid & (start < sink_tokens)
    local = valid & ~sink & (end > history_len - local_tokens) & (local_tokens > 0)
    recent = (valid & ~sink & (end > history_len - exclusion_tokens) & (exclusion_tokens > 0)) | local
    far = valid & ~(sink | local) & ~recent
    if MODE == 0:  # never
        tier = tl.where(far | recent, TIER_FAR, 0)
    elif MODE == 1:  # always
        tier = tl.where(far, TIER_FAR, 0)
    else:  # adaptive: recent blocks only fill slots the far history leaves empty
        tier = tl.where(far, TIER_FAR, tl.where(recent, TIER_RECENT, 0))
    if row == 0:
        tl.store(fixed_ptr + block, (sink | local).to(tl.int8), mask=in_range)

    # Order-preserving bits of the float32 score (-0.0 as +0.0), then the packed key.
    score = tl.where(score == 0.0, 0.0, score)
    bits = score.to(tl.int32, bitcast=True).to(tl.int64)
    ordered = tl.where(bits >= 0, bits + (1 << 31), (1 << 31) - 1 - (bits & 0x7FFFFFFF))
    key = (tier.to(tl.int64) << TIER_SHIFT) | (ordered << INDEX_BITS) | ((1 << INDEX_BITS) - 1 - block)
    key = tl.where(in_range, key, -1)  # below every real key
    key = tl.sort(key, descending=True)
    slot = tl.arange(0, CHUNK)
    out = keys_ptr + (row.to(tl.int64) * num_chunks + chunk) * K_PAD + slot
    tl.store(out, key, mask=slot < K_PAD)


@triton.jit
def _merge_tables_kernel(
    keys_ptr, selected_ptr, block_idx_ptr, num_blocks_out_ptr, history_len_ptr,
    num_blocks, num_keys, top_k, num_sink, num_local, local_tokens, table_width,
    BLOCK_SIZE: tl.constexpr, KEYS_PAD: tl.constexpr, UNION_PAD: tl.constexpr,
    INDEX_BITS: tl.constexpr, TIER_SHIFT: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    history_len = tl.load(history_len_ptr)

    # The top-k keys in rank order; those without a tier are not candidates (-1).
    slot = tl.arange(0, KEYS_PAD)
    key = tl.load(keys_ptr + row.to(tl.int64) * num_keys + slot, mask=slot < num_keys, other=-1)
    key = tl.sort(key, descending=True)
    block = (1 << INDEX_BITS) - 1 - (key & ((1 << INDEX_BITS) - 1))
    selected = tl.where((key >> TIER_SHIFT) > 0, block, -1).to(tl.int32)
    selected_row = selected_ptr + row.to(tl.int64) * top_k
    tl.store(selected_row + slot, selected, mask=slot < top_k)
    tl.debug_barrier()  # the stores above are read back by other threads below

    # Candidates: sink blocks, local blocks, selected blocks; `num_blocks` marks "none".
    u = tl.arange(0, UNION_PAD)
    first_local = tl.maximum(history_len - local_tokens, 0) // BLOCK_SIZE
    is_sink = u < num_sink
    is_local = (u >= num_sink) & (u < num_sink + num_local)
    is_selected = (u >= num_sink + num_local) & (u < num_sink + num_local + top_k)
    picked = tl.load(selected_row + (u - num_sink - num_local), mask=is_selected, other=-1)
    fixed = tl.where(is_sink, u, first_local + (u - num_sink)).to(tl.int64)
    candidate = tl.where(
        is_sink | is_local,
        tl.where(fixed * BLOCK_SIZE < history_len, fixed, num_blocks),
        tl.where(picked >= 0, picked, num_blocks),
    ).to(tl.int32)
    candidate = tl.where(is_sink | is_local | is_selected, candidate, num_blocks)
    # Repeats (a selected block inside the local window, say) become "none", then sort.
    earlier_equal = (candidate[None, :] == candidate[:, None]) & (u[None, :] < u[:, None])
    candidate = tl.where(tl.max(earlier_equal.to(tl.int32), 1) > 0, num_blocks, candidate)
    candidate = tl.sort(candidate)
    is_block = (candidate < num_blocks) & (u < table_width)
    tl.store(
        block_idx_ptr + row.to(tl.int64) * table_width + u,
        tl.where(is_block, candidate, -1),
        mask=u < table_width,
    )
    tl.store(num_blocks_out_ptr + row, tl.sum(is_block.to(tl.int32), 0))


def plan_sizes(num_blocks: int, top_k: int, num_fixed: int) -> tuple[int, int, int]:
    """``(chunk, keys_pad, union_pad)``: blocks per first-pass program (at most 32 chunks per
    row), the merge's sort width, and the candidate union's width."""
    k_pad = triton.next_power_of_2(min(top_k, num_blocks))
    chunk = max(256, 2 * k_pad, triton.next_power_of_2(math.ceil(num_blocks / 32)))
    keys_pad = triton.next_power_of_2(math.ceil(num_blocks / chunk) * k_pad)
    union_pad = triton.next_power_of_2(num_fixed + min(top_k, num_blocks))
    return chunk, keys_pad, union_pad


def block_tables(
    scores: torch.Tensor,
    history_len: torch.Tensor,
    *,
    num_sink: int,
    num_local: int,
    block_size: int,
    top_k: int,
    sink_tokens: int,
    local_tokens: int,
    exclusion_tokens: int,
    window_exclusion: str,
    table_width: int,
    index_bits: int,
    tier_shift: int,
    tier_far: int,
    tier_recent: int,
    merge_warps: int = 8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kv_block_idx [.., W] int32, kv_num_blocks [..] int32, selected [.., K] int32,
    fixed [NB] bool)`` from ``scores [B, Hkv, G, NB]`` float32, as ``selection_tables``
    returns them (``K = min(top_k, NB)``); ``num_sink``/``num_local``: the
    ``RetrievalRules.fixed_blocks`` bounds. ``merge_warps``: warps of the per-row merge (8
    measured fastest: 21.5 us for both kernels at 60 s, 24.6 with 4, 32.5 with 2)."""
    *lead, num_blocks = scores.shape
    rows = math.prod(lead)
    scores = scores.reshape(rows, num_blocks)  # a view for the usual [.., G, NB] layouts
    device = scores.device
    k = min(top_k, num_blocks)
    k_pad = triton.next_power_of_2(k)
    chunk, keys_pad, union_pad = plan_sizes(num_blocks, top_k, num_sink + num_local)
    num_chunks = math.ceil(num_blocks / chunk)
    keys = torch.empty(rows, num_chunks, k_pad, device=device, dtype=torch.int64)
    fixed = torch.empty(num_blocks, device=device, dtype=torch.int8)
    consts = dict(INDEX_BITS=index_bits, TIER_SHIFT=tier_shift)
    mode = {"never": 0, "always": 1, "adaptive": 2}[window_exclusion]
    _chunk_topk_kernel[(rows, num_chunks)](
        scores, keys, fixed, history_len, *scores.stride(), num_blocks, num_chunks, sink_tokens, local_tokens,
        exclusion_tokens, BLOCK_SIZE=block_size, MODE=mode, CHUNK=chunk, K_PAD=k_pad,
        TIER_FAR=tier_far, TIER_RECENT=tier_recent, **consts,
    )  # fmt: skip
    selected = torch.empty(*lead, k, device=device, dtype=torch.int32)
    block_idx = torch.empty(*lead, table_width, device=device, dtype=torch.int32)
    count = torch.empty(*lead, device=device, dtype=torch.int32)
    _merge_tables_kernel[(rows,)](
        keys, selected, block_idx, count, history_len,
        num_blocks, num_chunks * k_pad, k, num_sink, num_local, local_tokens, table_width,
        BLOCK_SIZE=block_size, KEYS_PAD=keys_pad, UNION_PAD=union_pad, **consts, num_warps=merge_warps,
    )  # fmt: skip
    return block_idx, count, selected, fixed.bool()
