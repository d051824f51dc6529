"""patch_causal_wan on a stand-in for a Self-Forcing-family model and its unmodified loop."""

from __future__ import annotations

import copy

import pytest
import torch

from omnimem import GatedConfig, OmniMemCache, OmniMemConfig
from omnimem.causal_wan import patch_causal_wan, unpatch_causal_wan
from omnimem.gated.wan import wan_rope_freqs

from .causal_wan_standin import StandinModel, StandinPipeline

GRID = torch.tensor([[2, 3, 4]])  # chunks of 2 frames of 3 x 4 tokens
FRAME, CHUNK, DIM, HEADS = 12, 24, 32, 2
FREQS = wan_rope_freqs(DIM // HEADS)
# Everything attended: 4-token blocks, a budget larger than any history here.
FULL = OmniMemConfig(block_size=4, top_k=64, sink_tokens=0, local_tokens=0, backend="dense")


def chunks(count: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, CHUNK, DIM, generator=gen) for _ in range(count)]


def model(window: int = 32760) -> StandinModel:
    torch.manual_seed(0)
    return StandinModel(num_layers=2, dim=DIM, num_heads=HEADS, window=window)


def test_full_budget_equals_their_cache_over_an_unmodified_loop():
    theirs = model()
    ours = copy.deepcopy(theirs)
    patched = patch_causal_wan(ours, FULL, max_frames=12)
    assert len(patched) == 2
    inputs = chunks(5)
    want = StandinPipeline(theirs, buffer_tokens=5 * CHUNK).inference(inputs, GRID, FREQS)
    pipeline = StandinPipeline(ours, buffer_tokens=5 * CHUNK)
    got = pipeline.inference(inputs, GRID, FREQS)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5)
    cache = pipeline.kv_cache1[0]["omnimem"]
    assert isinstance(cache, OmniMemCache)
    assert (cache.history_len, cache.chunk_len) == (4 * CHUNK, CHUNK)  # the last chunk is current
    assert pipeline.kv_cache1[0]["k"].numel() == 0  # their window buffer was released
    # The loop resets its caches by item assignment for the next video: same results again.
    again = pipeline.inference(inputs, GRID, FREQS)
    for g, w in zip(again, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5)


def test_a_budget_runs_past_their_window_and_differs_from_truncation():
    """Their model attends only its last `window` tokens; with a budget omnimem keeps the whole
    history (here 3x the window) and retrieves from all of it."""
    window = 2 * CHUNK
    truncated = model(window=window)
    ours = copy.deepcopy(truncated)
    patch_causal_wan(ours, FULL.replace(top_k=2), max_frames=14, sink_frames=1, local_frames=2)
    inputs = chunks(7, seed=1)
    pipeline = StandinPipeline(ours, buffer_tokens=window)
    got = pipeline.inference(inputs, GRID, FREQS)
    cache = pipeline.kv_cache1[1]["omnimem"]
    assert cache.history_len == 6 * CHUNK > window
    assert (cache.config.sink_tokens, cache.config.local_tokens) == (FRAME, 2 * FRAME)
    want = StandinPipeline(truncated, buffer_tokens=7 * CHUNK).inference(inputs, GRID, FREQS)
    torch.testing.assert_close(got[1], want[1], atol=2e-5, rtol=2e-5)  # history fits everything
    assert all(torch.isfinite(g).all() for g in got)
    assert not torch.allclose(got[-1], want[-1], atol=1e-3)  # not the truncated answer


