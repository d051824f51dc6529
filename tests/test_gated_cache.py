"""GatedCache: a rollout through the cache equals stateless ``gated_attention`` calls on the
same keys/values; position checks; validation before any write."""

from __future__ import annotations

import os

import pytest
import torch

from omnimem import GatedCache, gated_attention

from .inputs import TEST_DEVICE

RULES = dict(block_size=7, query_group_size=5, top_k=3, window_tokens=25)


@pytest.mark.parametrize("layout", ["blhd", "bhld"])
@pytest.mark.parametrize("backend", ["gather", "triton"])
def test_rollout_equals_stateless_calls(layout, backend):
    """Chunks of 12 tokens (not a multiple of the 7-token blocks: blocks straddle chunks), two
    denoising passes and a commit pass each, every pass with other keys/values."""
    gen = torch.Generator().manual_seed(0)
    cache = GatedCache(60, batch=2, num_kv_heads=2, head_dim=16, layout=layout, device=TEST_DEVICE,
                       backend=backend, **RULES)  # fmt: skip
    final_k = torch.zeros(2, 2, 60, 16, device=TEST_DEVICE)
    final_v = torch.zeros_like(final_k)
    for start in range(0, 36, 12):
        for _ in range(3):  # two denoising passes, then the commit pass: all at the same start
            q, k, v = (torch.randn(2, 2, 12, 16, generator=gen).to(TEST_DEVICE) for _ in range(3))
            gates = torch.rand(2, 2, 12, 3, generator=gen).to(TEST_DEVICE)
            got = cache.attend(q, k, v, gates, start=start)
            final_k[:, :, start : start + 12], final_v[:, :, start : start + 12] = k, v
            want = gated_attention(q, final_k, final_v, gates, history_len=start, backend=backend, **RULES)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert cache.end == 36 and "end=36" in repr(cache)


def test_positions_are_checked_before_anything_is_written():
    cache = GatedCache(40, batch=1, num_kv_heads=1, head_dim=8, **RULES)
    q = k = v = torch.randn(1, 1, 10, 8)
    gates = torch.rand(1, 1, 10, 3)
    cache.attend(q, k, v, gates, start=0)
    with pytest.raises(ValueError, match=r"start must be 10 .* or 0"):
        cache.attend(q, k, v, gates, start=5)  # a gap or an overlap: refused
    with pytest.raises(TypeError, match="start must be a Python int"):
        cache.attend(q, k, v, gates, start=torch.tensor(10))
    before = (cache.k.clone(), cache.pooled.k.clone(), cache.end)
    with pytest.raises(ValueError, match="gates must have shape"):
        cache.attend(q, k + 1, v, gates[..., :2], start=10)
    with pytest.raises(TypeError, match=r"must have q's dtype"):
        cache.attend(q.double(), k + 1, v, gates, start=10)
    with pytest.raises(ValueError, match=r"does not fit the cache's capacity 40"):
        cache.attend(torch.randn(1, 1, 31, 8), torch.randn(1, 1, 31, 8), torch.randn(1, 1, 31, 8),
                     torch.rand(1, 1, 31, 3), start=10)  # fmt: skip
    assert (
        torch.equal(cache.k, before[0]) and torch.equal(cache.pooled.k, before[1]) and cache.end == before[2]
    )
    with pytest.raises(ValueError, match=r"end must lie in \[0, 10\]"):
        cache.rewind(11)
    cache.rewind(4)  # forget [4, 10): the next write starts at 4, not at the old chunk's 0
    with pytest.raises(ValueError, match=r"start must be 4 .* or 4"):
        cache.attend(q, k, v, gates, start=0)
    cache.attend(q, k, v, gates, start=4)
    assert cache.end == 14
    cache.reset()
    assert cache.end == 0
    cache.attend(q, k, v, gates, start=0)


