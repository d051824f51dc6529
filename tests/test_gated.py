"""The gated layer (``gated_attention``), its selection and its kernels against the float64
loop reference (``reference_gated.py``); validation; unattended data has no influence."""

from __future__ import annotations

import pytest
import torch

from omnimem import GatedConfig, PooledKV, gated_attention, pool_kv, select_group_blocks
from omnimem.gated.selection import CandidateRule, candidate_span, select_groups_torch
from omnimem.pooling import key_bounds

from .inputs import ON_HOPPER, TEST_DEVICE, exact_queries_and_keys, make_inputs
from .reference_gated import reference_gated_attention

CHUNKS_SINK = dict(
    candidates="chunks", exclude_window_chunks=2, exclude_sink_chunks=1, progressive_exclude=False
)
BACKENDS = ["gather", pytest.param("triton", marks=pytest.mark.filterwarnings("ignore"))]

CASES = [
    # q_heads, kv_heads, q_len, history, head_dim, block, group, top_k, window, candidates, flash
    (2, 2, 30, 270, 16, 30, 15, 4, 90, "all", False),
    (2, 1, 13, 50, 8, 7, 5, 3, 20, "awe", True),  # GQA, group size not dividing the chunk
    (1, 1, 5, 0, 16, 7, 15, 16, 14040, "all", False),  # no history, top_k above the candidates
    (3, 3, 17, 100, 16, 6, 4, 20, 30, "awe", True),  # awe with too few blocks before the window
    (2, 2, 9, 200, 16, 3, 2, 5, 40, "awe", False),  # awe excluding the window
    (1, 1, 1, 31, 4, 30, 15, 1, 1, "all", False),  # one query, a partial block
    # The authors' chunk exclusion (chunks of q_len tokens), past and before where it applies:
    (2, 1, 20, 100, 16, 7, 5, 3, 90, dict(candidates="chunks"), False),  # chunk 5: blocks 0..8
    (2, 2, 12, 60, 16, 5, 4, 4, 30, CHUNKS_SINK, True),  # sink chunk and 2 window chunks out
    (1, 1, 10, 10, 8, 4, 3, 2, 20, dict(candidates="chunks", progressive_exclude=False), False),  # none
    (2, 2, 10, 20, 8, 4, 3, 2, 20, dict(candidates="chunks"), False),  # chunk 2: not yet, all
    (1, 1, 9, 400, 8, 30, 15, 2, 40, dict(), False),  # GatedConfig's defaults (a straddling block)
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_gated_attention_matches_reference(case, backend):
    hq, hkv, lq, hist, d, bs, gs, top_k, window, cand, flash = case
    q, k, v = make_inputs(
        batch=2,
        q_heads=hq,
        kv_heads=hkv,
        q_len=lq,
        history_len=hist,
        head_dim=d,
        unwritten=3,
        flash_layout=flash,
    )
    gates = torch.rand(2, hq, lq, 3, generator=torch.Generator().manual_seed(1)).to(TEST_DEVICE)
    kwargs = dict(block_size=bs, query_group_size=gs, top_k=top_k, window_tokens=window)
    kwargs |= cand if isinstance(cand, dict) else dict(candidates=cand)
    ref = reference_gated_attention(q, k, v, gates, history_len=hist, **kwargs)
    assert ref.margin > 1e-4  # the cases have no near-tie at a top-k boundary
    out = gated_attention(q, k, v, gates, history_len=hist, backend=backend, **kwargs)
    assert out.dtype == q.dtype
    torch.testing.assert_close(out.double().cpu(), ref.out, atol=2e-5, rtol=1e-4)
    sel = select_group_blocks(q, k, history_len=hist, backend=backend, **kwargs)
    for (b, kvh, g), blocks in ref.selected_blocks.items():
        assert sel.block_idx[b, kvh, g, : len(blocks)].tolist() == blocks
        assert sel.num_blocks[b, kvh, g].item() == len(blocks)
        assert (sel.block_idx[b, kvh, g, len(blocks) :] == -1).all()


def _span(seq_len: int, q_len: int, mode: str, **settings: object) -> list[int]:
    rule = CandidateRule(mode, **{"block_size": 30, "top_k": 4, "window_tokens": 120, **settings})
    return candidate_span(torch.tensor(seq_len), q_len, rule).tolist()


def test_candidate_spans():
    assert _span(300, 60, "all") == [0, 10]
    assert _span(300, 60, "awe") == [0, 6]  # blocks 0..5 end before 180
    assert _span(300, 60, "awe", top_k=7) == [0, 10]  # too few: all
    # The authors' rule, chunks of 60 tokens (2 blocks): the call at 240 is chunk 4.
    window = dict(exclude_window_chunks=3)
    assert _span(300, 60, "chunks", **window) == [0, 4]  # chunks 2..4 excluded: blocks 0..3
    assert _span(240, 60, "chunks", **window) == [0, 2]  # chunk 3: the first it applies to
    assert _span(180, 60, "chunks", **window) == [0, 6]  # chunk 2 < 3: every block
    assert _span(300, 60, "chunks", exclude_window_chunks=0) == [0, 10]
    fixed = dict(exclude_window_chunks=2, exclude_sink_chunks=1, progressive_exclude=False)
    assert _span(300, 60, "chunks", **fixed) == [2, 6]  # chunk 0 and chunks 3..4 out
    assert _span(60, 60, "chunks", **fixed) == [2, 0]  # chunk 0: nothing is a candidate
    # Chunks of 50 tokens over 30-token blocks: a block is in the chunk of its first token.
    assert _span(250, 50, "chunks", **window) == [0, 4]  # block 3 starts at 90 (chunk 1)
    assert _span(250, 50, "chunks", **fixed) == [2, 5]  # block 1 starts at 30 (chunk 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unattended_positions_have_no_influence(backend):
    """NaN past the chunk's end (unwritten cache space) changes nothing; NaN in a history
    block that no group selects and the window does not cover reaches only the compressed
    branch, so it changes nothing once that branch's gate is 0."""
    q, k, v = make_inputs(q_heads=2, q_len=8, history_len=120, head_dim=16, unwritten=10)
    gates = torch.rand(1, 2, 8, 3, device=TEST_DEVICE)
    kwargs = dict(
        history_len=120, block_size=8, query_group_size=4, top_k=3, window_tokens=16, backend=backend
    )
    clean = gated_attention(q, k, v, gates, **kwargs)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 128:], v2[:, :, 128:] = float("nan"), float("nan")
    torch.testing.assert_close(gated_attention(q, k2, v2, gates, **kwargs), clean, atol=0, rtol=0)

    sel = select_group_blocks(q, k, history_len=120, block_size=8, query_group_size=4, top_k=3)
    unused = sorted(set(range(13)) - set(sel.block_idx.flatten().tolist()))
    assert unused, "every block was selected: the case tests nothing"
    gates[..., 0] = 0.0
    clean = gated_attention(q, k, v, gates, **kwargs)
    v3 = v.clone()
    v3[:, :, unused[0] * 8 : unused[0] * 8 + 8] = 1.0e6  # finite: the compressed means stay finite
    torch.testing.assert_close(gated_attention(q, k, v3, gates, **kwargs), clean, atol=1e-6, rtol=0)