def test_unpatch_restores_their_forward_and_training_path_is_untouched():
    theirs = model()
    ours = copy.deepcopy(theirs)
    patch_causal_wan(ours, FULL, max_frames=4)
    x = chunks(1)[0]
    # Without a kv_cache (training / teacher forcing) the original forward runs.
    torch.testing.assert_close(ours(x, GRID, FREQS), theirs(x, GRID, FREQS), atol=0, rtol=0)
    assert unpatch_causal_wan(ours) == 2
    inputs = chunks(2)
    want = StandinPipeline(theirs, buffer_tokens=2 * CHUNK).inference(inputs, GRID, FREQS)
    got = StandinPipeline(ours, buffer_tokens=2 * CHUNK).inference(inputs, GRID, FREQS)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_misuse_is_refused_clearly():
    with pytest.raises(ValueError, match="found no CausalWanSelfAttention-like module"):
        patch_causal_wan(torch.nn.Linear(2, 2), max_frames=4)
    ours = model()
    with pytest.raises(ValueError, match="max_frames must be an int >= 1"):
        patch_causal_wan(ours, max_frames=0)
    with pytest.raises(TypeError, match="config must be an OmniMemConfig"):
        patch_causal_wan(ours, config={"top_k": 4}, max_frames=4)
    with pytest.raises(TypeError, match="unknown setting 'topk': neither an OmniMemConfig field"):
        patch_causal_wan(ours, max_frames=4, topk=4)
    with pytest.raises(TypeError, match="'window_tokens' is a GatedConfig field, which no layer"):
        patch_causal_wan(ours, max_frames=4, window_tokens=4)  # Self-Forcing's layers only
    with pytest.raises(TypeError, match="config is a GatedConfig, for the authors' gated layers"):
        patch_causal_wan(ours, GatedConfig(), max_frames=4)
    with pytest.raises(TypeError, match="offload must be a bool"):
        patch_causal_wan(ours, max_frames=4, offload="yes")
    patch_causal_wan(ours, FULL, max_frames=4)
    with pytest.raises(ValueError, match="already patched"):
        patch_causal_wan(ours, FULL, max_frames=4)
    pipeline = StandinPipeline(ours, buffer_tokens=4 * CHUNK)
    pipeline.inference(chunks(1), GRID, FREQS)
    x = chunks(1)[0]
    with pytest.raises(ValueError, match=r"start must be 0 \(rewrite the current chunk\) or 24"):
        ours(x, GRID, FREQS, pipeline.kv_cache1, current_start=2 * CHUNK)  # a skipped chunk
    with pytest.raises(ValueError, match="past the cache capacity of 48"):
        pipeline.inference(chunks(4), GRID, FREQS)  # 3 chunks of history > max_frames=4


def test_cache_dicts_created_mid_video_are_refused_before_anything_changes():
    """Krea Realtime's server re-creates the cache dicts every block and re-encodes a window of
    recent frames at positions relative to it (a call at a non-zero ``current_start`` on a fresh
    dict): refused with a message that says what to do, their buffers untouched."""
    ours = model()
    patch_causal_wan(ours, FULL, max_frames=8)
    pipeline = StandinPipeline(ours, buffer_tokens=4 * CHUNK)
    pipeline.inference(chunks(2), GRID, FREQS)
    pipeline._initialize_kv_cache(1, torch.float32)  # fresh dicts, as their recompute makes
    with pytest.raises(ValueError, match=r"holds no omnimem history yet.*Krea Realtime's recompute_kv_cache"):
        ours(chunks(1)[0], GRID, FREQS, pipeline.kv_cache1, current_start=CHUNK)
    for layer in pipeline.kv_cache1:
        assert "omnimem" not in layer and layer["k"].numel() == 4 * CHUNK * DIM
    ours(chunks(1)[0], GRID, FREQS, pipeline.kv_cache1, current_start=0)  # a new video from token 0 runs


def test_arguments_beyond_the_self_forcing_call_are_refused():
    """Arguments the patch does not know (beyond Self-Forcing's call, LongLive-2.0's RoPE
    options, Rolling Forcing's ``updating_cache``) change what attention computes: the call is
    refused, naming them, and nothing is written."""
    ours = model()
    patch_causal_wan(ours, FULL, max_frames=8)
    pipeline = StandinPipeline(ours, buffer_tokens=4 * CHUNK)
    pipeline.inference(chunks(1), GRID, FREQS)
    attn = ours.blocks[0].self_attn
    x = chunks(1)[0]
    with pytest.raises(TypeError, match="calls self-attention with rope_scaling, window, which"):
        attn(x, None, GRID, FREQS, None, pipeline.kv_cache1[0], CHUNK, t_scale=1.0, rope_scaling=2, window=3)
    assert pipeline.kv_cache1[0]["omnimem"].history_len == 0  # nothing was written