def test_constructor_validation():
    with pytest.raises(TypeError, match="GatedCache capacity must be an int"):
        GatedCache(1.5, batch=1, num_kv_heads=1, head_dim=8)
    with pytest.raises(ValueError, match="GatedCache head_dim must be positive"):
        GatedCache(10, batch=1, num_kv_heads=1, head_dim=0)
    with pytest.raises(TypeError, match="GatedCache dtype must be a floating"):
        GatedCache(10, batch=1, num_kv_heads=1, head_dim=8, dtype=torch.int32)
    with pytest.raises(ValueError, match="layout must be"):
        GatedCache(10, batch=1, num_kv_heads=1, head_dim=8, layout="bld")
    with pytest.raises(TypeError, match="unknown GatedConfig field"):
        GatedCache(10, batch=1, num_kv_heads=1, head_dim=8, sink_tokens=4)


@pytest.mark.parametrize(
    "backend, dtype, tol", [("gather", torch.float64, 1e-12), ("triton", torch.float32, 1e-4)]
)
def test_gradients_flow_through_the_current_chunk_of_a_gated_cache(backend, dtype, tol):
    """Training through the cache: each pass backpropagates, and the chunk's gradients (through
    all three branches, the block means included) are the stateless gather layer's (the triton
    kernels' backward in float32)."""
    if backend == "triton" and TEST_DEVICE.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton kernels run on CUDA or under TRITON_INTERPRET=1")
    rules = dict(block_size=6, query_group_size=5, top_k=2, window_tokens=30)
    cache = GatedCache(120, batch=1, num_kv_heads=2, head_dim=16, dtype=dtype, device=TEST_DEVICE,
                       backend=backend, **rules)  # fmt: skip
    gen = torch.Generator().manual_seed(0)

    def inputs():
        tensors = [torch.randn(1, 2, 30, 16, generator=gen, dtype=dtype) for _ in range(3)]
        return [x.to(TEST_DEVICE) for x in (*tensors, torch.rand(1, 2, 30, 3, generator=gen, dtype=dtype))]

    for start in (0, 0, 30, 30, 60):  # passes rewrite a chunk; each backpropagates on its own
        ours = [x.clone().requires_grad_() for x in inputs()]
        cache.attend(*ours, start=start).square().sum().backward()
        theirs = [x.detach().clone().requires_grad_() for x in ours]
        q, k, v, gates = theirs
        keys, values = torch.cat([cache.k[:, :, :start], k], 2), torch.cat([cache.v[:, :, :start], v], 2)
        out = gated_attention(q, keys, values, gates, history_len=start, backend="gather", **rules)
        out.square().sum().backward()
        for mine, reference in zip(ours, theirs, strict=True):
            assert mine.grad is not None and mine.grad.abs().sum() > 0
            torch.testing.assert_close(mine.grad, reference.grad, atol=tol, rtol=tol)
        assert not cache.k.requires_grad and not cache.pooled.k.requires_grad


