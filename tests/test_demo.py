"""The built-in model and the demo: the real AR call pattern, end to end, on tiny settings."""

from __future__ import annotations

import pytest
import torch

from omnimem import OmniMemConfig
from omnimem.demo.cli import main
from omnimem.demo.model import TinyCausalDiT, TinyDiTConfig, rope_3d
from omnimem.demo.rollout import Memory, rollout


def test_rope_preserves_norms_and_depends_on_position():
    x = torch.randn(1, 6, 2, 32)
    frame, row, col = torch.arange(6), torch.zeros(6, dtype=torch.long), torch.arange(6)
    rotated = rope_3d(x, frame, row, col)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    assert not torch.allclose(rope_3d(x, frame + 1, row, col), rotated)


def test_weights_are_deterministic_from_the_seed():
    a, b = TinyCausalDiT(seed=3), TinyCausalDiT(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_omnimem_rollout_with_a_budget_covering_everything_equals_dense():
    model = TinyCausalDiT(TinyDiTConfig(height=8, width=8, dim=32, heads=2, layers=2), seed=0)
    frame = model.config.tokens_per_frame
    config = OmniMemConfig(
        block_size=frame, top_k=64, sink_tokens=frame, local_tokens=3 * frame, backend="dense"
    )
    runs = {}
    for mode in ("omnimem", "dense", "truncated"):
        memory = Memory(mode, model, 4 * 3 * frame, config, batch=1, device=torch.device("cpu"))
        runs[mode] = rollout(model, memory, chunks=4, steps=2)
    for omni, dense in zip(runs["omnimem"], runs["dense"], strict=True):
        torch.testing.assert_close(omni.latents, dense.latents, atol=1e-5, rtol=1e-5)
    assert runs["dense"][-1].history_tokens == 3 * 3 * frame
    assert runs["truncated"][-1].attended_tokens < runs["dense"][-1].attended_tokens
    # Truncation forgets: its last chunk differs from the dense rollout.
    assert not torch.allclose(runs["truncated"][-1].latents, runs["dense"][-1].latents, atol=1e-4)


def test_demo_command_prints_a_table_and_writes_a_plot(tmp_path, capsys):
    plot = tmp_path / "demo.png"
    main(
        [
            "demo",
            "--chunks",
            "3",
            "--steps",
            "1",
            "--frame-size",
            "8",
            "--layers",
            "1",
            "--dim",
            "32",
            "--heads",  # whatever --size the device picks (wan-1.3b on CUDA: 12 heads)
            "2",
            "--no-compile",
            "--plot",
            str(plot),
        ]
    )
    out = capsys.readouterr().out
    assert "| chunk | scene | history |" in out and out.count("\n| ") >= 4
    assert "Weights are random and the stream is synthetic" in out
    assert plot.stat().st_size > 1000


def test_the_demo_story_holds_at_a_reduced_size():
    """At the returns to the first scene OmniMem's attention is closer to full attention than
    truncation's, and it retrieves that scene's frames more often than a blind pick would."""
    from omnimem.demo.cli import parse_args, run_demo, summary

    argv = ["--chunks", "16", "--revisit-every", "3", "--steps", "1", "--frame-size", "8", "--layers", "2"]
    results = run_demo(parse_args([*argv, "--plot", ""]))
    story = summary(results)
    assert story["error_at_revisits_omnimem"] < story["error_at_revisits_truncation"]
    assert story["revisit_picks_from_scene0"] > story["revisit_chance_of_scene0"]
    dense, omni = results["dense"][-1], results["omnimem"][-1]
    assert dense.attended_tokens > omni.attended_tokens and dense.attention_error == 0
    assert omni.kv_device_mib == dense.kv_device_mib > results["truncated"][-1].kv_device_mib


def test_cli_help_exits_zero_and_documents_every_option(capsys):
    for argv in (["--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "(default: 40)" in " ".join(out.split())  # defaults shown
    options = [line.split()[0] for line in out.splitlines() if line.strip().startswith("--")]
    assert len(options) >= 13
    with pytest.raises(SystemExit) as exit_info:
        main([])  # no command: usage on stderr, argparse's exit status
    assert exit_info.value.code == 2


def test_size_presets_fill_only_what_is_not_given():
    from omnimem.demo.cli import SIZES, _resolve_sizes, parse_args

    tiny = _resolve_sizes(parse_args(["--device", "cpu"]))
    assert (tiny.size, tiny.layers, tiny.frame_size) == ("tiny", 4, 16)
    wan = _resolve_sizes(parse_args(["--device", "cpu", "--size", "wan-1.3b", "--layers", "2"]))
    assert (wan.layers, wan.heads, wan.dim, wan.frame_size) == (2, 12, 1536, SIZES["wan-1.3b"]["frame_size"])


def test_size_options_that_do_not_fit_are_a_usage_error(capsys):
    """A width the heads do not divide (what ``--dim 32`` meant under the CUDA default of 12
    heads) stops before anything runs, naming the options, instead of failing in a reshape."""
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--device", "cpu", "--size", "wan-1.3b", "--dim", "32", "--plot", ""])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "dim (32) must be heads (12) times an even head dim" in err and "--heads" in err


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(dim=32, heads=12), "dim \\(32\\) must be heads \\(12\\)"),
        (dict(dim=36, heads=4), "even head dim"),  # head dim 9: RoPE rotates pairs
        (dict(layers=0), "layers must be a positive int"),
        (dict(heads=2.0), "heads must be a positive int"),
        (dict(height=15), "multiples of patch"),
    ],
)
def test_model_config_is_validated(fields, message):
    with pytest.raises(ValueError, match=message):
        TinyDiTConfig(**fields)