def test_pooled_argument_equals_stateless_call():
    q, k, v = make_inputs(q_heads=2, q_len=15, history_len=75, head_dim=8, unwritten=20)
    gates = torch.rand(1, 2, 15, 3, device=TEST_DEVICE)
    pooled = pool_kv(k, v, seq_len=90, block_size=30, num_slots=4)  # one spare slot, as a cache has
    assert repr(pooled).startswith("PooledKV(B=1, Hkv=2, blocks=4")
    expected = gated_attention(q, k, v, gates, history_len=75, top_k=2, window_tokens=30)
    got = gated_attention(q, k, v, gates, history_len=75, top_k=2, window_tokens=30, pooled=pooled)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_input_pool_precision_rounds_like_the_authors():
    """``pool_precision="input"`` scores the block means rounded to the inputs' dtype."""
    q, k, v = make_inputs(q_heads=2, q_len=30, history_len=300, head_dim=16, dtype=torch.bfloat16)
    exact = select_group_blocks(q, k, history_len=300, top_k=4)
    rounded = select_group_blocks(q, k, history_len=300, top_k=4, pool_precision="input")
    assert exact.block_idx.shape == rounded.block_idx.shape
    pooled = pool_kv(k, v, seq_len=330, block_size=30)
    pq = q.float().unflatten(2, (2, 15)).mean(3).to(torch.bfloat16).float()
    end = torch.tensor(8)  # the default rule at chunk 10 (30 tokens each): chunks 8..10 excluded
    want, _ = select_groups_torch(pq, pooled.k.to(torch.bfloat16).float(), end, top_k=4, scale=16**-0.5)
    assert torch.equal(rounded.block_idx, want)