@pytest.mark.parametrize("backend", ["gather", "triton"])
@pytest.mark.parametrize(
    "rules",
    [
        dict(block_size=6, query_group_size=4, top_k=2, window_tokens=20, candidates="awe"),
        dict(block_size=7, query_group_size=15, top_k=3, window_tokens=200),
        dict(block_size=30, query_group_size=15, top_k=16, window_tokens=45),
    ],
)
def test_training_runs_on_compact_keys_and_equals_the_stateless_layer(backend, rules, monkeypatch):
    """Gradients through the cache over a long history (window shorter or longer than it, GQA,
    groups that do not divide the chunk, partial blocks, both candidate rules, blhd storage): the
    layer runs on the selected history blocks plus the live region, and output and gradients
    equal the stateless layer's over the whole history."""
    if backend == "triton" and TEST_DEVICE.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton kernels run on CUDA or under TRITON_INTERPRET=1")
    import omnimem.gated.cache

    cache = GatedCache(
        200, batch=1, num_kv_heads=1, head_dim=16, device=TEST_DEVICE, backend=backend, **rules
    )
    gen = torch.Generator().manual_seed(0)
    for start in range(0, 150, 25):
        with torch.no_grad():
            q, k, v = (
                torch.randn(1, 2 if x == "q" else 1, 25, 16, generator=gen).to(TEST_DEVICE) for x in "qkv"
            )
            cache.attend(q, k, v, torch.rand(1, 2, 25, 3, generator=gen).to(TEST_DEVICE), start=start)
    lengths, original = [], omnimem.gated.cache.run_branches

    def recording(q, k, *args, **kw):
        compact = kw.get("compact")  # triton training: k is the chunk, the keys come apart
        lengths.append((k if compact is None else compact[0]).shape[2])
        return original(q, k, *args, **kw)

    monkeypatch.setattr(omnimem.gated.cache, "run_branches", recording)
    ours = [torch.randn(1, h, 23, 16, generator=gen).to(TEST_DEVICE).requires_grad_() for h in (2, 1, 1)]
    ours.append(torch.rand(1, 2, 23, 3, generator=gen).to(TEST_DEVICE).requires_grad_())
    out = cache.attend(*ours, start=150)
    # Never longer than the whole sequence; shorter when the groups select fewer blocks than
    # lie before the window (the first rules: 6 groups x top 2 of 25 blocks).
    assert len(lengths) == 1 and lengths[0] <= 173
    assert lengths[0] < 173 or rules["top_k"] > 2
    theirs = [x.detach().clone().requires_grad_() for x in ours]
    keys = torch.cat([cache.k[:, :, :150], theirs[1]], 2)
    values = torch.cat([cache.v[:, :, :150], theirs[2]], 2)
    want = gated_attention(theirs[0], keys, values, theirs[3], history_len=150, backend="gather", **rules)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    d_out = torch.randn(out.shape, generator=gen).to(TEST_DEVICE)
    (out * d_out).sum().backward()
    (want * d_out).sum().backward()
    for mine, reference in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine.grad, reference.grad, atol=1e-5, rtol=1e-4)


OFFLOAD_RULES = [
    dict(block_size=7, query_group_size=5, top_k=3, window_tokens=25),  # window over 2 chunks
    dict(block_size=4, query_group_size=3, top_k=2, window_tokens=6, candidates="awe"),  # window < chunk
]


@pytest.mark.parametrize(
    ("layout", "backend", "rules", "on_disk"),
    [
        ("blhd", "gather", OFFLOAD_RULES[0], False),
        ("bhld", "triton", OFFLOAD_RULES[0], False),
        ("bhld", "gather", OFFLOAD_RULES[1], False),
        ("blhd", "gather", OFFLOAD_RULES[1], True),
    ],
    ids=["wide-window-gather", "wide-window-triton", "narrow-window-awe-gather", "narrow-window-disk-gather"],
)
def test_offloaded_cache_equals_the_resident_one(layout, backend, rules, on_disk, monkeypatch, tmp_path):
    """The same rollout through an offloaded and a resident cache: the same bits, with
    denoising rewrites, chunks of varying length (blocks straddle chunks), GQA, a rewind into
    the previous chunk, one past the device's live region, and a reset; the history on disk
    too. Every buffer made
    with ``torch.empty`` starts as NaN (the staging's unused slots among them): none leaks."""
    original = torch.empty

    def poisoned(*args, **kwargs):
        buffer = original(*args, **kwargs)
        return buffer.fill_(float("nan") if buffer.is_floating_point() else -123456789)

    monkeypatch.setattr(torch, "empty", poisoned)
    gen = torch.Generator().manual_seed(1)
    shape = dict(batch=2, num_kv_heads=2, head_dim=16, layout=layout, device=TEST_DEVICE, backend=backend)
    resident = GatedCache(120, **shape, **rules)
    offloaded = GatedCache(
        120, **shape, offload=True, max_chunk_tokens=12, disk=tmp_path if on_disk else None, **rules
    )  # on_disk: the history in a file (omnimem.store.disk), gathered by the host per call
    assert offloaded.offloaded and "offload=True" in repr(offloaded) and not resident.offloaded

    # Denoising rewrites: two passes a chunk, but one under Triton's interpreter (CI's time
    # budget; the gather variants rewrite, and the staging is the same for both backends).
    rewrites = 1 if backend == "triton" and TEST_DEVICE.type == "cpu" else 2

    def chunk(start: int, length: int, passes: int = rewrites) -> None:
        for _ in range(passes):
            q = torch.randn(2, 4, length, 16, generator=gen).to(TEST_DEVICE)
            k, v = (torch.randn(2, 2, length, 16, generator=gen).to(TEST_DEVICE) for _ in range(2))
            gates = torch.rand(2, 4, length, 3, generator=gen).to(TEST_DEVICE)
            want = resident.attend(q, k, v, gates, start=start)
            got = offloaded.attend(q, k, v, gates, start=start)
            assert torch.equal(got, want), (start, length)

    start = 0
    for length in (12, 9, 12, 12, 5, 12, 11):
        chunk(start, length)
        start += length
    for cache in (resident, offloaded):
        cache.rewind(start - 3)  # into the last chunk: what only the device held must survive
    chunk(start - 3, 12)
    for cache in (resident, offloaded):
        cache.rewind(20)  # far before the device's live region: it comes back from the host
    chunk(20, 12, passes=1)
    chunk(32, 7)
    # What became history is on the host, identical to the resident buffers.
    assert torch.equal(offloaded.k[:, :, :32].cpu(), resident.k[:, :, :32].cpu())
    assert torch.equal(offloaded.pooled.k, resident.pooled.k)
    for cache in (resident, offloaded):
        cache.reset()
    chunk(0, 12)


