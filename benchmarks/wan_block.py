"""A Wan2.1-shaped transformer block with a pluggable self-attention, for whole-layer benchmarks.

The structure of a Wan2.1 DiT block (random weights, no checkpoint): adaLN modulation from the
timestep embedding, self-attention with RMS-normed q/k and rotary positions, cross-attention to
the text tokens, and a GELU MLP, each added back through its gate. ``attention(q, k, v)`` takes
and returns ``[B, L, H, D]`` (after RoPE), so the same block runs with
``cached_attention(q, k, v, cache)`` on one GPU and with ``ulysses_attention(q, k, v, cache)`` on
a rank's token shard: everything outside self-attention acts token by token, which is what
makes xDiT-style Ulysses sequence parallelism exact (each rank projects, modulates and runs the
MLP on its own tokens; only attention exchanges data).

Shapes: ``WanBlock.wan_14b()`` is dim 5120, 40 heads of 128, MLP 13824; ``wan_1_3b()`` is 1536,
12 heads, 8960.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def rope_tables(positions: torch.Tensor, head_dim: int, *, theta: float = 10000.0) -> torch.Tensor:
    """``[L, 1, D/2, 2]`` cos/sin of 1-D rotary positions (a stand-in for Wan's 3-D table:
    the cost per token is the same)."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.to(torch.float64)[:, None] * freqs
    return torch.stack([angles.cos(), angles.sin()], dim=-1).unsqueeze(1)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate ``[B, L, H, D]`` by ``table`` (``rope_tables``) in pairs of channels."""
    pairs = x.unflatten(-1, (-1, 2)).float()
    cos, sin = table[..., 0].float(), table[..., 1].float()
    real = pairs[..., 0] * cos - pairs[..., 1] * sin
    imag = pairs[..., 0] * sin + pairs[..., 1] * cos
    return torch.stack([real, imag], dim=-1).flatten(-2).to(x.dtype)


class WanBlock(nn.Module):
    """One Wan2.1 DiT block; ``forward(x, e, context, rope, attention)``."""

    def __init__(self, dim: int, heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.self_qkv = nn.Linear(dim, 3 * dim)
        self.self_norm_q, self.self_norm_k = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)
        self.self_o = nn.Linear(dim, dim)
        self.cross_q, self.cross_kv, self.cross_o = (
            nn.Linear(dim, dim),
            nn.Linear(dim, 2 * dim),
            nn.Linear(dim, dim),
        )
        self.cross_norm_q, self.cross_norm_k = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim)
        )

    @classmethod
    def wan_14b(cls) -> WanBlock:
        return cls(5120, 40, 13824)

    @classmethod
    def wan_1_3b(cls) -> WanBlock:
        return cls(1536, 12, 8960)

    def heads_of(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim))

    def forward(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        context: torch.Tensor,
        rope: torch.Tensor,
        attention: Attention,
    ) -> torch.Tensor:
        """``x``: ``[B, L, dim]`` tokens (a rank's shard under Ulysses); ``e``: ``[B, 6, dim]``
        timestep embedding; ``context``: ``[B, Lt, dim]`` text tokens; ``rope``: ``rope_tables``
        of ``x``'s tokens; ``attention``: ``(q, k, v) -> out``, all ``[B, L, H, D]``."""
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation + e).unbind(1)
        y = self.norm1(x) * (1 + scale_sa[:, None]) + shift_sa[:, None]
        q, k, v = self.self_qkv(y).chunk(3, dim=-1)
        q = apply_rope(self.heads_of(self.self_norm_q(q)), rope)
        k = apply_rope(self.heads_of(self.self_norm_k(k)), rope)
        x = x + self.self_o(attention(q, k, self.heads_of(v)).flatten(2)) * gate_sa[:, None]
        cq = self.heads_of(self.cross_norm_q(self.cross_q(self.norm3(x)))).transpose(1, 2)
        ck, cv = self.cross_kv(context).chunk(2, dim=-1)
        ck = self.heads_of(self.cross_norm_k(ck)).transpose(1, 2)
        cross = F.scaled_dot_product_attention(cq, ck, self.heads_of(cv).transpose(1, 2))
        x = x + self.cross_o(cross.transpose(1, 2).flatten(2))
        y = self.ffn(self.norm2(x) * (1 + scale_ff[:, None]) + shift_ff[:, None])
        return x + y * gate_ff[:, None]