@pytest.mark.parametrize(
    ("groups", "num_slots", "end", "top_k", "options"),
    [
        (5, 200, 200, 16, {}),
        (3, 37, 20, 12, {}),
        (4, 150, 0, 5, {}),  # no candidate at all
        (5, 200, 200, 16, {"bucket": 16}),  # coarse buckets: more blocks scored exactly
        (4, 500, 433, 7, {"bucket": 8, "chunk_lanes": 16}),  # kept buckets span several steps
        # a loose bound keeps every bucket: pass 2 scores them all, step by step
        (2, 300, 290, 2, {"error_bound": 10.0, "chunk_lanes": 32}),
        (3, 120, 120, 4, {"error_bound": 10.0}),
        (3, 90, 90, 40, {"chunk_lanes": 16}),  # top_k above the step: one step of k_pad lanes
        (3, 90, 90, 40, {"one_pass": True}),  # the one-pass kernel
        (5, 200, 200, 16, {"refine": "warp"}),  # pass 2 from the tile maxima down
        (4, 150, 0, 5, {"refine": "warp"}),
        (2, 300, 290, 2, {"refine": "warp", "error_bound": 10.0, "chunk_lanes": 32}),
        (4, 500, 433, 7, {"refine": "warp", "bucket": 8, "chunk_lanes": 16}),
        (3, 37, 20, 12, {"refine": "warp", "refine_warps": 1}),  # fewer tiles than top_k
        (5, 200, 200, 16, {"d_chunk": 4}),  # exact scores 4 dimensions per load
        (5, 200, 200, 16, {"refine": "warp", "d_chunk": 8}),
        # a span [start, end) (the authors' sink exclusion): blocks before start never kept
        (5, 200, (37, 180), 16, {}),
        (4, 500, (130, 433), 7, {"refine": "warp", "bucket": 8, "chunk_lanes": 16}),
        (3, 90, (50, 90), 40, {"one_pass": True}),
        (3, 120, (100, 104), 8, {"error_bound": 10.0}),  # fewer candidates than top_k
        (4, 150, (60, 20), 5, {}),  # start past end: none
    ],
)
def test_group_topk_kernels_match_torch(groups, num_slots, end, top_k, options, monkeypatch):
    """Bit for bit on exact inputs (small integers: many exact ties, every order the same),
    with every buffer the kernels allocate poisoned (NaN or junk), so unwritten or unmasked
    entries show."""
    from omnimem.kernels.group_topk import group_topk

    original = torch.empty

    def poisoned(*args, **kwargs):
        buffer = original(*args, **kwargs)
        return buffer.fill_(float("nan") if buffer.is_floating_point() else -123456789)

    monkeypatch.setattr(torch, "empty", poisoned)

    gen = torch.Generator().manual_seed(groups + num_slots)
    pq, km = exact_queries_and_keys(1, 2, 2, groups, 1, 16, num_slots, gen)
    end = torch.tensor(end, device=TEST_DEVICE)  # a 0-d end, or a [start, end] span
    want = select_groups_torch(pq, km, end, top_k=top_k, scale=0.5)
    got = group_topk(pq, km, end, top_k=top_k, scale=0.5, rows=16, block_n=16, **options)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    if end.dim():
        assert ((got[0] < 0) | (got[0] >= end[0])).all()


@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "q_len", "group", "seq_len", "candidates", "precision"),
    [
        (2, 2, 30, 15, 330, "all", "float32"),
        (4, 2, 13, 5, 91, "awe", "input"),  # GQA, a short last group, awe past top_k
        (3, 1, 40, 40, 45, "awe", "float32"),  # awe with too few blocks before the window
        (1, 1, 7, 3, 7, "all", "input"),
        (2, 1, 13, 5, 91, ("chunks", dict(exclude_window_chunks=3)), "float32"),  # chunk 6
        (2, 2, 10, 3, 30, ("chunks", dict(exclude_window_chunks=3)), "float32"),  # chunk 2: not yet
        (1, 1, 9, 4, 54, ("chunks", dict(exclude_window_chunks=2, exclude_sink_chunks=1)), "input"),
        (1, 1, 9, 4, 27, ("chunks", dict(exclude_sink_chunks=2, progressive_exclude=False)), "input"),
    ],
)
@pytest.mark.parametrize("groups_per_program", [1, 2, 3])
def test_group_queries_kernel_matches_torch(
    q_heads, kv_heads, q_len, group, seq_len, candidates, precision, groups_per_program, poisoned_allocations
):
    """The selection's per-call inputs in one launch: pooled queries (GQA sum, rounding) and
    the candidates' span equal the torch path's (exact inputs: every sum order agrees), with
    programs of several groups (the last one partial) and the outputs poisoned."""
    from omnimem.gated.selection import group_queries
    from omnimem.kernels.group_queries import group_queries_and_span

    gen = torch.Generator().manual_seed(q_len)
    q = torch.randint(-8, 9, (2, q_heads, q_len, 16), generator=gen).to(torch.bfloat16).to(TEST_DEVICE)
    seq = torch.tensor(seq_len, device=TEST_DEVICE)
    mode, settings = candidates if isinstance(candidates, tuple) else (candidates, {})
    rule = CandidateRule(mode, block_size=7, top_k=3, window_tokens=20, **settings)
    pooled, span = group_queries_and_span(
        q, seq, query_group_size=group, num_kv_heads=kv_heads, precision=precision,
        groups_per_program=groups_per_program, rule=rule,
    )  # fmt: skip
    torch.testing.assert_close(pooled, group_queries(q, group, kv_heads, precision), atol=0, rtol=0)
    assert span.tolist() == candidate_span(seq, q_len, rule).tolist()


