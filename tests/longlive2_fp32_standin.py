"""LongLive-2.0's layer with its default rotation: a module-level ``causal_rope_apply`` that
takes the RoPE options and rotates in float32 (their Triton kernel's arithmetic, as its
docstring describes it: float32 cos/sin from the float64 table, ``a cos - b sin``, ``a sin +
b cos``), written from that description. ``patch_causal_wan`` finds the function in the
layer's module and rotates with it; ``CALLS`` counts its calls."""

from __future__ import annotations

import torch

from .causal_wan_standin import (
    StandinLongLive2Block,
    StandinLongLive2Model,
    StandinLongLive2SelfAttention,
    scaled_time_table,
)

CALLS = [0]


def causal_rope_apply(x, grid_sizes, freqs, start_frame=0, t_scale=1.0, method="linear",
                      original_seq_len=None, temporal_offset=0.0):  # fmt: skip
    """``x [B, L, N, D]`` rotated at frames ``start_frame...`` in float32; ``grid_sizes`` a list
    of ``(F, H, W)`` per sample (their call) or a ``[B, 3]`` tensor."""
    assert method == "linear" and original_seq_len is None
    CALLS[0] += 1
    frames, height, width = (int(n) for n in grid_sizes[0])
    half = freqs.shape[1]
    _, h, w = freqs.split([half - 2 * (half // 3), half // 3, half // 3], dim=1)
    time = scaled_time_table(freqs, frames, start_frame, t_scale, temporal_offset)
    table = torch.cat(
        [
            time[:, None, None].expand(frames, height, width, -1),
            h[:height][None, :, None].expand(frames, height, width, -1),
            w[:width][None, None, :].expand(frames, height, width, -1),
        ],
        dim=-1,
    ).reshape(frames * height * width, 1, -1)
    cos, sin = table.real.float(), table.imag.float()
    a, b = x.float()[..., 0::2], x.float()[..., 1::2]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    return out.type_as(x)


class Fp32RopeSelfAttention(StandinLongLive2SelfAttention):
    """The stand-in layer, rotating with the float32 function above (as their layer calls it)."""

    @staticmethod
    def rope(x, grid_sizes, freqs, start_frame: int, t_scale: float, offset) -> torch.Tensor:
        grid = [tuple(int(g) for g in grid_sizes[0])] * x.shape[0]
        return causal_rope_apply(
            x, grid, freqs, start_frame=start_frame, t_scale=t_scale, temporal_offset=offset
        )


class Fp32RopeBlock(StandinLongLive2Block):
    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim, num_heads)
        self.self_attn = Fp32RopeSelfAttention(dim, num_heads)


class Fp32RopeModel(StandinLongLive2Model):
    def __init__(self, num_layers: int = 2, dim: int = 32, num_heads: int = 2):
        super().__init__(num_layers, dim, num_heads)
        self.blocks = torch.nn.ModuleList(Fp32RopeBlock(dim, num_heads) for _ in range(num_layers))