def test_offloaded_training_step_equals_the_resident_one():
    """Gradients through an offloaded cache's chunk equal the resident cache's."""
    rules = dict(block_size=6, query_group_size=4, top_k=2, window_tokens=12, backend="gather")
    gen = torch.Generator().manual_seed(2)
    caches = [
        GatedCache(80, batch=1, num_kv_heads=2, head_dim=8, device=TEST_DEVICE, **rules),
        GatedCache(80, batch=1, num_kv_heads=2, head_dim=8, device=TEST_DEVICE, offload=True,
                   max_chunk_tokens=10, **rules),
    ]  # fmt: skip
    for start in range(0, 50, 10):
        history = [torch.randn(1, 2, 10, 8, generator=gen).to(TEST_DEVICE) for _ in range(2)]
        for cache in caches:
            cache.write(*history, start=start)
    inputs = [torch.randn(1, 2, 10, 8, generator=gen).to(TEST_DEVICE) for _ in range(3)]
    gates = torch.rand(1, 2, 10, 3, generator=gen).to(TEST_DEVICE)
    grads = []
    for cache in caches:
        leaves = [x.clone().requires_grad_() for x in (*inputs, gates)]
        out = cache.attend(*leaves[:3], leaves[3], start=50)
        grads.append(torch.autograd.grad(out.square().sum(), leaves))
    for want, got in zip(*grads, strict=True):
        assert torch.equal(got, want)


def test_offload_validation():
    with pytest.raises(ValueError, match="needs max_chunk_tokens"):
        GatedCache(40, batch=1, num_kv_heads=1, head_dim=8, offload=True)
    with pytest.raises(TypeError, match="offload must be a bool"):
        GatedCache(40, batch=1, num_kv_heads=1, head_dim=8, offload=1, max_chunk_tokens=8)
    with pytest.raises(ValueError, match="max_chunk_tokens must be positive"):
        GatedCache(40, batch=1, num_kv_heads=1, head_dim=8, offload=True, max_chunk_tokens=0)
    cache = GatedCache(40, batch=1, num_kv_heads=1, head_dim=8, offload=True, max_chunk_tokens=8, **RULES)
    q = k = v = torch.randn(1, 1, 10, 8)
    with pytest.raises(ValueError, match="more than the offloaded cache's max_chunk_tokens 8"):
        cache.attend(q, k, v, torch.rand(1, 1, 10, 3), start=0)
    assert cache.end == 0


