"""Top-k and block tables from block scores in two kernels (reference: ``selection_tables``).

Torch's path spends ~40 us at wan-1.3b 60 s in a 64-bit ``topk`` and a dozen small kernels that
assemble the table; here:

1. ``_chunk_topk_kernel``: one program per (row, chunk of blocks) applies the window rules,
   packs each block's selection key (tier, score bits, -index: the same int64 keys as the
   torch path, so the same order and ties), sorts its chunk and keeps its best ``K_PAD`` keys.
2. ``_merge_tables_kernel``: one program per row takes the top-k of the chunks' survivors
   (kept as alternating ascending/descending runs, so bitonic top-k's merge steps suffice),
   writes it in rank order, then places the sink, local and selected blocks in the ascending
   table by counting (no second sort).
3. ``_tables_from_sums_kernel``: scores (pooled query . block sum / tokens) and both steps
   above in one launch. Programs score tiles of blocks; the last tile of a chunk to finish
   (an atomic ticket) ranks the chunk, the last chunk of a row merges the row. Dependent
   launches cost more than the work at these sizes, so chaining them inside one grid pays.

A row is one (batch, KV head, query group) of the ``[B, Hkv, G, NB]`` scores.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _chunk_top_keys(
    scores_row, keys_row, fixed_ptr, history_len, row, chunk, stride_block, num_blocks,
    sink_tokens, local_tokens, exclusion_tokens,
    BLOCK_SIZE: tl.constexpr, MODE: tl.constexpr, CHUNK: tl.constexpr, K_PAD: tl.constexpr,
    INDEX_BITS: tl.constexpr, TIER_SHIFT: tl.constexpr, TIER_FAR: tl.constexpr,
    TIER_RECENT: tl.constexpr,
):  # fmt: skip
    """Keys of one chunk of a row's blocks, sorted; the best ``K_PAD`` go to ``keys_row``.
    Scores are read through L2 (``.cg``): other programs may have just written them."""
    block = chunk * CHUNK + tl.arange(0, CHUNK)
    in_range = block < num_blocks
    score = tl.load(scores_row + block * stride_block, mask=in_range, other=0.0, cache_modifier=".cg")

    # Window rules (docs/concepts.md, "The exact rule"), as in ``window_masks``.
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
    # A block whose keys hold a NaN (a corrupted frame) is no candidate (as ``selection_tables``).
    tier = tl.where(score != score, 0, tier)
    score = tl.where(score != score, 0.0, score)
    if row == 0:
        tl.store(fixed_ptr + block, sink | local, mask=in_range)

    # Order-preserving bits of the float32 score (-0.0 as +0.0), then the packed key.
    score = tl.where(score == 0.0, 0.0, score)
    bits = score.to(tl.int32, bitcast=True).to(tl.int64)
    ordered = tl.where(bits >= 0, bits + (1 << 31), (1 << 31) - 1 - (bits & 0x7FFFFFFF))
    key = (tier.to(tl.int64) << TIER_SHIFT) | (ordered << INDEX_BITS) | ((1 << INDEX_BITS) - 1 - block)
    key = tl.where(in_range, key, -1)  # below every real key
    key = tl.sort(key, descending=True)
    # Kept ascending in even chunks, descending in odd ones: neighbouring runs are bitonic, so
    # the merge starts from bitonic top-k's merge steps instead of sorting everything again.
    slot = tl.arange(0, CHUNK)
    run_slot = tl.where(chunk % 2 == 0, K_PAD - 1 - slot, slot)
    tl.store(keys_row + chunk * K_PAD + run_slot, key, mask=slot < K_PAD)


@triton.jit
def _compare_and_swap(h, flip, i: tl.constexpr, n_dims: tl.constexpr):
    """One bitonic step along axis ``i`` (counted from the innermost) of a ``[2] * n_dims``
    hypercube: ``flip`` 0 keeps pairs ascending, 1 descending. The same step as ``tl.sort``'s,
    whose helpers are private to triton (and differ between versions), hence this copy."""
    partner = h ^ tl.xor_sum(h, n_dims - 1 - i, True)
    is_right = tl.reshape(tl.arange(0, 2), [1] * (n_dims - i - 1) + [2] + [1] * i)
    return tl.where((h > partner) != (flip ^ is_right).to(tl.int1), partner, h)


@triton.jit
def _top_of_bitonic_runs(key, K: tl.constexpr, N: tl.constexpr):
    """The ``K`` largest of ``N`` int64 keys in descending order, given runs of ``K`` that
    alternate ascending (even runs) and descending: bitonic top-k (Shanbhag et al., 2018; what
    ``tl.topk`` does after sorting the runs). Each level keeps the larger of paired runs (a
    bitonic sequence holding their top ``K``) and merges it: ``log2(N / K)`` levels of
    ``log2(K) + 1`` steps instead of a full sort's ``log2(N) (log2(N) + 1) / 2``."""
    LOG_K: tl.constexpr = K.bit_length() - 1
    LOG_N: tl.constexpr = N.bit_length() - 1
    if LOG_K == 0:
        key = tl.max(key, 0, keep_dims=True)
    elif LOG_N == LOG_K:  # one run, ascending (``tl.flip`` fails to compile here with triton 3.6)
        key = tl.sort(key, descending=True)
    else:
        h = tl.reshape(key, [2] * LOG_N)
        for level in tl.static_range(LOG_K + 1, LOG_N + 1):
            h = tl.max(h, axis=LOG_N - level)
            h = _bitonic_merge_runs(h, LOG_K, LOG_K + LOG_N - level, level < LOG_N)
        key = tl.reshape(h, [K])
    return key