def test_selected_kernel_empty_rows_and_poisoned_output():
    """A group with no block yields 0, and every output row is written (NaN-filled buffer)."""
    from omnimem.backends import selected_attention as kernel_module
    from omnimem.backends.gated_branches import selected_attention_gather

    q, k, v = make_inputs(q_heads=2, kv_heads=1, q_len=10, history_len=40, head_dim=16)
    table = torch.tensor([[[[3, 0, -1], [-1, -1, -1], [5, 1, 2]]]], dtype=torch.int32, device=TEST_DEVICE)
    counts = (table >= 0).sum(-1, dtype=torch.int32)
    seq_len = torch.tensor(50, device=TEST_DEVICE)
    args = dict(block_idx=table, seq_len=seq_len, block_size=8, query_group_size=4, scale=0.25)
    want = selected_attention_gather(q, k, v, **args)
    original = torch.empty_like
    try:  # poison: every buffer the launcher allocates starts as NaN
        kernel_module.torch.empty_like = lambda x: original(x).fill_(float("nan"))
        got = kernel_module.selected_attention(q, k, v, num_blocks=counts, **args)
    finally:
        kernel_module.torch.empty_like = original
    assert (want[:, :, 4:8] == 0).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_validation_names_the_argument():
    q, k, v = make_inputs(q_heads=2, q_len=8, history_len=32, head_dim=16)
    gates = torch.rand(1, 2, 8, 3, device=TEST_DEVICE)
    with pytest.raises(ValueError, match=r"gates must have shape \(1, 2, 8, 3\)"):
        gated_attention(q, k, v, gates[..., :2])
    with pytest.raises(TypeError, match=r"gates must be a torch\.Tensor"):
        gated_attention(q, k, v, 0.5)
    with pytest.raises(TypeError, match="gates must be a floating tensor"):
        gated_attention(q, k, v, gates.long())
    with pytest.raises(TypeError, match=r"config must be an omnimem\.GatedConfig"):
        gated_attention(q, k, v, gates, config=object())
    with pytest.raises(TypeError, match="unknown GatedConfig field"):
        gated_attention(q, k, v, gates, sink_tokens=3)
    with pytest.raises(ValueError, match=r"GatedConfig\.candidates must be one of"):
        GatedConfig(candidates="some")
    with pytest.raises(ValueError, match=r"GatedConfig\.top_k must be >= 1"):
        GatedConfig(top_k=0)
    with pytest.raises(TypeError, match=r"GatedConfig\.window_tokens must be an int"):
        GatedConfig(window_tokens=1.5)
    with pytest.raises(ValueError, match=r"GatedConfig\.scale must be positive and finite"):
        GatedConfig(scale=float("inf"))
    with pytest.raises(ValueError, match="pool_precision must be one of"):
        GatedConfig(pool_precision="bf16")
    bad = PooledKV(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16), 30)
    with pytest.raises(ValueError, match=r"pooled.k must have shape \[1, 2, >= 2, 16\]"):
        gated_attention(q, k, v, gates, pooled=bad)
    good = pool_kv(k, v, seq_len=40, block_size=30)
    with pytest.raises(TypeError, match=r"pooled.k_attn must be torch.bfloat16"):
        gated_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), gates, pooled=good)
    with pytest.raises(ValueError, match=r"seq_len must lie in \[0, 40\]"):
        pool_kv(k, v, seq_len=41, block_size=30)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        pool_kv(k, v, seq_len=40, block_size=0)
    with pytest.raises(ValueError, match="v must have k's shape"):
        pool_kv(k, v[:, :1], seq_len=40, block_size=30)
    with pytest.raises(TypeError, match=r"pooled must be an omnimem\.PooledKV"):
        gated_attention(q, k, v, gates, pooled=(k, v))
    if TEST_DEVICE.type == "cpu" and not torch.cuda.is_available():
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
                gated_attention(q, k, v, gates, backend="triton")


