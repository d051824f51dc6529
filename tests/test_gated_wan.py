"""The drop-in for the authors' NSA layer: their parameter names load unchanged; its RoPE in
the pooled-block token order; a rollout equals projections + RoPE + the float64 reference."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange
from torch import nn

from omnimem import GatedWanSelfAttention
from omnimem.gated.wan import reordered_rope, wan_rope_freqs

from .reference_gated import reference_gated_attention

DIM, HEADS, FRAMES_PER_CHUNK, HEIGHT, WIDTH = 32, 2, 2, 4, 3  # 24 tokens per chunk
POOL = (1, 2, 3)  # blocks of 6 tokens


class AuthorsLayout(nn.Module):
    """Their layer's parameters, by name and shape (from the public constructor signature)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = nn.LayerNorm(dim, bias=False), nn.LayerNorm(dim, bias=False)
        self.g_proj = nn.Linear(dim, 3 * num_heads)


def make_layer(**kwargs) -> GatedWanSelfAttention:
    torch.manual_seed(0)
    return GatedWanSelfAttention(
        dim=DIM, num_heads=HEADS, window_size=(-1, -1), qk_norm=True, eps=1e-6, pool_f=POOL[0],
        pool_h=POOL[1], pool_w=POOL[2], num_selected_blocks=3, group_q_size=4, chunk_length=24,
        layer_idx=0, **kwargs,
    )  # fmt: skip


def test_checkpoint_of_the_authors_layout_loads_unchanged():
    theirs = AuthorsLayout(DIM, HEADS)
    ours = make_layer()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }


def test_reordered_rope_is_wan_rope_then_reorder():
    """RoPE on the frame-major grid, then the block reorder == the reorder, then our RoPE."""
    frames, height, width, d = 2, 4, 6, 16
    x = torch.randn(1, frames * height * width, 2, d)
    freqs = wan_rope_freqs(d)
    plain = reordered_rope(x, (frames, height, width), freqs, start_frame=3)  # pool 1: Wan's order
    pattern = "b (f fs h hs w ws) n d -> b (f h w fs hs ws) n d"
    sizes = dict(f=frames, h=height // 2, w=width // 3, fs=1, hs=2, ws=3)
    want = rearrange(plain, pattern, **sizes)
    got = reordered_rope(
        rearrange(x, pattern, **sizes), (frames, height, width), freqs, start_frame=3, pool=(1, 2, 3)
    )
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # and it is a rotation: norms of each (real, imaginary) pair are kept
    torch.testing.assert_close(plain.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        {},  # their class's defaults: no exclusion
        {"gate_mode": "softmax", "skip_module": "cmp"},
        {"exclude_window_chunks": 2, "progressive_exclude": True},  # from chunk 2 on
        {"exclude_window_chunks": 1, "exclude_sink_chunks": 1, "progressive_exclude": False},
    ],
)
def test_rollout_equals_the_reference_layer(options):
    layer = make_layer(**options)
    freqs = wan_rope_freqs(DIM // HEADS)
    grid = torch.tensor([[FRAMES_PER_CHUNK, HEIGHT, WIDTH]])
    length = FRAMES_PER_CHUNK * HEIGHT * WIDTH
    keys, values = [], []
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for chunk in range(4):
            for _ in range(2):  # a denoising pass, then the commit pass: same start
                x = torch.randn(1, length, DIM, generator=gen)
                start_frame = chunk * FRAMES_PER_CHUNK
                out = layer(x, torch.tensor([length]), grid, freqs, start_frame=start_frame)
                # The same layer by hand: projections, RoPE, the float64 reference, gates, output.
                q = layer.norm_q(layer.q(x)).view(1, length, HEADS, -1)
                k = layer.norm_k(layer.k(x)).view(1, length, HEADS, -1)
                v = layer.v(x).view(1, length, HEADS, -1)
                g = (FRAMES_PER_CHUNK, HEIGHT, WIDTH)
                q = reordered_rope(q, g, freqs, start_frame=start_frame, pool=POOL)
                k = reordered_rope(k, g, freqs, start_frame=start_frame, pool=POOL)
                k_all = torch.cat([*keys, k], 1).transpose(1, 2)
                v_all = torch.cat([*values, v], 1).transpose(1, 2)
                logits = layer.g_proj(x).view(1, length, HEADS, 3).clamp(-10, 10)
                gates = logits.sigmoid() if layer.gate_mode == "sigmoid" else logits.softmax(-1)
                if layer.skip_module == "cmp":
                    gates = gates * torch.tensor([0.0, 1.0, 1.0])
                ref = reference_gated_attention(
                    q.transpose(1, 2), k_all, v_all, gates.transpose(1, 2), history_len=chunk * length,
                    block_size=6, query_group_size=4, top_k=3, window_tokens=72, candidates="chunks",
                    exclude_window_chunks=options.get("exclude_window_chunks", 0),
                    exclude_sink_chunks=options.get("exclude_sink_chunks", 0),
                    progressive_exclude=options.get("progressive_exclude", False),
                )  # fmt: skip
                assert ref.margin > 1e-4
                want = layer.o(ref.out.transpose(1, 2).flatten(2).float())
                torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
            keys.append(k)
            values.append(v)


def test_refusals():
    with pytest.raises(TypeError, match="takes Wan's"):
        GatedWanSelfAttention(num_heads=2)
    with pytest.raises(ValueError, match="gate_mode must be"):
        make_layer(gate_mode="tanh")
    with pytest.raises(ValueError, match="skip_module must be"):
        make_layer(skip_module="swa")
    with pytest.raises(ValueError, match="num_kv_head_groups=1 pools 2 heads"):
        make_layer(num_kv_head_groups=1)
    with pytest.raises(ValueError, match="offload=True needs the cache's size up front"):
        make_layer(offload=True)
    with pytest.raises(ValueError, match=r"GatedConfig\.exclude_window_chunks must be >= 0"):
        make_layer(exclude_window_chunks=-1)
    sized = make_layer(cache_capacity=48)
    grid, freqs = torch.tensor([[2, 4, 3]]), wan_rope_freqs(16)
    sized(torch.randn(1, 24, DIM), None, grid, freqs, start_frame=0)
    with pytest.raises(ValueError, match="past the layer's cache_capacity=48 tokens"):
        sized(torch.randn(1, 24, DIM), None, grid, freqs, start_frame=4)
    layer = make_layer()
    with pytest.raises(NotImplementedError, match=r"teacher-forcing path.*train through the cached path"):
        layer(
            torch.randn(1, 24, DIM), None, torch.tensor([[2, 4, 3]]), wan_rope_freqs(16), block_mask=object()
        )
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(1, 24, DIM + 1), None, torch.tensor([[2, 4, 3]]), wan_rope_freqs(16))
    with pytest.raises(ValueError, match="start_frame must be"):
        layer(torch.randn(1, 24, DIM), None, torch.tensor([[2, 4, 3]]), wan_rope_freqs(16), start_frame=-2)
    with pytest.raises(ValueError, match="grid_sizes"):
        layer(torch.randn(1, 20, DIM), None, torch.tensor([[2, 4, 3]]), wan_rope_freqs(16))


def test_rope_table_for_extends_wan_tables_only():
    """Past the table: Wan's formula (the table's own rows unchanged); a table that is not
    Wan's is refused, naming the limit; the drop-in layer reads it at its start_frame."""
    from omnimem.gated.wan import rope_table_for

    table = wan_rope_freqs(16)
    assert rope_table_for(table, 1024) is table
    longer = rope_table_for(table, 1100)
    assert longer.shape[0] >= 1100 and torch.equal(longer[:1024], table)
    torch.testing.assert_close(longer[:1100], wan_rope_freqs(16, positions=1100), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"RoPE table of 1024 frames.*max_frames <= 1024"):
        rope_table_for(wan_rope_freqs(16, theta=500.0), 1025)
    # A table's verdict dies with it: a later table at the same address is checked afresh.
    from omnimem.gated import wan as gated_wan

    before = len(gated_wan._CHECKED_TABLES)
    rope_table_for(wan_rope_freqs(16, positions=8), 9)
    assert len(gated_wan._CHECKED_TABLES) == before  # the temporary table is gone, and its entry