@triton.jit
def _bitonic_merge_runs(h, log_run: tl.constexpr, n_dims: tl.constexpr, alternate: tl.constexpr):
    """Sort each bitonic run of ``2 ** log_run`` keys of a ``[2] * n_dims`` hypercube:
    alternately ascending and descending (``alternate``) or all descending."""
    if alternate:  # noqa: SIM108 (a compile-time branch: the two values differ in type)
        flip = tl.reshape(tl.arange(0, 2), [1] * (n_dims - log_run - 1) + [2] + [1] * log_run)
    else:
        flip = 1
    for step in tl.static_range(log_run):
        h = _compare_and_swap(h, flip, log_run - 1 - step, n_dims)
    return h


@triton.jit
def _merge_row_tables(
    keys_row, selected_row, table_row, num_blocks_out, history_len,
    num_blocks, num_keys, top_k, num_sink, num_local, local_tokens, table_width,
    BLOCK_SIZE: tl.constexpr, KEYS_PAD: tl.constexpr, FIXED_PAD: tl.constexpr,
    TOPK_PAD: tl.constexpr, WIDTH_PAD: tl.constexpr, INDEX_BITS: tl.constexpr,
    TIER_SHIFT: tl.constexpr,
):  # fmt: skip
    """One row's top-k (rank order) and ascending sink + local + selected table from its
    chunks' surviving keys."""
    # The top-k keys in rank order; those without a tier are not candidates (-1).
    slot = tl.arange(0, KEYS_PAD)
    key = tl.load(keys_row + slot, mask=slot < num_keys, other=-1, cache_modifier=".cg")
    key = _top_of_bitonic_runs(key, TOPK_PAD, KEYS_PAD)
    slot = tl.arange(0, TOPK_PAD)
    block = (1 << INDEX_BITS) - 1 - (key & ((1 << INDEX_BITS) - 1))
    selected = tl.where((key >> TIER_SHIFT) > 0, block, -1).to(tl.int32)
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
    tl.store(table_row + fixed_place, fixed, mask=keep & (fixed_place < table_width))
    tl.store(table_row + picked_place, picked, mask=extra & (picked_place < table_width))
    u = tl.arange(0, WIDTH_PAD)
    tl.store(table_row + u, -1, mask=(u >= count) & (u < table_width))
    tl.store(num_blocks_out, tl.minimum(count, table_width))