@pytest.mark.parametrize("kv_format", ["fp8", "int4"])
@pytest.mark.parametrize(
    ("layout", "backend", "rules", "offload"),
    [
        ("blhd", "gather", dict(block_size=7, query_group_size=5, top_k=3, window_tokens=25), False),
        (
            "bhld",
            "triton",
            dict(block_size=6, query_group_size=4, top_k=2, window_tokens=12, candidates="awe"),
            False,
        ),
        (
            "bhld",
            "gather",
            dict(block_size=5, query_group_size=3, top_k=4, window_tokens=30, exclude_window_chunks=2),
            False,
        ),
        # the quantized bytes in host memory, the selected blocks' bytes staged per call
        ("blhd", "triton", dict(block_size=6, query_group_size=4, top_k=2, window_tokens=12), True),
        ("bhld", "gather", dict(block_size=5, query_group_size=3, top_k=3, window_tokens=20), True),
    ],
    ids=["gather", "triton", "gather-chunks", "triton-offload", "gather-offload"],
)
def test_quantized_history_equals_the_layer_over_dequantized_blocks(
    kv_format, layout, backend, rules, offload, monkeypatch
):
    """GatedCache(kv_format=...): every call equals the float64 reference in which the selected
    branch reads the history before the live region quantized then dequantized, while block
    means, selection and the window read the native keys (denoising rewrites, chunks of varying
    length, GQA, partial blocks; poisoned allocations). Its bytes: no native history buffer."""
    if backend == "triton" and TEST_DEVICE.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton kernels run on CUDA or under TRITON_INTERPRET=1")
    from .reference import stored_history
    from .reference_gated import reference_gated_attention

    gen = torch.Generator().manual_seed(3)
    rules = {"candidates": "chunks", "exclude_window_chunks": 0, **rules}
    cache = GatedCache(
        120, batch=2, num_kv_heads=2, head_dim=16, layout=layout, device=TEST_DEVICE, backend=backend,
        kv_format=kv_format, max_chunk_tokens=12, offload=offload, **rules,
    )  # fmt: skip
    assert f"kv_format={kv_format!r}" in repr(cache) and cache.offloaded == offload
    bs = rules["block_size"]
    keys, values = torch.zeros(2, 2, 0, 16), torch.zeros(2, 2, 0, 16)
    start = 0
    for length in (12, 9, 12, 12, 5, 12, 11):
        passes = 1 if backend == "triton" and TEST_DEVICE.type == "cpu" else 2
        for _ in range(passes):  # denoising rewrites, then the final pass
            q = torch.randn(2, 4, length, 16, generator=gen)
            k, v = torch.randn(2, 2, length, 16, generator=gen), torch.randn(2, 2, length, 16, generator=gen)
            gates = torch.rand(2, 4, length, 3, generator=gen)
            got = cache.attend(*(x.to(TEST_DEVICE) for x in (q, k, v, gates)), start=start)
            k_all, v_all = torch.cat([keys, k], 2), torch.cat([values, v], 2)
            live = cache._live_start(start, start + length)  # blocks before it are read quantized
            stored_k = stored_history(k_all, live, kv_format, "key", bs)
            stored_v = stored_history(v_all, live, kv_format, "value", bs)
            ref = reference_gated_attention(
                q, k_all, v_all, gates, history_len=start, selected_k=stored_k, selected_v=stored_v,
                **rules,
            )  # fmt: skip
            assert ref.margin > 1e-5
            torch.testing.assert_close(got.double().cpu(), ref.out, atol=2e-5, rtol=1e-4)
        keys, values = k_all, v_all
        start += length
    # Quantization changed what the selected branch read: the native reference differs.
    native = reference_gated_attention(
        q,
        k_all,
        v_all,
        gates,
        history_len=start - length,
        **rules,
    )
    assert (native.out - ref.out).abs().max() > 1e-4
    with pytest.raises(ValueError, match="before the live region"):
        cache.rewind(3)
    cache.reset()
    cache.attend(
        *(x.to(TEST_DEVICE) for x in (q[:, :, :5], k[:, :, :5], v[:, :, :5], gates[:, :, :5])), start=0
    )


def test_quantized_cache_validation():
    shape = dict(batch=1, num_kv_heads=1, head_dim=8)
    with pytest.raises(ValueError, match="kv_format must be one of"):
        GatedCache(60, **shape, kv_format="int8", max_chunk_tokens=8)
    with pytest.raises(ValueError, match=r"kv_format='fp8'\) needs max_chunk_tokens"):
        GatedCache(60, **shape, kv_format="fp8")
    offloaded = GatedCache(60, **shape, kv_format="int4", offload=True, max_chunk_tokens=8)
    assert offloaded.offloaded and "offload=True, kv_format='int4'" in repr(offloaded)


