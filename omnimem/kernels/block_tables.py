"""Top-k and block tables from block scores in two kernels (reference: ``selection_tables``).

Torch's path spends ~40 us at wan-1.3b 60 s in a 64-bit ``topk`` and a dozen small kernels that
assemble the table; here:

1. ``_chunk_topk_kernel``: one program per (row, chunk of blocks) applies the window rules,
   packs each block's selection key (tier, score bits, -index: the same int64 keys as the
   torch path, so the same order and ties), sorts its chunk and keeps its best ``K_PAD`` keys.
2. ``_merge_tables_kernel``: one program per row sorts the chunks' survivors, writes the
   top-k in rank order, then places the sink, local and selected blocks in the ascending
   table by counting (no second sort).

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
        tl.store(fixed_ptr + block, sink | local, mask=in_range)

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
    BLOCK_SIZE: tl.constexpr, KEYS_PAD: tl.constexpr, FIXED_PAD: tl.constexpr,
    TOPK_PAD: tl.constexpr, WIDTH_PAD: tl.constexpr, INDEX_BITS: tl.constexpr,
    TIER_SHIFT: tl.constexpr,
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

    # Fixed blocks: the sink range, then the local range minus what the sink holds. Both are
    # ascending, so the kept ones are too; `num_blocks` marks "none".
    valid_blocks = (history_len + BLOCK_SIZE - 1) // BLOCK_SIZE
    f = tl.arange(0, FIXED_PAD)
    sink_end = tl.minimum(num_sink, valid_blocks)
    first_local = tl.maximum(history_len - local_tokens, 0) // BLOCK_SIZE
    fixed = tl.where(f < num_sink, f, first_local + f - num_sink)
    is_local = (f >= num_sink) & (f < num_sink + num_local)
    keep = tl.where(f < num_sink, f < sink_end, is_local & (fixed < valid_blocks) & (fixed >= sink_end))
    fixed = tl.where(keep, fixed, num_blocks)
    # Selected blocks (distinct, never sink blocks) that the local window does not already hold.
    t = tl.arange(0, TOPK_PAD)
    picked = tl.load(selected_row + t, mask=t < top_k, other=-1)
    covered = tl.max((fixed[None, :] == picked[:, None]).to(tl.int32), 1) > 0
    extra = (picked >= 0) & ~covered
    picked = tl.where(extra, picked, num_blocks)
    # A block's place in the ascending table is the number of kept blocks below it: [F, K] and
    # [K, K] comparisons instead of sorting the whole candidate list again.
    kept = keep.to(tl.int32)
    fixed_place = tl.cumsum(kept, 0) - kept + tl.sum((picked[None, :] < fixed[:, None]).to(tl.int32), 1)
    picked_place = tl.sum((fixed[None, :] < picked[:, None]).to(tl.int32), 1) + tl.sum(
        (picked[None, :] < picked[:, None]).to(tl.int32), 1
    )
    count = tl.sum(kept, 0) + tl.sum(extra.to(tl.int32), 0)
    table_row = block_idx_ptr + row.to(tl.int64) * table_width
    tl.store(table_row + fixed_place, fixed, mask=keep & (fixed_place < table_width))
    tl.store(table_row + picked_place, picked, mask=extra & (picked_place < table_width))
    u = tl.arange(0, WIDTH_PAD)
    tl.store(table_row + u, -1, mask=(u >= count) & (u < table_width))
    tl.store(num_blocks_out_ptr + row, tl.minimum(count, table_width))


def plan_sizes(num_blocks: int, top_k: int, num_fixed: int) -> tuple[int, int, int]:
    """``(chunk, keys_pad, union_pad)``: blocks per first-pass program (at most 32 chunks per
    row), the merge's sort width, and the width of the sink + local + top-k candidates."""
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
    measured fastest on an H100)."""
    *lead, num_blocks = scores.shape
    rows = math.prod(lead)
    scores = scores.reshape(rows, num_blocks)  # a view for the usual [.., G, NB] layouts
    device = scores.device
    k = min(top_k, num_blocks)
    k_pad = triton.next_power_of_2(k)
    chunk, keys_pad, _ = plan_sizes(num_blocks, top_k, num_sink + num_local)
    num_chunks = math.ceil(num_blocks / chunk)
    keys = torch.empty(rows, num_chunks, k_pad, device=device, dtype=torch.int64)
    fixed = torch.empty(num_blocks, device=device, dtype=torch.bool)
    consts = dict(INDEX_BITS=index_bits, TIER_SHIFT=tier_shift, BLOCK_SIZE=block_size)
    mode = {"never": 0, "always": 1, "adaptive": 2}[window_exclusion]
    _chunk_topk_kernel[(rows, num_chunks)](
        scores, keys, fixed, history_len, *scores.stride(), num_blocks, num_chunks, sink_tokens, local_tokens,
        exclusion_tokens, MODE=mode, CHUNK=chunk, K_PAD=k_pad, TIER_FAR=tier_far, TIER_RECENT=tier_recent,
        **consts,
    )  # fmt: skip
    selected = torch.empty(*lead, k, device=device, dtype=torch.int32)
    block_idx = torch.empty(*lead, table_width, device=device, dtype=torch.int32)
    count = torch.empty(*lead, device=device, dtype=torch.int32)
    _merge_tables_kernel[(rows,)](
        keys, selected, block_idx, count, history_len, num_blocks, num_chunks * k_pad, k, num_sink,
        num_local, local_tokens, table_width, KEYS_PAD=keys_pad,
        FIXED_PAD=triton.next_power_of_2(max(1, num_sink + num_local)), TOPK_PAD=k_pad,
        WIDTH_PAD=triton.next_power_of_2(table_width), **consts, num_warps=merge_warps,
    )  # fmt: skip
    return block_idx, count, selected, fixed