@triton.jit
def _chunk_topk_kernel(
    scores_ptr, keys_ptr, fixed_ptr, history_len_ptr, stride_row, stride_block,
    num_blocks, num_chunks, sink_tokens, local_tokens, exclusion_tokens,
    BLOCK_SIZE: tl.constexpr, MODE: tl.constexpr, CHUNK: tl.constexpr, K_PAD: tl.constexpr,
    INDEX_BITS: tl.constexpr, TIER_SHIFT: tl.constexpr, TIER_FAR: tl.constexpr,
    TIER_RECENT: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    _chunk_top_keys(
        scores_ptr + row.to(tl.int64) * stride_row, keys_ptr + row.to(tl.int64) * num_chunks * K_PAD,
        fixed_ptr, tl.load(history_len_ptr), row, tl.program_id(1), stride_block, num_blocks,
        sink_tokens, local_tokens, exclusion_tokens, BLOCK_SIZE, MODE, CHUNK, K_PAD, INDEX_BITS,
        TIER_SHIFT, TIER_FAR, TIER_RECENT,
    )  # fmt: skip


@triton.jit
def _merge_tables_kernel(
    keys_ptr, selected_ptr, block_idx_ptr, num_blocks_out_ptr, history_len_ptr,
    num_blocks, num_keys, top_k, num_sink, num_local, local_tokens, table_width,
    BLOCK_SIZE: tl.constexpr, KEYS_PAD: tl.constexpr, FIXED_PAD: tl.constexpr,
    TOPK_PAD: tl.constexpr, WIDTH_PAD: tl.constexpr, INDEX_BITS: tl.constexpr,
    TIER_SHIFT: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    _merge_row_tables(
        keys_ptr + row * num_keys, selected_ptr + row * top_k, block_idx_ptr + row * table_width,
        num_blocks_out_ptr + row, tl.load(history_len_ptr), num_blocks, num_keys, top_k, num_sink,
        num_local, local_tokens, table_width, BLOCK_SIZE, KEYS_PAD, FIXED_PAD, TOPK_PAD, WIDTH_PAD,
        INDEX_BITS, TIER_SHIFT,
    )  # fmt: skip


@triton.jit
def _tables_from_sums_kernel(
    pooled_ptr, sums_ptr, steps_ptr, scores_ptr, keys_ptr, fixed_ptr, selected_ptr, block_idx_ptr,
    num_blocks_out_ptr, history_len_ptr, ticket_ptr,
    stride_sb, stride_sh, stride_sj, stride_sd, stride_pb, stride_ph, stride_pj,
    num_kv_heads, heads_per_kv, num_groups, num_blocks, num_chunks, num_tiles, scale,
    sink_tokens, local_tokens, exclusion_tokens, top_k, num_sink, num_local, table_width,
    BLOCKS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, MODE: tl.constexpr, CHUNK: tl.constexpr, K_PAD: tl.constexpr,
    KEYS_PAD: tl.constexpr, FIXED_PAD: tl.constexpr, TOPK_PAD: tl.constexpr,
    WIDTH_PAD: tl.constexpr, INDEX_BITS: tl.constexpr, TIER_SHIFT: tl.constexpr,
    TIER_FAR: tl.constexpr, TIER_RECENT: tl.constexpr, INT8: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # (batch, KV head, query group)
    tile = tl.program_id(1)
    group = row % num_groups
    batch = row // num_groups // num_kv_heads
    kv_head = row // num_groups % num_kv_heads
    block = tile * BLOCKS + tl.arange(0, BLOCKS)
    cols = tl.arange(0, D_PAD)
    col_ok = cols < HEAD_DIM
    # The block sums come from DRAM: their load is issued before anything waits.
    sums_row = sums_ptr + batch.to(tl.int64) * stride_sb + kv_head.to(tl.int64) * stride_sh
    key_sums = tl.load(
        sums_row + block.to(tl.int64)[:, None] * stride_sj + cols[None, :] * stride_sd,
        mask=(block[:, None] < num_blocks) & col_ok[None, :],
        other=0,
    ).to(tl.float32)
    # Scores of the KV head's query heads summed (GQA) = the summed pooled queries' score.
    pooled = tl.zeros([D_PAD], dtype=tl.float32)
    for r in range(heads_per_kv):
        head_group = ((batch * num_kv_heads + kv_head) * heads_per_kv + r) * num_groups + group
        pooled += tl.load(pooled_ptr + head_group.to(tl.int64) * HEAD_DIM + cols, mask=col_ok, other=0.0)
    history_len = tl.load(history_len_ptr)
    tokens = tl.minimum(tl.maximum(history_len - block.to(tl.int64) * BLOCK_SIZE, 1), BLOCK_SIZE)
    # float32 math like the torch path (a caller's torch.compile passes ``scale`` as float64).
    score = tl.sum(key_sums * pooled[None, :], axis=1)
    if INT8:  # an int8 index (omnimem.store.index): codes times each block's step
        steps_row = steps_ptr + batch.to(tl.int64) * stride_pb + kv_head.to(tl.int64) * stride_ph
        score *= tl.load(steps_row + block.to(tl.int64) * stride_pj, mask=block < num_blocks, other=0.0)
    score = score * tl.cast(scale, tl.float32)
    score = tl.div_rn(score, tokens.to(tl.float32))
    scores_row = scores_ptr + row.to(tl.int64) * num_blocks
    tl.store(scores_row + block, score, mask=block < num_blocks)

    # The last tile of a chunk to finish ranks the chunk; the last chunk of a row merges it.
    TILES_PER_CHUNK: tl.constexpr = CHUNK // BLOCKS
    chunk = tile // TILES_PER_CHUNK
    chunk_tiles = tl.minimum(TILES_PER_CHUNK, num_tiles - chunk * TILES_PER_CHUNK)
    keys_row = keys_ptr + row.to(tl.int64) * num_chunks * K_PAD
    tl.debug_barrier()  # every thread's stores before the release (CUTLASS's pattern)
    if tl.atomic_add(ticket_ptr + row * num_chunks + chunk, 1, sem="acq_rel") == chunk_tiles - 1:
        _chunk_top_keys(
            scores_row, keys_row, fixed_ptr, history_len, row, chunk, 1, num_blocks, sink_tokens,
            local_tokens, exclusion_tokens, BLOCK_SIZE, MODE, CHUNK, K_PAD, INDEX_BITS, TIER_SHIFT,
            TIER_FAR, TIER_RECENT,
        )  # fmt: skip
        tl.debug_barrier()
        row_ticket = ticket_ptr + tl.num_programs(0) * num_chunks + row
        if tl.atomic_add(row_ticket, 1, sem="acq_rel") == num_chunks - 1:
            _merge_row_tables(
                keys_row, selected_ptr + row.to(tl.int64) * top_k,
                block_idx_ptr + row.to(tl.int64) * table_width, num_blocks_out_ptr + row, history_len,
                num_blocks, num_chunks * K_PAD, top_k, num_sink, num_local, local_tokens, table_width,
                BLOCK_SIZE, KEYS_PAD, FIXED_PAD, TOPK_PAD, WIDTH_PAD, INDEX_BITS, TIER_SHIFT,
            )  # fmt: skip


# One program sorts at most this many keys (a chunk of a row's blocks, or the merge's survivors).
MAX_SORT = 4096


def plan_sizes(num_blocks: int, top_k: int, num_fixed: int) -> tuple[int, int, int]:
    """``(chunk, keys_pad, union_pad)``: blocks per first-pass program (32 chunks per row, or
    more chunks of ``MAX_SORT`` blocks past that: an hour of Wan2.1-1.3B is 175k blocks, 43
    chunks), the merge's sort width, and the width of the sink + local + top-k candidates."""
    k_pad = triton.next_power_of_2(min(top_k, num_blocks))
    chunk = max(256, 2 * k_pad, triton.next_power_of_2(math.ceil(num_blocks / 32)))
    chunk = min(chunk, max(MAX_SORT, 2 * k_pad))
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


def num_table_tickets(rows: int, num_blocks: int, top_k: int, num_fixed: int) -> int:
    """Size of ``block_tables_from_sums``'s ticket buffer: one per chunk and one per row."""
    chunk = plan_sizes(num_blocks, top_k, num_fixed)[0]
    return rows * (math.ceil(num_blocks / chunk) + 1)


def block_tables_from_sums(
    pooled: torch.Tensor,
    block_sums: torch.Tensor,
    history_len: torch.Tensor,
    *,
    scale: float,
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
    tickets: torch.Tensor | None = None,
    sum_steps: torch.Tensor | None = None,
    blocks: int = 64,
    num_warps: int = 8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``block_tables`` of the scores ``<pooled, block mean> * scale`` in one kernel: scores,
    chunk top-k and merge, chained by atomic tickets (the last program to finish a chunk ranks
    it, the last chunk of a row merges the row).

    ``pooled [B, Hq, G, D]`` float32 mean queries (``pooled_queries``); ``block_sums
    [B, Hkv, NB, D]`` float32 key sums, or int8 codes with ``sum_steps [B, Hkv, NB]`` float32
    (``omnimem.store.index.Int8BlockSums``); the query heads of a KV head are summed (GQA).
    ``tickets``: ``num_table_tickets(...)`` zeroed int32 (allocated here if not given);
    ``blocks``: history blocks scored per program (64 on 8 warps measured best on an H100).
    """
    batch, num_heads, num_groups, head_dim = pooled.shape
    num_kv_heads, num_blocks = block_sums.shape[1], block_sums.shape[2]
    rows = batch * num_kv_heads * num_groups
    device = pooled.device
    k = min(top_k, num_blocks)
    k_pad = triton.next_power_of_2(k)
    chunk, keys_pad, _ = plan_sizes(num_blocks, top_k, num_sink + num_local)
    num_chunks = math.ceil(num_blocks / chunk)
    blocks = min(blocks, chunk)  # both powers of two: a chunk is whole tiles
    num_tiles = triton.cdiv(num_blocks, blocks)
    scores = torch.empty(rows, num_blocks, device=device, dtype=torch.float32)
    keys = torch.empty(rows, num_chunks, k_pad, device=device, dtype=torch.int64)
    if tickets is None:
        tickets = torch.zeros(
            num_table_tickets(rows, num_blocks, top_k, num_sink + num_local), device=device, dtype=torch.int32
        )
    fixed = torch.empty(num_blocks, device=device, dtype=torch.bool)
    lead = (batch, num_kv_heads, num_groups)
    selected = torch.empty(*lead, k, device=device, dtype=torch.int32)
    block_idx = torch.empty(*lead, table_width, device=device, dtype=torch.int32)
    count = torch.empty(*lead, device=device, dtype=torch.int32)
    steps = block_sums if sum_steps is None else sum_steps  # (unread for float32 sums)
    step_strides = (0, 0, 0) if sum_steps is None else sum_steps.stride()
    _tables_from_sums_kernel[(rows, num_tiles)](
        pooled, block_sums, steps, scores, keys, fixed, selected, block_idx, count, history_len, tickets,
        *block_sums.stride(), *step_strides, num_kv_heads, num_heads // num_kv_heads, num_groups, num_blocks,
        num_chunks, num_tiles, scale, sink_tokens, local_tokens, exclusion_tokens, k, num_sink,
        num_local, table_width, BLOCKS=blocks, HEAD_DIM=head_dim,
        D_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=block_size,
        MODE={"never": 0, "always": 1, "adaptive": 2}[window_exclusion], CHUNK=chunk, K_PAD=k_pad,
        KEYS_PAD=keys_pad, FIXED_PAD=triton.next_power_of_2(max(1, num_sink + num_local)),
        TOPK_PAD=k_pad, WIDTH_PAD=triton.next_power_of_2(table_width), INDEX_BITS=index_bits,
        TIER_SHIFT=tier_shift, TIER_FAR=tier_far, TIER_RECENT=tier_recent, INT8=sum_steps is not None,
        num_warps=num_warps,
    )  # fmt: skip
    return block_idx, count, selected, fixed