@pytest.mark.parametrize("kv_format", ["fp8", "int4"])
@pytest.mark.parametrize(
    ("backend", "offload"),
    [("triton", False), ("triton", True), ("gather", False)],
    ids=["triton", "triton-offload", "gather"],
)
def test_training_over_a_quantized_history_equals_the_reference(kv_format, backend, offload, monkeypatch):
    """Gradients through a quantized GatedCache: a chunk with q, k, v and gates requiring
    grad gives the float64 reference's output and gradients (the selected branch reads the
    history quantized then dequantized, as in the forward test above). On the triton backend
    its one-pass backward reads the store's bytes (the compact, dequantized copy is made to fail)."""
    if backend == "triton" and TEST_DEVICE.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton kernels run on CUDA or under TRITON_INTERPRET=1")
    from omnimem.gated import offload as gated_offload

    from .reference import stored_history
    from .reference_gated import reference_gated_attention

    if backend == "triton":

        def no_copy(*args, **kwargs):
            raise AssertionError("a dequantized copy of the selected history blocks was made")

        monkeypatch.setattr(gated_offload.GatedQuantizedHistory, "history_rows", no_copy)
    gen = torch.Generator().manual_seed(7)
    rules = dict(block_size=6, query_group_size=4, top_k=2, window_tokens=12, candidates="chunks",
                 exclude_window_chunks=0)  # fmt: skip
    cache = GatedCache(
        120, batch=1, num_kv_heads=2, head_dim=16, device=TEST_DEVICE, backend=backend, kv_format=kv_format,
        max_chunk_tokens=12, offload=offload, **rules,
    )  # fmt: skip
    keys, values = torch.zeros(1, 2, 0, 16), torch.zeros(1, 2, 0, 16)
    start = 0
    for c, length in enumerate((12, 9, 12, 12, 11)):
        q = torch.randn(1, 4, length, 16, generator=gen)
        k, v = torch.randn(1, 2, length, 16, generator=gen), torch.randn(1, 2, length, 16, generator=gen)
        gates = torch.rand(1, 4, length, 3, generator=gen)
        if c < 3:  # history, without gradients
            with torch.no_grad():
                cache.attend(*(x.to(TEST_DEVICE) for x in (q, k, v, gates)), start=start)
        else:
            weight = torch.randn(1, 4, length, 16, generator=gen)
            ours = [x.to(TEST_DEVICE).requires_grad_() for x in (q, k, v, gates)]
            out = cache.attend(*ours, start=start)
            (out * weight.to(TEST_DEVICE)).sum().backward()
            theirs = [x.detach().double().requires_grad_() for x in (q, k, v, gates)]
            live = cache._live_start(start, start + length)
            k_all, v_all = (
                torch.cat([keys.double(), theirs[1]], 2),
                torch.cat([values.double(), theirs[2]], 2),
            )
            read = [
                torch.cat([stored_history(x.detach(), live, kv_format, role, 6)[:, :, :start], chunk], 2)
                for x, role, chunk in ((k_all, "key", theirs[1]), (v_all, "value", theirs[2]))
            ]
            ref = reference_gated_attention(
                theirs[0], k_all, v_all, theirs[3], history_len=start, selected_k=read[0], selected_v=read[1],
                **rules,
            )  # fmt: skip
            assert ref.margin > 1e-5
            (ref.out * weight.double()).sum().backward()
            torch.testing.assert_close(out.detach().double().cpu(), ref.out.detach(), atol=2e-5, rtol=1e-4)
            for name, a, b in zip(["q", "k", "v", "gates"], ours, theirs, strict=True):
                torch.testing.assert_close(a.grad.double().cpu(), b.grad, atol=1e-4, rtol=1e-4, msg=name)
        keys, values = torch.cat([keys, k], 2), torch.cat([values, v], 2)
        start += length