class StandinNSAttention(torch.nn.Module):
    """The authors' three-branch layer as their constructor and weights describe it (settings
    kept as attributes of those names, Wan's projections and norms, the gate projection)."""

    def __init__(
        self, dim, num_heads, pool_f=1, pool_h=3, pool_w=2, num_selected_blocks=2, group_q_size=4,
        exclude_window_chunks=0, exclude_sink_chunks=0, progressive_exclude=False, num_kv_head_groups=None,
    ):  # fmt: skip
        super().__init__()
        self.exclude_window_chunks, self.exclude_sink_chunks = exclude_window_chunks, exclude_sink_chunks
        self.progressive_exclude, self.num_kv_head_groups = progressive_exclude, num_kv_head_groups
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.window_size, self.qk_norm, self.eps = (-1, -1), True, 1e-6
        self.pool_f, self.pool_h, self.pool_w = pool_f, pool_h, pool_w
        self.num_selected_blocks, self.group_q_size, self.gate_mode = (
            num_selected_blocks,
            group_q_size,
            "sigmoid",
        )
        self.layer_idx, self.chunk_length, self.skip_module = 0, CHUNK, None
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = torch.nn.RMSNorm(dim, eps=1e-6), torch.nn.RMSNorm(dim, eps=1e-6)
        self.g_proj = torch.nn.Linear(dim, 3 * num_heads)

    def forward(self, *args, **kwargs):
        raise AssertionError("the patched model must not call the authors' forward")


def test_the_authors_three_branch_layers_are_replaced_sharing_their_weights():
    from omnimem import GatedWanSelfAttention

    torch.manual_seed(1)
    model = torch.nn.Sequential(StandinNSAttention(DIM, HEADS), StandinNSAttention(DIM, HEADS))
    theirs = list(model)
    patched = patch_causal_wan(model, max_frames=8)
    assert all(isinstance(m, GatedWanSelfAttention) for m in model) and patched == list(model)
    assert model[0].q is theirs[0].q and model[1].g_proj is theirs[1].g_proj  # shared, not copied
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in theirs[0].parameters()) * 2
    reference = GatedWanSelfAttention(
        dim=DIM, num_heads=HEADS, pool_f=1, pool_h=3, pool_w=2, num_selected_blocks=2, group_q_size=4,
        chunk_length=CHUNK,
    )  # fmt: skip
    reference.load_state_dict(theirs[0].state_dict())
    for start_frame in (0, 2, 4):  # chunk after chunk through each module's own cache
        x = chunks(1, seed=start_frame)[0]
        want = reference(x, None, GRID, FREQS, start_frame)
        torch.testing.assert_close(model[0](x, None, GRID, FREQS, start_frame), want, atol=1e-6, rtol=1e-6)
    assert unpatch_causal_wan(model) == 2 and list(model) == theirs


def test_a_three_branch_layer_whose_weights_do_not_fit_is_refused():
    layer = StandinNSAttention(DIM, HEADS)
    layer.g_proj = torch.nn.Linear(DIM, 2 * HEADS)  # two gates: not the authors' three branches
    with pytest.raises(ValueError, match="weights do not fit GatedWanSelfAttention"):
        patch_causal_wan(torch.nn.Sequential(layer), max_frames=8)


def test_a_grid_that_does_not_divide_into_blocks_is_a_clear_error():
    from omnimem import GatedWanSelfAttention

    layer = GatedWanSelfAttention(dim=DIM, num_heads=HEADS, pool_h=2, pool_w=3, chunk_length=CHUNK)
    with pytest.raises(ValueError, match=r"grid_sizes 2x3x4 must divide into the pooled blocks 1x2x3"):
        layer(chunks(1)[0], None, GRID, FREQS, 0)


