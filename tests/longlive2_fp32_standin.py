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
    """The stand-in layer, rotating with the float32 function above."""

    def forward(self, x, seq_lens, grid_sizes, freqs, block_mask, kv_cache=None, current_start=0,
                cache_start=None, t_scale=1.0, use_relative_rope=False, method="linear",
                original_seq_len=None, temporal_offset=0.0):  # fmt: skip
        import torch.nn.functional as F

        b, s = x.shape[:2]
        n, d = self.num_heads, self.head_dim
        frame_tokens = int(grid_sizes[0][1] * grid_sizes[0][2])
        start_frame = current_start // frame_tokens
        q = self.norm_q(self.q(x)).view(b, s, n, d)
        k = self.norm_k(self.k(x)).view(b, s, n, d)
        v = self.v(x).view(b, s, n, d)
        grid = [tuple(int(g) for g in grid_sizes[0])] * b
        q, k = (
            causal_rope_apply(
                t, grid, freqs, start_frame=start_frame, t_scale=t_scale, temporal_offset=temporal_offset
            )
            for t in (q, k)
        )
        end = current_start + s
        keys, values = kv_cache["k"].clone(), kv_cache["v"].clone()
        keys[:, current_start:end], values[:, current_start:end] = k, v
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys[:, :end].transpose(1, 2), values[:, :end].transpose(1, 2)
        )
        update = dict(start=current_start, end=end, k=k, v=v, is_recompute=False)
        return self.o(out.transpose(1, 2).flatten(2)), (end, end, update)


class Fp32RopeBlock(StandinLongLive2Block):
    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim, num_heads)
        self.self_attn = Fp32RopeSelfAttention(dim, num_heads)


class Fp32RopeModel(StandinLongLive2Model):
    def __init__(self, num_layers: int = 2, dim: int = 32, num_heads: int = 2):
        super().__init__(num_layers, dim, num_heads)
        self.blocks = torch.nn.ModuleList(Fp32RopeBlock(dim, num_heads) for _ in range(num_layers))
