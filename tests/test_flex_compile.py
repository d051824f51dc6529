"""The compiled FlexAttention path: exact, and no recompiles as the history grows in a buffer."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from omnimem import OmniMemConfig, sparse_attention

from .inputs import TEST_DEVICE, make_inputs

pytestmark = pytest.mark.compile


@pytest.mark.parametrize(
    ("shape", "cfg"),
    [
        (
            dict(batch=1, q_heads=4, kv_heads=2, q_len=40, head_dim=16),
            dict(block_size=16, top_k=3, sink_tokens=16, local_tokens=40),
        ),
        (
            dict(batch=2, q_heads=2, q_len=130, head_dim=32),
            dict(block_size=32, top_k=2, local_tokens=32, query_group_size=48, window_exclusion="never"),
        ),
    ],
)
def test_compiled_flex_matches_dense_without_recompiling(shape, cfg):
    buffer_tokens = 400 + shape["q_len"]
    config = OmniMemConfig(**cfg, backend="flex", compile=True)
    counters.clear()
    graphs_after_first_call = None
    for step, history_len in enumerate((0, 7, 150, 257, 400)):
        q, k, v = make_inputs(**shape, history_len=history_len, unwritten=400 - history_len, seed=step)
        assert k.shape[2] == buffer_tokens
        out = sparse_attention(q, k, v, history_len=history_len, config=config)
        expected = sparse_attention(q, k, v, history_len=history_len, config=config.replace(backend="dense"))
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
        if graphs_after_first_call is None:
            graphs_after_first_call = counters["stats"]["unique_graphs"]
    # The first call compiled (the kernel; on GPUs also selection and planning); the history
    # sweep compiled nothing more.
    assert graphs_after_first_call >= 1
    assert counters["stats"]["unique_graphs"] == graphs_after_first_call, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("simdlen", [None, 256], ids=["native-vectors", "avx2-vectors"])
def test_compiled_planning_matches_eager_planning(simdlen):
    """The GPU path compiles selection and BlockMask planning; check that code on this device.
    A model compiled whole on a CPU compiles it too: with 256-bit (AVX2) vectors, torch 2.13
    once picked the wrong branch of selection's int64 sign select (omnimem/selection.py:
    _order_preserving_bits), ranking other blocks than eager selection."""
    import torch._inductor.config as inductor_config

    if simdlen is not None and TEST_DEVICE.type != "cpu":
        pytest.skip("the vector width is the CPU's")
    config = OmniMemConfig(block_size=16, top_k=3, sink_tokens=16, local_tokens=24, query_group_size=20)
    counters.clear()
    with inductor_config.patch({"cpp.simdlen": simdlen}):
        _check_compiled_planning(config)


def _check_compiled_planning(config: OmniMemConfig) -> None:
    from omnimem.backends.flex import build_block_mask
    from omnimem.selection import select

    for history_len in (0, 37, 200):
        q, k, _ = make_inputs(
            q_heads=4, kv_heads=2, q_len=40, history_len=history_len, unwritten=200 - history_len
        )
        history = torch.tensor(history_len, device=k.device)
        eager = select(q, k, history, config, scale=0.25)
        compiled = select(q, k, history, config, scale=0.25, compiled=True)
        for name in ("kv_block_idx", "kv_num_blocks", "selected_block_idx", "fixed_block_mask"):
            assert torch.equal(getattr(eager, name), getattr(compiled, name)), name
        shapes = dict(num_q_heads=4, q_len=40, kv_len=k.shape[2], chunk_len=40)
        masks = [build_block_mask(eager, **shapes, compiled=flag) for flag in (False, True)]
        for a, b in zip(masks[0].as_tuple()[2:6], masks[1].as_tuple()[2:6], strict=True):
            assert torch.equal(a, b)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.skipif(TEST_DEVICE.type != "cpu", reason="inductor's C++ FlexAttention template is the CPU path")
def test_compiled_cpu_flex_is_exact_over_one_short_key_tile_with_avx2_vectors():
    """torch's C++ template mis-computed a lone key tile of 8 mod 16 keys with 8-float (AVX2)
    vectors and head dims < 24 (backends/flex.py: keys_padded_for_cpu_template); its vector
    width is forced here so that the case runs on every x86 machine, AVX-512 ones included."""
    import torch._inductor.config as inductor_config

    config = OmniMemConfig(block_size=8, top_k=1, sink_tokens=8, local_tokens=8, backend="flex", compile=True)
    with inductor_config.patch({"cpp.simdlen": 256}):
        for step, (q_len, history_len, head_dim) in enumerate(((8, 64, 16), (4, 36, 8))):  # kv_len 72, 40
            q, k, v = make_inputs(q_len=q_len, history_len=history_len, head_dim=head_dim, seed=step)
            out = sparse_attention(q, k, v, history_len=history_len, config=config)
            dense = config.replace(backend="dense")
            torch.testing.assert_close(
                out, sparse_attention(q, k, v, history_len=history_len, config=dense), atol=2e-5, rtol=2e-5
            )