def _nsa_model(**settings) -> torch.nn.Sequential:
    torch.manual_seed(3)
    return torch.nn.Sequential(
        StandinNSAttention(DIM, HEADS, **settings), StandinNSAttention(DIM, HEADS, **settings)
    )


def test_the_patch_settings_reach_the_authors_layers():
    """Their exclusion settings are read from their layers; ``max_frames`` sizes each cache once,
    ``offload`` reaches them, overrides are GatedConfig fields over their settings."""
    exclusion = dict(exclude_window_chunks=2, exclude_sink_chunks=1, progressive_exclude=True)
    model = _nsa_model(**exclusion)
    patched = patch_causal_wan(model, GatedConfig(backend="gather"), max_frames=10, top_k=3)
    config = patched[0].config
    assert (config.exclude_window_chunks, config.exclude_sink_chunks, config.progressive_exclude) == (
        2,
        1,
        True,
    )
    assert (config.candidates, config.top_k, config.backend, config.block_size) == ("chunks", 3, "gather", 6)
    for start_frame in (0, 2, 4, 6, 8):  # chunk 3 on: the sink chunk and 2 window chunks excluded
        patched[0](chunks(1, seed=start_frame)[0], None, GRID, FREQS, start_frame)
    cache = patched[0]._cache
    assert cache.capacity == 10 * FRAME and cache.end == 10 * FRAME  # sized once, to max_frames
    with pytest.raises(ValueError, match=r"past the layer's max_frames=10 latent frames"):
        patched[0](chunks(1)[0], None, GRID, FREQS, 10)  # frames 10-11: past max_frames
    assert patched[0]._cache is cache and cache.end == 10 * FRAME  # refused before any write

    # offload=True: GatedCache(offload=True), the same outputs as resident, bit for bit
    resident, offloaded = _nsa_model(**exclusion), _nsa_model(**exclusion)
    patch_causal_wan(resident, GatedConfig(backend="gather"), max_frames=10)
    patch_causal_wan(offloaded, GatedConfig(backend="gather"), max_frames=10, offload=True)
    for start_frame in (0, 2, 4, 6, 8):
        x = chunks(1, seed=start_frame)[0]
        for _ in range(2):  # a denoising pass, then the commit pass
            want = resident[0](x, None, GRID, FREQS, start_frame)
            torch.testing.assert_close(offloaded[0](x, None, GRID, FREQS, start_frame), want, atol=0, rtol=0)
    assert offloaded[0]._cache.offloaded and not resident[0]._cache.offloaded


def test_the_patch_refuses_what_the_authors_layers_cannot_take():
    with pytest.raises(TypeError, match="'sink_tokens' is an OmniMemConfig field, which no layer"):
        patch_causal_wan(_nsa_model(), max_frames=8, sink_tokens=12)
    with pytest.raises(TypeError, match="config is an OmniMemConfig, for Self-Forcing's layers"):
        patch_causal_wan(_nsa_model(), FULL, max_frames=8)
    with pytest.raises(TypeError, match="sink_frames and local_frames set Self-Forcing's layers"):
        patch_causal_wan(_nsa_model(), max_frames=8, sink_frames=1)
    with pytest.raises(ValueError, match=r"GatedConfig.top_k must be >= 1"):
        patch_causal_wan(_nsa_model(), max_frames=8, top_k=0)
    with pytest.raises(ValueError, match="num_kv_head_groups=1 pools 2 heads"):
        patch_causal_wan(_nsa_model(num_kv_head_groups=1), max_frames=8)
    model = _nsa_model()
    theirs = list(model)
    with pytest.raises(TypeError):
        patch_causal_wan(model, max_frames=8, unknown=1)
    assert list(model) == theirs  # nothing was replaced