@pytest.mark.parametrize(
    "rules",
    [
        dict(block_size=6, query_group_size=5, top_k=2, window_tokens=30),
        dict(block_size=7, query_group_size=4, top_k=3, window_tokens=17, candidates="awe"),
    ],
)
def test_gather_path_gradients_pass_gradcheck_in_float64(rules):
    """The differentiable path (gather): exact float64 gradients in q, k, v and the gates,
    through all three branches (selection indices are constants)."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 30, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (
        torch.randn(1, 2, 90, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2)
    )
    gates = torch.rand(1, 2, 30, 3, generator=gen, dtype=torch.float64, requires_grad=True)

    def layer(q, k, v, gates):
        return gated_attention(q, k, v, gates, history_len=60, backend="gather", **rules)

    assert torch.autograd.gradcheck(layer, (q, k, v, gates))


@pytest.mark.parametrize(("groups", "num_slots", "end"), [(40, 300, 300), (40, 300, 170), (5, 90, 90)])
def test_first_pass_norms_cover_every_candidate_block_once(groups, num_slots, end, poisoned_allocations):
    """Pass 1's norm entries (the row tiles take turns over block tiles) have the largest
    squared norm of the candidate means as their maximum, per head: several row tiles and
    splits, a NaN mean ignored, a huge mean past the candidates' end ignored, and no entry
    left unwritten (allocations start as NaN)."""
    from omnimem.kernels.group_topk import bucket_maxima

    gen = torch.Generator().manual_seed(groups + num_slots + end)
    pq = torch.randn(2, 3, groups, 16, generator=gen).to(TEST_DEVICE)
    km = torch.randn(2, 3, num_slots, 16, generator=gen)
    km[0, 1, 37] *= 10.0  # one head's largest norm sits in a single block
    km[1, 2, 5] = float("nan")
    km[:, :, end:] = 1e3  # past the end: never a candidate
    km = km.to(TEST_DEVICE)
    # The error bound's precomputed inputs (PooledKV.k_bounds) take the same turns.
    bounds = torch.rand(2, 3, num_slots, 2, generator=gen)
    bounds[0, 2, 11, 1] = 50.0
    bounds[1, 0, 3] = float("nan")
    bounds[:, :, end:] = 1e6
    bounds = bounds.to(TEST_DEVICE)
    kwargs = dict(bucket=4, rows=16, block_n=16, precision="ieee", num_warps=4, per_sm=16)
    end_t = torch.tensor(end, device=TEST_DEVICE)
    _, norms, _, _ = bucket_maxima(pq, km, end_t, **kwargs)
    assert norms.shape[2] > 3  # several row tiles and splits wrote entries
    squares = km[:, :, :end].double().pow(2).sum(-1).nan_to_num(0.0)
    torch.testing.assert_close(norms[:, 0].double().amax(1), squares.amax(-1).flatten(), rtol=1e-6, atol=0)
    assert torch.equal(norms[:, 1], torch.zeros_like(norms[:, 1]))
    _, norms, _, _ = bucket_maxima(pq, km, end_t, bounds=bounds, **kwargs)
    want = bounds[:, :, :end].nan_to_num(0.0).amax(2).flatten(0, 1)
    assert torch.equal(norms.amax(2), want)


@pytest.mark.parametrize(
    ("num_slots", "top_k", "options"),
    [
        (200, 16, {}),
        (300, 2, {"error_bound": 10.0, "chunk_lanes": 32}),
        (90, 40, {"one_pass": True}),
        (200, 16, {"refine": "warp"}),
    ],
    ids=["two-pass", "every-bucket-kept", "one-pass", "warp-refine"],
)
def test_blocks_with_nan_means_are_no_candidates_in_kernels_and_torch(num_slots, top_k, options):
    """A corrupted block (NaN mean) is never selected, by the kernels (both passes, and the
    one-pass kernel) and the torch path alike, and the other blocks rank as before."""
    from omnimem.kernels.group_topk import group_topk

    gen = torch.Generator().manual_seed(num_slots)
    pq, km = exact_queries_and_keys(1, 2, 2, 4, 1, 16, num_slots, gen)
    corrupted = km.clone()
    corrupted[:, :, 7] = float("nan")
    end = torch.tensor(num_slots, device=TEST_DEVICE)
    want = select_groups_torch(pq, corrupted, end, top_k=top_k, scale=0.5)
    got = group_topk(pq, corrupted, end, top_k=top_k, scale=0.5, rows=16, block_n=16, **options)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert 7 not in want[0].flatten().tolist()
    # Everything else ranks as when block 7 simply scores lowest.
    demoted = km.clone()
    demoted[:, :, 7] = 0.0
    clean, _ = select_groups_torch(pq, demoted, end, top_k=top_k + 1, scale=0.5)
    assert torch.equal(
        want[0], torch.stack([row[row != 7][:top_k] for row in clean.flatten(0, 2)]).view_as(want[0])
    )


@pytest.mark.skipif(TEST_DEVICE.type != "cuda", reason="bfloat16 dots are wrong in Triton's CPU interpreter")
def test_bfloat16_first_pass_selects_as_torch():
    """Pass 1 on bfloat16 means (``approx_keys``): wherever the float64 scores separate the
    16th and 17th block by more than float32 rounding, the selection equals the torch path's,
    with pairs of blocks closer than bfloat16 can tell apart and NaN means among them."""
    from omnimem.kernels.group_topk import group_topk

    gen = torch.Generator(device=TEST_DEVICE).manual_seed(0)
    pq = torch.randn(1, 3, 60, 64, device=TEST_DEVICE, generator=gen)
    km = torch.randn(1, 3, 3000, 64, device=TEST_DEVICE, generator=gen)
    km[:, :, 1::2] = km[:, :, ::2] * (1 + 1e-3 * torch.rand(1, 3, 1500, 1, device=TEST_DEVICE, generator=gen))
    km[:, :, 5] = float("nan")
    end = torch.tensor(2950, device=TEST_DEVICE)
    want = select_groups_torch(pq, km, end, top_k=16, scale=0.125)
    approx = km.to(torch.bfloat16)
    bounds = key_bounds(km, approx)
    got = group_topk(pq, km, end, top_k=16, scale=0.125, approx_keys=approx, key_bounds=bounds)
    scores = torch.einsum("bhgd,bhjd->bhgj", pq.double(), km[:, :, :2950].double()).nan_to_num(-1e30)
    top = scores.topk(17, dim=-1).values
    clear = (top[..., 15] - top[..., 16]) > 1e-4
    assert clear.float().mean() > 0.9
    assert torch.equal(got[0][clear], want[0][clear]) and torch.equal(got[1], want[1])


def test_bfloat16_first_pass_needs_key_bounds_on_cuda():
    """``approx_keys`` must be CUDA bfloat16 of the means' shape, with their ``key_bounds``;
    the layer passes a pooled ``k_attn`` only with its bounds (``pool_kv``, the caches), on
    CUDA; bounds of the wrong shape or dtype are refused."""
    from omnimem.gated.attention import _approx_keys
    from omnimem.kernels.group_topk import two_pass_topk

    pq, km = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 40, 16)
    with pytest.raises(ValueError, match="refine must be 'block' or 'warp'"):
        two_pass_topk(pq, km, torch.tensor(40), top_k=4, scale=1.0, refine="fast")
    with pytest.raises(ValueError, match="approx_keys must be a CUDA bfloat16"):
        two_pass_topk(pq, km, torch.tensor(40), top_k=4, scale=1.0, approx_keys=km.to(torch.bfloat16))
    with pytest.raises(ValueError, match="key_bounds go with approx_keys"):
        two_pass_topk(pq, km, torch.tensor(40), top_k=4, scale=1.0, key_bounds=torch.zeros(1, 1, 40, 2))
    k = torch.randn(1, 2, 90, 16, dtype=torch.bfloat16)
    pooled = pool_kv(k, k, seq_len=90, block_size=30)
    assert pooled.k_attn_rounded and pooled.to("cpu").k_attn_rounded
    assert torch.equal(pooled.k_attn, pooled.k.to(torch.bfloat16))
    assert torch.equal(pooled.k_bounds, key_bounds(pooled.k, pooled.k_attn))
    assert pool_kv(k.float(), k.float(), seq_len=90, block_size=30).k_bounds is None  # no bfloat16 copy
    q = torch.randn(1, 2, 30, 16, dtype=torch.bfloat16)
    assert _approx_keys(pooled, q) is None  # CPU
    from omnimem import GatedCache

    cache = GatedCache(60, batch=1, num_kv_heads=2, head_dim=16, dtype=torch.bfloat16)
    assert cache.pooled.k_attn_rounded and cache.pooled.k_bounds.shape == (1, 2, 2, 2)
    hand_built = PooledKV(pooled.k, pooled.k_attn, pooled.v_attn, 30)
    assert not hand_built.k_attn_rounded and hand_built.k_bounds is None
    gates = torch.rand(1, 2, 30, 3).to(torch.bfloat16)
    bad = PooledKV(pooled.k, pooled.k_attn, pooled.v_attn, 30, k_attn_rounded="yes")
    with pytest.raises(TypeError, match=r"pooled\.k_attn_rounded must be a bool"):
        gated_attention(q, k, k, gates, history_len=60, pooled=bad, block_size=30)
    wrong = ((torch.zeros(1, 2, 3), ValueError), (torch.zeros(1, 2, 3, 2, dtype=torch.float64), TypeError))
    for bounds, error in wrong:
        bad = PooledKV(pooled.k, pooled.k_attn, pooled.v_attn, 30, k_bounds=bounds)
        with pytest.raises(error, match=r"pooled\.k_bounds must be"):
            gated_attention(q, k, k, gates, history_len=60, pooled=bad, block_size=30)
    if torch.cuda.is_available():
        assert _approx_keys(pooled.to("cuda"), q.cuda()) is not None
        assert _approx_keys(hand_built.to("cuda"), q.cuda()) is None


def _rounding_adversary(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pooled_q [1, 1, 1, 128], k_means [1, 1, 64, 128])`` where bfloat16 rounding moves two
    scores apart by 2 * 2**-8 of ``|q| |k|``, the most it can: block 8's exact score (64.4696) is
    the best, but every component of it and of the query's first half rounds down, while
    block 0 (exact 64.4654) rounds up on the second half. The other blocks score ~50."""
    low, high = 1 + 2**-8 - 2**-12, 1 + 2**-8 + 2**-12  # just under / over a rounding midpoint
    q = torch.cat([torch.full((64,), low), torch.full((64,), high)])
    km = torch.zeros(64, 128)
    km[:, :64] = 0.78
    km[8, :64] = low
    km[0] = 0.0
    km[0, 64:127] = high
    km[0, 127] = 0.9375
    return q.view(1, 1, 1, 128).to(device), km.view(1, 1, 64, 128).to(device)


