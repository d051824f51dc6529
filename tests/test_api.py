"""Public API: validation, backend choice, equivalences with plain attention."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import omnimem
from omnimem import OmniMemConfig, resolve_backend, select_blocks, sparse_attention, use_backend

from .inputs import TEST_DEVICE, make_inputs
from .reference import reference_attention

EAGER = dict(backend="flex", compile=False)


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        (dict(block_size=0), ValueError, "block_size"),
        (dict(top_k=-1), ValueError, "top_k"),
        (dict(top_k=2.0), TypeError, "top_k"),
        (dict(top_k=True), TypeError, "top_k"),
        (dict(sink_tokens=-4), ValueError, "sink_tokens"),
        (dict(local_tokens=8, exclusion_tokens=4), ValueError, "exclusion_tokens"),
        (dict(window_exclusion="sometimes"), ValueError, "window_exclusion"),
        (dict(query_group_size=0), ValueError, "query_group_size"),
        (dict(scale=0.0), ValueError, "scale"),
        (dict(scale="1"), TypeError, "scale"),
        (dict(backend="cudnn"), ValueError, "backend"),
        (dict(compile="yes"), TypeError, "compile"),
    ],
)
def test_config_rejects_bad_values(fields, error, match):
    with pytest.raises(error, match=match):
        OmniMemConfig(**fields)


def test_config_is_frozen_and_replace_validates():
    cfg = OmniMemConfig()
    with pytest.raises(AttributeError):
        cfg.top_k = 3
    with pytest.raises(TypeError, match="unknown OmniMemConfig field"):
        cfg.replace(topk=3)
    with pytest.raises(ValueError, match="top_k"):
        cfg.replace(top_k=0)


# ---------------------------------------------------------------------------- inputs
def _bad_inputs():
    q, k, v = make_inputs(q_heads=4, kv_heads=2, history_len=16, q_len=4)
    yield "rank", (q[0], k, v), {}, ValueError, "q must be 4-D"
    yield "not a tensor", (q, k.tolist(), v), {}, TypeError, "k must be a torch.Tensor"
    yield "int dtype", (q, k, v.int()), {}, TypeError, "v must have a floating dtype"
    yield "dtype mismatch", (q, k.double(), v.double()), {}, TypeError, "k must have q's dtype"
    yield "v shape", (q, k, v[:, :, :-1]), {}, ValueError, "v must have k's shape"
    yield "batch", (q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)), {}, ValueError, "batch size"
    yield "head dim", (q, k[..., :8], v[..., :8]), {}, ValueError, "head_dim"
    yield "gqa ratio", (q[:, :3], k, v), {}, ValueError, "multiple of k heads"
    yield "no heads", (q[:, :0], k[:, :0], v[:, :0]), {}, ValueError, "k must have at least one head"
    yield "history too long", (q, k, v), dict(history_len=17), ValueError, "history_len must lie"
    yield "negative history", (q, k, v), dict(history_len=-1), ValueError, "history_len must lie"
    yield "history not int", (q, k, v), dict(history_len=3.0), TypeError, "history_len must be a Python int"
    yield "chunk_len zero", (q, k, v), dict(chunk_len=0), ValueError, "chunk_len must be >= 1"
    yield "too few keys", (q, k[:, :, :3], v[:, :, :3]), {}, ValueError, "pass history_len"
    yield "empty queries", (q[:, :, :0], k, v), dict(chunk_len=4), ValueError, "at least one query"
    yield "unknown override", (q, k, v), dict(topk=3), TypeError, "unknown OmniMemConfig field"
    yield "bad override", (q, k, v), dict(window_exclusion="x"), ValueError, "window_exclusion"
    yield "bad config", (q, k, v), dict(config={"top_k": 3}), TypeError, "config must be an OmniMemConfig"
    yield "return_lse", (q, k, v), dict(return_lse=1), TypeError, "return_lse must be a bool"


@pytest.mark.parametrize(("case", "args", "kwargs", "error", "match"), list(_bad_inputs()), ids=lambda x: x)
def test_bad_input_gets_a_clear_error(case, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        sparse_attention(*args, **kwargs, backend="dense")


def test_device_mismatch_is_reported():
    q, k, v = make_inputs(device="cpu")
    with pytest.raises(ValueError, match="must be on q's device"):
        sparse_attention(q, k.to("meta"), v.to("meta"))


# ---------------------------------------------------------------------------- backend choice
def test_backend_precedence(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("OMNIMEM_BACKEND", raising=False)
    assert resolve_backend(OmniMemConfig(), cpu) == "gather"
    monkeypatch.setenv("OMNIMEM_BACKEND", "dense")
    assert resolve_backend(OmniMemConfig(), cpu) == "dense"
    with use_backend("flex"):
        assert resolve_backend(OmniMemConfig(), cpu) == "flex"  # context beats environment
        with use_backend("dense"):
            assert resolve_backend(OmniMemConfig(), cpu) == "dense"
        assert resolve_backend(OmniMemConfig(), cpu) == "flex"
        assert resolve_backend(OmniMemConfig(backend="dense"), cpu) == "dense"  # config beats context
    monkeypatch.setenv("OMNIMEM_BACKEND", "nope")
    with pytest.raises(ValueError, match="OMNIMEM_BACKEND"):
        resolve_backend(OmniMemConfig(), cpu)
    with pytest.raises(ValueError, match="use_backend"), use_backend("fast"):
        pass


@pytest.mark.parametrize(
    ("dtype", "head_dim", "tma", "groups", "expected"),
    [
        (torch.bfloat16, 128, True, None, "triton"),
        (torch.float16, 64, True, None, "triton"),
        (torch.bfloat16, 128, False, None, "flex"),  # no TMA: triton measured slower than flex
        (torch.bfloat16, 96, True, None, "flex"),  # unmeasured head dim
        (torch.bfloat16, 128, True, 64, "flex"),  # query groups
        (torch.float32, 128, True, None, "gather"),
    ],
)
def test_auto_follows_the_measured_table(monkeypatch, dtype, head_dim, tma, groups, expected):
    import omnimem.api

    monkeypatch.delenv("OMNIMEM_BACKEND", raising=False)
    monkeypatch.setattr(omnimem.api, "_has_tma", lambda device: tma)
    config = OmniMemConfig(query_group_size=groups)
    cuda = torch.device("cuda")
    assert resolve_backend(config, cuda, dtype=dtype, head_dim=head_dim) == expected
    assert resolve_backend(config, torch.device("cpu"), dtype=dtype, head_dim=head_dim) == "gather"


def test_triton_backend_differentiates_and_refuses_float64_gradients_with_working_advice():
    pytest.importorskip("triton")
    q, k, v = make_inputs(device=TEST_DEVICE)
    if os.environ.get("TRITON_INTERPRET") == "1" or q.is_cuda:
        q32 = q.detach().clone().requires_grad_(True)
        sparse_attention(q32, k, v, backend="triton").sum().backward()
        assert q32.grad is not None and torch.isfinite(q32.grad).all()
    q64, k64, v64 = (x.double() for x in (q, k, v))
    q64.requires_grad_(True)
    with pytest.raises(ValueError, match=r"float64 gradients.*backend='gather' or 'dense'"):
        sparse_attention(q64, k64, v64, backend="triton")
    sparse_attention(q64, k64, v64, backend="gather").sum().backward()  # the advice runs
    assert q64.grad is not None


def test_backend_choice_reaches_the_call(monkeypatch):
    import omnimem.backends.dense as dense

    calls = []
    original = dense.forward
    monkeypatch.setattr(dense, "forward", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    q, k, v = make_inputs()
    with use_backend("dense"):
        sparse_attention(q, k, v)
    monkeypatch.setenv("OMNIMEM_BACKEND", "dense")
    sparse_attention(q, k, v)
    assert len(calls) == 2


# ---------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("backend", [dict(backend="dense"), EAGER])
def test_empty_history_is_plain_attention(backend):
    q, k, v = make_inputs(q_heads=4, kv_heads=2, history_len=0, q_len=9, unwritten=5)
    out = sparse_attention(q, k, v, history_len=0, block_size=4, sink_tokens=4, local_tokens=4, **backend)
    expected = F.scaled_dot_product_attention(q, k[:, :, :9], v[:, :, :9], enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [dict(backend="dense"), EAGER])
def test_budget_covering_all_blocks_is_dense_attention(backend):
    q, k, v = make_inputs(batch=2, q_heads=2, history_len=45, q_len=6, unwritten=7)
    out, lse = sparse_attention(q, k, v, history_len=45, block_size=8, top_k=6, return_lse=True, **backend)
    expected = F.scaled_dot_product_attention(q, k[:, :, :51], v[:, :, :51])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    scores = (q @ k[:, :, :51].transpose(-1, -2)) * q.shape[-1] ** -0.5
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, 6)


@pytest.mark.parametrize("backend", [dict(backend="dense"), EAGER])
def test_chunk_shorter_than_the_queries_region(backend):
    """``chunk_len`` counts chunk keys; keys after it are ignored even if finite junk."""
    q, k, v = make_inputs(history_len=20, q_len=5, chunk_len=3, unwritten=9)
    cfg = dict(block_size=4, top_k=2, local_tokens=4)
    out = sparse_attention(q, k, v, history_len=20, chunk_len=3, **cfg, **backend)
    ref = reference_attention(q, k, v, history_len=20, chunk_len=3, **cfg)
    torch.testing.assert_close(out.cpu(), ref.out.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [dict(backend="dense"), EAGER])
def test_flash_layout_views_work(backend):
    q, k, v = make_inputs(q_heads=4, kv_heads=2, history_len=50, q_len=6, unwritten=3)
    qf, kf, vf = make_inputs(q_heads=4, kv_heads=2, history_len=50, q_len=6, unwritten=3, flash_layout=True)
    assert not qf.is_contiguous()
    cfg = dict(history_len=50, block_size=8, top_k=2, sink_tokens=8, local_tokens=8)
    torch.testing.assert_close(
        sparse_attention(qf, kf, vf, **cfg, **backend), sparse_attention(q, k, v, **cfg, **backend)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_output_dtype_follows_q(dtype):
    q, k, v = make_inputs(dtype=dtype, history_len=20)
    out, lse = sparse_attention(q, k, v, block_size=4, top_k=2, return_lse=True, **EAGER)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_overrides_and_config_compose():
    q, k, v = make_inputs(history_len=64, q_len=4)
    cfg = OmniMemConfig(block_size=8, top_k=1, backend="dense")
    a = sparse_attention(q, k, v, config=cfg, top_k=3)
    b = sparse_attention(q, k, v, config=cfg.replace(top_k=3))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, sparse_attention(q, k, v, config=cfg))


def test_public_names():
    for name in ("sparse_attention", "select_blocks", "OmniMemConfig", "Selection", "use_backend"):
        assert hasattr(omnimem, name)
    assert select_blocks.__doc__ and sparse_attention.__doc__


def test_flex_differentiates_on_gpus_and_refuses_clearly_on_cpu():
    q, k, v = make_inputs(history_len=64, head_dim=16, device=TEST_DEVICE)
    call = dict(history_len=64, block_size=16, top_k=2, local_tokens=16)
    if q.device.type != "cuda":
        q.requires_grad_(True)
        with pytest.raises(ValueError, match=r"no backward on CPU.*backend='gather'"):
            sparse_attention(q, k, v, backend="flex", **call)
        return
    grads = {}
    for name, extra in (("dense", {}), ("flex", dict(compile=True)), ("flex-eager", dict(compile=False))):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out = sparse_attention(*leaves, backend=name.removesuffix("-eager"), **call, **extra)
        out.square().sum().backward()
        grads[name] = [x.grad for x in leaves]
    for name in ("flex", "flex-eager"):
        for ours, want in zip(grads[name], grads["dense"], strict=True):
            torch.testing.assert_close(ours, want, atol=2e-4, rtol=2e-3)


def test_cached_key_block_sums_give_the_same_result():
    from omnimem.selection import block_key_sums

    q, k, v = make_inputs(q_heads=4, kv_heads=2, history_len=70, unwritten=9)
    cfg = dict(history_len=70, block_size=8, top_k=2, sink_tokens=8, local_tokens=8, backend="dense")
    sums = block_key_sums(k, torch.tensor(70, device=k.device), 8)
    torch.testing.assert_close(
        sparse_attention(q, k, v, key_block_sums=sums, **cfg), sparse_attention(q, k, v, **cfg)
    )
    with pytest.raises(ValueError, match=r"key_block_sums must have shape \(1, 2, 11, 16\)"):
        sparse_attention(q, k, v, key_block_sums=sums[:, :, :-1], **cfg)
    with pytest.raises(TypeError, match="key_block_sums must be float32"):
        select_blocks(q, k, key_block_sums=sums.half(), **cfg)


def test_a_precomputed_selection_is_used_and_checked():
    q, k, v = make_inputs(device="cpu")
    config = OmniMemConfig(block_size=4, top_k=2, local_tokens=4, backend="dense")
    selection = select_blocks(q, k, config=config)
    torch.testing.assert_close(
        sparse_attention(q, k, v, config=config, selection=selection),
        sparse_attention(q, k, v, config=config),
    )
    with pytest.raises(ValueError, match="selection must index k's"):
        sparse_attention(q, k[:, :, :-8], v[:, :, :-8], config=config, selection=selection)
    with pytest.raises(TypeError, match=r"selection must be an omnimem\.Selection"):
        sparse_attention(q, k, v, config=config, selection=object())


@pytest.mark.parametrize("backend", ["dense", "gather", "flex"])
def test_layout_blhd_reads_wan_layout_tensors_without_copies(backend):
    q, k, v = make_inputs(q_heads=4, kv_heads=2, history_len=40, q_len=12, head_dim=16)
    call = dict(history_len=40, block_size=8, top_k=2, sink_tokens=8, local_tokens=8, backend=backend)
    want, want_lse = sparse_attention(q, k, v, return_lse=True, **call)
    wan = [x.transpose(1, 2).contiguous() for x in (q, k, v)]  # [B, L, H, D] storage
    got, lse = sparse_attention(*wan, layout="blhd", return_lse=True, **call)
    assert got.shape == wan[0].shape
    torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, want_lse, atol=1e-6, rtol=1e-6)
    selection = select_blocks(*wan[:2], layout="blhd", **call)
    assert torch.equal(selection.kv_block_idx, select_blocks(q, k, **call).kv_block_idx)


def test_layout_mistakes_are_named():
    q, k, v = make_inputs(q_heads=4, kv_heads=2, history_len=40, q_len=12, head_dim=16)
    with pytest.raises(ValueError, match=r"layout must be 'bhld' \(\[B, H, L, D\]\) or 'blhd'"):
        sparse_attention(q, k, v, layout="BLHD")
    wan = [x.transpose(1, 2).contiguous() for x in (q, k, v)]
    with pytest.raises(ValueError, match=r"must be a multiple of k heads .* layout='blhd'"):
        sparse_attention(*wan)  # [B, L, H, D] passed as if [B, H, L, D]


def test_auto_and_the_triton_kernel_say_once_what_runs_and_why(caplog, monkeypatch):
    import logging

    import omnimem.api
    from omnimem.backends import triton as triton_backend

    monkeypatch.delenv("OMNIMEM_BACKEND", raising=False)
    omnimem.api._say_auto.cache_clear()
    triton_backend._say_kernel.cache_clear()
    with caplog.at_level(logging.INFO, logger="omnimem"):
        for _ in range(2):
            resolve_backend(OmniMemConfig(), torch.device("cpu"), dtype=torch.float32, head_dim=32)
        triton_backend._say_kernel((8, 0), torch.bfloat16, 96, 128, False, "compute capability (8, 0) ...")
    said = [r.getMessage() for r in caplog.records]
    assert said.count("backend auto (cpu, torch.float32, head_dim 32, one query group): gather "
                      "(the fastest measured on CPU)") == 1  # fmt: skip
    assert any("the faster Hopper Gluon kernel is skipped: compute capability (8, 0)" in m for m in said)


def test_the_hopper_kernel_names_why_it_skips_a_call():
    from omnimem.backends import gluon_attention

    q, k, v = make_inputs(device="cpu")
    assert gluon_attention.skip_reason(q, k, v, block_size=128, grouped=False) == "not a CUDA tensor"