def test_a_history_the_device_cannot_hold_is_refused_before_any_allocation(monkeypatch):
    """The first layer's first call checks every patched layer's cache against the GPU's free
    memory (here a CUDA device that reports 1 MiB free), naming offload=True."""
    from omnimem.causal_wan import _first_allocation_check

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2**20, 2**30))
    sizes = dict(
        capacity=240 * 1560, batch=1, num_kv_heads=12, head_dim=128, dtype=torch.bfloat16,
        config=GatedConfig(), device="cuda:0", max_chunk_tokens=None,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"30 patched layers at max_frames=240 .* offload=True"):
        _first_allocation_check(30, 240, offload=False)(sizes, 1560)
    with pytest.raises(ValueError, match="lower max_frames"):  # even the live regions do not fit
        offloaded = {**sizes, "capacity": 24 * 1560, "max_chunk_tokens": 4680}
        _first_allocation_check(2, 24, offload=True)(offloaded, 1560)
    model = _nsa_model()
    patched = patch_causal_wan(model, max_frames=8)
    calls = []
    patched[0].before_allocation = lambda layer, sizes: calls.append(sizes["capacity"])
    patched[0](chunks(1)[0], None, GRID, FREQS, 0)
    assert calls == [8 * FRAME]  # asked once, with the whole video's size, before allocating


def test_kv_format_reaches_the_authors_layers():
    """patch_causal_wan(kv_format="int4"): each gated layer's cache keeps its history quantized
    (no native history buffer), and the model runs past its window; Self-Forcing's layers
    refuse a quantized format for now."""
    native, quantized = _nsa_model(), _nsa_model()
    patch_causal_wan(native, GatedConfig(backend="gather"), max_frames=12)
    patched = patch_causal_wan(quantized, GatedConfig(backend="gather"), max_frames=12, kv_format="int4")
    with torch.no_grad():
        for start_frame in (0, 2, 4, 6, 8, 10):
            x = chunks(1, seed=start_frame)[0]
            want = native[0](x, None, GRID, FREQS, start_frame)
            got = quantized[0](x, None, GRID, FREQS, start_frame)
    cache = patched[0]._cache
    assert cache.kv_format == "int4" and cache.k.untyped_storage().nbytes() <= 4
    assert 0 < float((got - want).norm() / want.norm()) < 0.2  # read quantized, close to native
    with pytest.raises(ValueError, match="kv_format must be one of"):
        patch_causal_wan(_nsa_model(), max_frames=4, kv_format="int2")
    offloaded = patch_causal_wan(
        _nsa_model(), GatedConfig(backend="gather"), max_frames=12, kv_format="int4", offload=True
    )
    with torch.no_grad():
        for start_frame in (0, 2, 4, 6, 8, 10):  # the same layer, its quantized history in host memory
            got_offloaded = offloaded[0](chunks(1, seed=start_frame)[0], None, GRID, FREQS, start_frame)
    assert offloaded[0]._cache.offloaded and offloaded[0]._cache.kv_format == "int4"
    torch.testing.assert_close(got_offloaded, got, atol=1e-5, rtol=1e-5)


def test_kv_format_reaches_self_forcing_layers():
    """patch_causal_wan(kv_format="fp8") on Self-Forcing's layers: quantized OmniMemCaches (no
    native history buffer) over their unmodified loop, close to the native patched model."""
    native, quantized = model(), model()
    patch_causal_wan(native, FULL, max_frames=12)
    patch_causal_wan(quantized, FULL, max_frames=12, kv_format="fp8")
    want = StandinPipeline(native, buffer_tokens=5 * CHUNK).inference(chunks(5), GRID, FREQS)
    pipeline = StandinPipeline(quantized, buffer_tokens=5 * CHUNK)
    got = pipeline.inference(chunks(5), GRID, FREQS)
    cache = pipeline.kv_cache1[0]["omnimem"]
    assert cache.kv_format == "fp8" and cache.k.untyped_storage().nbytes() <= 4
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)  # no history yet: exact
    errors = [float((g - w).norm() / w.norm()) for g, w in zip(got[1:], want[1:], strict=True)]
    assert all(0 < e < 0.05 for e in errors), errors  # read quantized, close to native