def test_bfloat16_error_bound_covers_the_worst_rounding():
    """The first pass's error bound (``_score_error`` with key bounds, in float64 here) covers
    the largest error bfloat16 rounding can make, where the former constant (4.5e-3 per unit
    of ``|q| max|k|``, from a wrong 2**-9 per operand) did not: with it the adversary's best
    block would have been dropped before its exact score was seen."""
    from omnimem.kernels.group_topk import _SUMS_ERROR_BOUND

    q, km = (x.flatten(0, 2).double() for x in _rounding_adversary(torch.device("cpu")))
    q = q[0]
    q_r, k_r = q.float().bfloat16().double(), km.float().bfloat16().double()
    error = (k_r @ q_r - km @ q).abs()
    bounds = key_bounds(km.float(), km.float().bfloat16()).double()
    k_max, d_max = bounds.amax(0).sqrt()
    eps = q_r.norm() * d_max + ((q_r - q).norm() + _SUMS_ERROR_BOUND * q_r.norm()) * (k_max + d_max)
    assert (error <= eps).all()
    old_eps = 4.5e-3 * q.norm() * k_r.norm(dim=1).max()
    swing = (k_r @ q_r)[0] - (k_r @ q_r)[8]  # block 0 ahead by this much approximately ...
    assert (km @ q)[8] > (km @ q)[0] and swing > 2 * old_eps  # ... and behind exactly
    assert swing < 2 * eps


