"""A tiny Wan-style causal video DiT: the real AR call pattern at CPU-friendly size.

Latent frames are patchified into tokens; transformer blocks with adaLN timestep modulation and
3-D RoPE over (frame, row, column) attend through one ``OmniMemCache`` per layer; a video is
rolled out chunk by chunk with a few flow-matching denoising steps, then one clean pass commits
the chunk's keys/values (the Self-Forcing flow). Weights are random from a seed: it exists to
exercise the call pattern and to time it, not to make pretty videos.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# attention(layer, q, k, v, commit) -> out; q, k, v and out are [B, L, H, D]
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class TinyDiTConfig:
    """Shape of the built-in model (defaults: 64 tokens per latent frame, 4 layers, 4 heads)."""

    channels: int = 4
    height: int = 16
    width: int = 16
    patch: int = 2
    dim: int = 128
    heads: int = 4
    layers: int = 4
    frames_per_chunk: int = 3
    # Keys share the queries' projection, times a gain: attention then follows content
    # similarity, as a trained model's does; independent random projections make every head's
    # attention nearly uniform, and no history would be worth retrieving.
    tied_qk: bool = True
    qk_gain: float = 2.0

    def __post_init__(self) -> None:
        for name in ("channels", "height", "width", "patch", "dim", "heads", "layers", "frames_per_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            # Heads split the width evenly, and RoPE rotates pairs of each head's dimensions.
            raise ValueError(
                f"dim ({self.dim}) must be heads ({self.heads}) times an even head dim; "
                f"e.g. dim={self.heads * max(2, self.dim // self.heads // 2 * 2)}"
            )
        if self.height % self.patch or self.width % self.patch:
            raise ValueError(
                f"height ({self.height}) and width ({self.width}) must be multiples of patch ({self.patch})"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def tokens_per_frame(self) -> int:
        return (self.height // self.patch) * (self.width // self.patch)


def rope_3d(x: torch.Tensor, frame: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, L, H, D]`` by per-token (frame, row, column) positions ``[L]`` each."""
    head_dim = x.shape[-1]
    parts = [head_dim - 2 * (head_dim // 3 // 2 * 2), head_dim // 3 // 2 * 2, head_dim // 3 // 2 * 2]
    angles = []
    for size, position in zip(parts, (frame, row, col), strict=True):
        freqs = 1.0 / (10000 ** (torch.arange(0, size, 2, device=x.device, dtype=torch.float32) / size))
        angles.append(position.float()[:, None] * freqs[None, :])
    angle = torch.cat(angles, dim=-1)[None, :, None, :]  # [1, L, 1, D/2]
    pairs = x.float().unflatten(-1, (-1, 2))
    cos, sin = angle.cos(), angle.sin()
    rotated = torch.stack(
        (pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 0] * sin + pairs[..., 1] * cos), dim=-1
    )
    return rotated.flatten(-2).to(x.dtype)


class Block(nn.Module):
    def __init__(self, config: TinyDiTConfig) -> None:
        super().__init__()
        self.config = config
        self.norm1 = nn.LayerNorm(config.dim, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(config.dim, elementwise_affine=False)
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)
        self.mlp = nn.Sequential(
            nn.Linear(config.dim, 4 * config.dim), nn.GELU(), nn.Linear(4 * config.dim, config.dim)
        )
        self.modulation = nn.Linear(config.dim, 6 * config.dim)

    def forward(self, x, t_emb, positions, attention: AttentionFn, layer: int, commit: bool) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(t_emb)[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = rearrange(self.qkv(h), "b l (three h d) -> three b l h d", three=3, h=self.config.heads)
        q, k = rope_3d(q, *positions), rope_3d(k, *positions)
        attended = attention(layer, q, k, v, commit)
        x = x + gate1 * self.proj(rearrange(attended, "b l h d -> b l (h d)"))
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.mlp(h)


class TinyCausalDiT(nn.Module):
    """Chunk-wise causal video DiT over latent frames ``[B, F, C, H, W]``."""

    def __init__(self, config: TinyDiTConfig | None = None, *, seed: int = 0) -> None:
        super().__init__()
        self.config = config = config or TinyDiTConfig()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.patch_embed = nn.Conv2d(config.channels, config.dim, config.patch, stride=config.patch)
            self.time_embed = nn.Sequential(
                nn.Linear(64, config.dim), nn.SiLU(), nn.Linear(config.dim, config.dim)
            )
            self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
            self.out = nn.Linear(config.dim, config.channels * config.patch**2)
            for block in self.blocks:  # adaLN-zero would make attention invisible: keep it live
                nn.init.normal_(block.modulation.weight, std=0.02)
                with torch.no_grad():
                    weight, bias, dim = block.qkv.weight, block.qkv.bias, config.dim
                    if config.tied_qk:
                        weight[dim : 2 * dim], bias[dim : 2 * dim] = weight[:dim], bias[:dim]
                    weight[: 2 * dim] *= config.qk_gain
                    bias[: 2 * dim] *= config.qk_gain

    def positions(self, first_frame: int, frames: int, device) -> tuple[torch.Tensor, ...]:
        c = self.config
        rows, cols = c.height // c.patch, c.width // c.patch
        frame = torch.arange(first_frame, first_frame + frames, device=device).repeat_interleave(rows * cols)
        row = torch.arange(rows, device=device).repeat_interleave(cols).repeat(frames)
        col = torch.arange(cols, device=device).repeat(rows * frames)
        return frame, row, col

    def forward(
        self,
        latents: torch.Tensor,
        t: float,
        first_frame: int,
        attention: AttentionFn,
        *,
        commit: bool = False,
    ) -> torch.Tensor:
        """Predict the flow velocity of a chunk ``latents [B, F, C, H, W]`` at noise level ``t``."""
        c = self.config
        batch, frames = latents.shape[:2]
        tokens = self.patch_embed(latents.flatten(0, 1))  # [B*F, dim, h, w]
        x = rearrange(tokens, "(b f) d h w -> b (f h w) d", b=batch)
        freqs = torch.exp(-math.log(10000.0) * torch.arange(32, device=x.device) / 32)
        t_feat = torch.cat([torch.sin(t * 1000 * freqs), torch.cos(t * 1000 * freqs)])[None].expand(batch, -1)
        t_emb = self.time_embed(t_feat.to(x.dtype))
        positions = self.positions(first_frame, frames, x.device)
        for layer, block in enumerate(self.blocks):
            x = block(x, t_emb, positions, attention, layer, commit)
        patches = self.out(F.layer_norm(x, (c.dim,)))
        return rearrange(
            patches,
            "b (f h w) (c p q) -> b f c (h p) (w q)",
            f=frames,
            h=c.height // c.patch,
            p=c.patch,
            q=c.patch,
        )