def test_causvid_is_served_in_one_call():
    """CausVid (tianweiy/CausVid: no sink, ``current_end`` after ``current_start``, dense over
    the whole cache): patched at full budget it equals its own attention over its unmodified
    loop, a second video starts over, and a ``current_end`` other than the chunk's end is
    refused before anything is written."""
    from .causal_wan_standin import StandinCausVidModel, StandinCausVidPipeline

    torch.manual_seed(0)
    theirs = StandinCausVidModel(num_layers=2, dim=DIM, num_heads=HEADS)
    ours = copy.deepcopy(theirs)
    assert len(patch_causal_wan(ours, FULL, max_frames=12)) == 2
    inputs = chunks(4)
    want = StandinCausVidPipeline(theirs, buffer_tokens=4 * CHUNK).inference(inputs, GRID, FREQS)
    pipeline = StandinCausVidPipeline(ours, buffer_tokens=4 * CHUNK)
    for _ in range(2):  # the second video resets the patched caches at current_start=0
        got = pipeline.inference(inputs, GRID, FREQS)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    attn = ours.blocks[0].self_attn
    cache = pipeline.kv_cache1[0]["omnimem"]
    before = cache.history_len, cache.chunk_len
    with pytest.raises(ValueError, match=r"current_end=30 but the chunk of 24 tokens at current_start=0"):
        attn(chunks(1)[0], None, GRID, FREQS, None, pipeline.kv_cache1[0], 0, 30)
    assert (cache.history_len, cache.chunk_len) == before
    assert unpatch_causal_wan(ours) == 2


def test_past_the_rope_table_the_patched_model_runs_on_with_wan_positions():
    """Self-Forcing's models hold a RoPE table of 1,024 latent frames; patched, the model runs
    1,100 frames (their own dies at 1,024): positions past the table come from Wan's formula
    (absolute positions keep growing). At full budget it equals their attention with the table
    extended by the same formula (the same as theirs wherever their table reaches). A table
    that is not Wan's is not extended: a ValueError names the limit before anything is written."""
    from omnimem.gated.wan import wan_rope_freqs

    everything = OmniMemConfig(block_size=128, top_k=128, sink_tokens=0, local_tokens=0, backend="dense")
    theirs = model()
    ours = copy.deepcopy(theirs)
    patch_causal_wan(ours, everything, max_frames=1100)
    inputs = [x * 0.1 for x in chunks(550, seed=7)]  # 1,100 frames of 12 tokens
    long_table = wan_rope_freqs(DIM // HEADS, positions=2048)  # theirs, extended by their formula
    want = StandinPipeline(theirs, buffer_tokens=1100 * FRAME).inference(inputs, GRID, long_table, passes=1)
    got = StandinPipeline(ours, buffer_tokens=1100 * FRAME).inference(inputs, GRID, FREQS, passes=1)
    assert FREQS.shape[0] == 1024  # what the model hands its layers
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)

    turn = torch.tensor(0.1, dtype=torch.float64)
    foreign = FREQS * torch.polar(torch.ones_like(turn), turn)  # another table
    fresh = copy.deepcopy(theirs)
    patch_causal_wan(fresh, everything, max_frames=1100)
    pipeline = StandinPipeline(fresh, buffer_tokens=1100 * FRAME)
    pipeline.inference(inputs[:2], GRID, foreign, passes=1)  # inside the table: runs
    attn, layer = fresh.blocks[0].self_attn, pipeline.kv_cache1[0]
    with pytest.raises(ValueError, match=r"past the model's RoPE table of 1024 frames.*max_frames <= 1024"):
        attn(inputs[0], None, GRID, foreign, None, layer, 1024 * FRAME)
    assert layer["omnimem"].history_len + layer["omnimem"].chunk_len == 4 * FRAME  # nothing written