@pytest.mark.skipif(TEST_DEVICE.type != "cuda", reason="bfloat16 dots are wrong in Triton's CPU interpreter")
@pytest.mark.parametrize("refine", ["block", "warp"])
def test_bfloat16_first_pass_keeps_the_rounding_adversary(refine):
    """The kernel selects the adversary's exact best block (8), as the torch path does."""
    from omnimem.kernels.group_topk import two_pass_topk

    pq, km = _rounding_adversary(TEST_DEVICE)
    end = torch.tensor(64, device=TEST_DEVICE)
    want = select_groups_torch(pq, km, end, top_k=1, scale=1.0)
    assert want[0].item() == 8
    approx = km.to(torch.bfloat16)
    got = two_pass_topk(
        pq, km, end, top_k=1, scale=1.0, approx_keys=approx, key_bounds=key_bounds(km, approx), refine=refine
    )
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.skipif(TEST_DEVICE.type != "cuda", reason="the side stream exists on CUDA only")
def test_selection_beside_the_dense_branches_changes_nothing(monkeypatch):
    """On CUDA the triton backend selects on a side stream while the dense branches run: the
    same bits as selecting inline, eagerly and replayed from a CUDA graph."""
    from omnimem.gated import attention as gated_module

    shape = dict(q_heads=4, kv_heads=2, q_len=90, history_len=3000, head_dim=64)
    q, k, v = make_inputs(**shape, dtype=torch.bfloat16)
    gates = torch.rand(1, 4, 90, 3, device=TEST_DEVICE)
    rules = dict(history_len=3000, top_k=8, window_tokens=300, backend="triton")
    monkeypatch.setattr(gated_module, "OVERLAP_SELECTION", False)
    inline = gated_attention(q, k, v, gates, **rules)
    monkeypatch.setattr(gated_module, "OVERLAP_SELECTION", True)
    assert torch.equal(gated_attention(q, k, v, gates, **rules), inline)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on the capture's stream
        gated_attention(q, k, v, gates, **rules)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gated_attention(q, k, v, gates, **rules)
    graph.replay()
    assert torch.equal(out, inline)


@pytest.mark.skipif(not ON_HOPPER, reason="the Hopper Gluon kernel runs on compute capability 9.x only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape",
    [
        # q_heads, kv_heads, q_len, keys, head_dim, [B, L, H, D] storage
        (4, 2, 301, 5003, 64, True),  # GQA, partial query and key tiles
        (2, 2, 1, 4096, 128, False),  # one query, exactly the threshold
        (3, 3, 129, 7, 128, True),  # fewer keys than a tile (threshold lowered)
    ],
)
def test_dense_branches_on_the_hopper_kernel_match_float64(shape, dtype, monkeypatch, poisoned_allocations):
    """Inference over enough keys runs the compressed and window branches on the Hopper kernel
    (an empty block table, the keys as its chunk): no worse than SDPA against float64, never
    reading past the range (the buffer's unwritten tail is poisoned)."""
    from omnimem.backends import gated_branches
    from omnimem.backends.gated_branches import compressed_attention, window_attention

    hq, hkv, lq, keys, d, flash = shape
    if keys < gated_branches.HOPPER_MIN_KEYS:
        monkeypatch.setattr(gated_branches, "HOPPER_MIN_KEYS", 1)
    q, k, v = make_inputs(
        batch=2, q_heads=hq, kv_heads=hkv, q_len=lq, history_len=0, chunk_len=keys + 2, head_dim=d,
        unwritten=5, dtype=dtype, flash_layout=flash,
    )  # fmt: skip
    scale = d**-0.5
    seq = keys + 2

    def want(start: int, end: int) -> torch.Tensor:
        kk, vv = (x[:, :, start:end].double().repeat_interleave(hq // hkv, dim=1) for x in (k, v))
        return torch.nn.functional.scaled_dot_product_attention(q.double(), kk, vv, scale=scale)

    def branches():
        return (
            compressed_attention(q, k, v, keys, scale=scale),  # keys [0, keys)
            window_attention(q, k, v, seq, window_tokens=keys, scale=scale),  # keys [2, keys + 2)
        )

    assert gated_branches._hopper_runs(q, k[:, :, 2:seq], v[:, :, 2:seq])
    got = branches()
    monkeypatch.setattr(gated_branches, "HOPPER_DENSE", False)
    sdpa = branches()
    for out, peer, reference in zip(got, sdpa, (want(0, keys), want(2, seq)), strict=True):
        assert out.dtype == dtype and out.shape == q.shape
        err, peer_err = ((x.double() - reference).abs().max().item() for x in (out, peer))
        assert err <= 2 * peer_err + 1e-3, (err, peer_err)


@pytest.mark.skipif(not ON_HOPPER, reason="the Hopper Gluon kernel runs on compute capability 9.x only")
def test_gated_layer_with_hopper_dense_branches_matches_reference(monkeypatch):
    """The whole layer in bfloat16 with a window long enough for the Hopper kernel: within
    SDPA's error of the float64 reference, the same bits replayed from a CUDA graph, and
    differentiable calls keep SDPA (the kernel has no backward)."""
    from omnimem.backends import gated_branches

    hist, lq = 6000, 45
    shape = dict(q_heads=4, kv_heads=2, q_len=lq, history_len=hist, head_dim=64)
    q, k, v = make_inputs(**shape, dtype=torch.bfloat16, flash_layout=True)
    gates = torch.rand(1, 4, lq, 3, device=TEST_DEVICE)
    rules = dict(top_k=8, window_tokens=4200)
    ref = reference_gated_attention(q, k, v, gates, history_len=hist, **rules).out
    window = rules["window_tokens"]
    assert gated_branches._hopper_runs(q, k[:, :, :window], v[:, :, :window])
    out = gated_attention(q, k, v, gates, history_len=hist, backend="triton", **rules)
    monkeypatch.setattr(gated_branches, "HOPPER_DENSE", False)
    peer = gated_attention(q, k, v, gates, history_len=hist, backend="triton", **rules)
    monkeypatch.setattr(gated_branches, "HOPPER_DENSE", True)
    err, peer_err = ((x.double().cpu() - ref).abs().max().item() for x in (out, peer))
    assert err <= 2 * peer_err + 1e-3, (err, peer_err)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on the capture's stream
        gated_attention(q, k, v, gates, history_len=hist, backend="triton", **rules)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = gated_attention(q, k, v, gates, history_len=hist, backend="triton", **rules)
    graph.replay()
    assert torch.equal(replayed, out)

    q.requires_grad_(True)
    assert not gated_branches._hopper_runs(q, k, v)
    with torch.no_grad():
        assert gated_branches._hopper_runs(q, k, v)


@pytest.mark.parametrize(
    "live",
    [
        False,
        pytest.param(True, marks=pytest.mark.skipif(
            TEST_DEVICE.type != "cuda", reason="the live blocks' bf16 dots are wrong in Triton's interpreter"
        )),
    ],
)  # fmt: skip
@pytest.mark.parametrize("scale_up", [1.0, 300.0])
def test_fp8_blocks_multiplied_in_fp16_equal_the_reference(live, scale_up, monkeypatch, poisoned_allocations):
    """``FP8_HALF_PRODUCTS``: a bf16 call's fp8 store blocks multiplied in fp16 (queries times a
    power of two a row, probabilities in fp16, the value scale after the product) against the
    float64 selected branch over the dequantized store; groups without blocks, GQA, a partial
    last block, tables in any order, and queries far from 1 (``scale_up``: fp16 would overflow
    without the row's power of two). With ``live``, tables that also name the live blocks."""
    from omnimem.backends import selected_attention as kernel_module
    from omnimem.backends.gated_branches import selected_attention_gather
    from omnimem.backends.quantized_attention import dequantized_history
    from omnimem.store.blocks import QuantizedBlocks

    monkeypatch.setattr(kernel_module, "FP8_HALF_PRODUCTS", True)
    bs, live_first, seq, groups, group = 30, 12, 30 * 19 + 7, 5, 15
    gen = torch.Generator().manual_seed(7)
    q = (torch.randn(1, 4, groups * group, 64, generator=gen) * scale_up).to(TEST_DEVICE, torch.bfloat16)
    k, v = (torch.randn(1, 2, seq, 64, generator=gen).to(TEST_DEVICE, torch.bfloat16) for _ in range(2))
    store = QuantizedBlocks("fp8", batch=1, num_kv_heads=2, capacity=live_first * bs, head_dim=64,
                            block_size=bs, device=TEST_DEVICE)  # fmt: skip
    store.write(0, k[:, :, : live_first * bs], v[:, :, : live_first * bs])
    assert kernel_module.half_products(store, torch.bfloat16)
    pool = torch.arange(20 if live else live_first)
    table = torch.stack([pool[torch.randperm(len(pool), generator=gen)[:4]] for _ in range(2 * groups)])
    counts = torch.tensor([4, 0, 3, 1, 4, 2, 4, 4, 0, 1], dtype=torch.int32).view(1, 2, groups)
    table = table.view(1, 2, groups, 4).to(torch.int32)
    seq_len = torch.tensor(seq, device=TEST_DEVICE)
    args = dict(seq_len=seq_len, block_size=bs, query_group_size=group, scale=64**-0.5)
    got = kernel_module.selected_attention(
        q, k[:, :, live_first * bs :], v[:, :, live_first * bs :], block_idx=table.to(TEST_DEVICE),
        num_blocks=counts.to(TEST_DEVICE), store=store, live_first=live_first, **args,
    )  # fmt: skip
    kd, vd = dequantized_history(store, k[:, :, live_first * bs :], v[:, :, live_first * bs :],
                                 history_len=live_first * bs, dtype=torch.float64)  # fmt: skip
    named = torch.where(torch.arange(4) < counts[..., None], table, -1).to(TEST_DEVICE)
    want = selected_attention_gather(q.double(), kd, vd, block_idx=named, **args)
    # kv head 0's group 1 and kv head 1's group 3 name no block: 0 for their query heads
    assert (want[:, :2, group : 2 * group] == 0).all() and (want[:, 2:, 3 * group : 4 * group] == 0).all()
    assert got.isfinite().all()
    error = (got.double() - want).norm() / want.norm()
    # The output's bf16 rounding alone: 1.7e-3 to nearest (a GPU); Triton's interpreter rounds
    # toward zero, twice that. The fp16 operands are exact (dropping the value scale: 8e-2).
    assert error < 4e-3, error
