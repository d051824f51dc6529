"""Integration guide, in code: a Wan/Self-Forcing-style causal self-attention before and after.

``DenseCausalAttention`` is how today's AR video models call attention (DESIGN.md section 7):
RoPE on q and k, the chunk's k/v written into a per-layer cache right after the history, then
attention over the cache. ``OmniMemCausalAttention`` is the same module with the three changed
lines marked ``# omnimem``. With a budget that covers the whole history, both give the same
output (checked at the bottom), so the swap itself changes nothing but cost.

    python examples/wan_integration.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omnimem import OmniMemCache, OmniMemConfig, cached_attention
from omnimem.demo.model import rope_3d


# --8<-- [start:DenseCausalAttention]
class DenseCausalAttention(nn.Module):
    """Self-attention of one layer over a growing KV cache (the baseline)."""

    def __init__(self, dim: int, heads: int, capacity: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        # Self-Forcing keeps k/v as [B, cache_tokens, H, D] (the flash-attn layout).
        self.k_cache = torch.zeros(1, capacity, heads, self.head_dim)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.end = 0

    def forward(self, x: torch.Tensor, positions: tuple[torch.Tensor, ...], commit: bool) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).unbind(2)  # [B, L, H, D]
        q, k = rope_3d(q, *positions), rope_3d(k, *positions)  # keys are cached already rotated
        start, end = self.end, self.end + x.shape[1]
        self.k_cache[:, start:end], self.v_cache[:, start:end] = k, v
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), self.k_cache[:, :end].transpose(1, 2), self.v_cache[:, :end].transpose(1, 2)
        ).transpose(1, 2)
        if commit:  # the clean pass keeps the finished chunk's KV; denoising steps overwrite it
            self.end = end
        return self.proj(out.flatten(2))


# --8<-- [end:DenseCausalAttention]


# --8<-- [start:OmniMemCausalAttention]
class OmniMemCausalAttention(nn.Module):
    """The same layer on omnimem: the whole history kept, only the selected blocks attended."""

    def __init__(self, dim: int, heads: int, capacity: int, max_chunk_tokens: int, config: OmniMemConfig):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.cache = OmniMemCache(  # omnimem: replaces k_cache / v_cache / end
            capacity,
            max_chunk_tokens=max_chunk_tokens,
            batch=1,
            num_kv_heads=heads,
            head_dim=self.head_dim,
            config=config,
            layout="blhd",
        )

    def forward(self, x: torch.Tensor, positions: tuple[torch.Tensor, ...], commit: bool) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).unbind(2)  # [B, L, H, D]
        q, k = rope_3d(q, *positions), rope_3d(k, *positions)  # RoPE exactly as before
        out = cached_attention(q, k, v, self.cache, commit=commit)  # omnimem: write + attend (+ commit)
        return self.proj(out.flatten(2))


# --8<-- [end:OmniMemCausalAttention]


def positions_of_chunk(first_frame: int, frames: int, rows: int, cols: int) -> tuple[torch.Tensor, ...]:
    """(frame, row, column) of every token of a chunk, frame-major: the order tokens are cached."""
    f, r, c = torch.meshgrid(
        torch.arange(first_frame, first_frame + frames), torch.arange(rows), torch.arange(cols), indexing="ij"
    )
    return f.flatten(), r.flatten(), c.flatten()


@torch.no_grad()  # inference: the compiled backends have no backward
def main() -> None:
    torch.manual_seed(0)
    dim, heads, rows, cols, frames_per_chunk, chunks = 64, 4, 4, 4, 3, 6
    frame_tokens, chunk_tokens = rows * cols, frames_per_chunk * rows * cols
    capacity = chunks * chunk_tokens
    # A budget covering every block: omnimem attends the whole history, so it must equal dense.
    config = OmniMemConfig(block_size=frame_tokens, top_k=chunks * frames_per_chunk, sink_tokens=frame_tokens,
                           local_tokens=chunk_tokens)  # fmt: skip
    dense = DenseCausalAttention(dim, heads, capacity + chunk_tokens)
    sparse = OmniMemCausalAttention(dim, heads, capacity, chunk_tokens, config)
    sparse.load_state_dict(dense.state_dict(), strict=False)  # same weights
    for index in range(chunks):
        positions = positions_of_chunk(index * frames_per_chunk, frames_per_chunk, rows, cols)
        for step in range(3):  # denoising steps, then the clean pass that commits
            x = torch.randn(1, chunk_tokens, dim)
            commit = step == 2
            torch.testing.assert_close(sparse(x, positions, commit), dense(x, positions, commit))
    print(f"omnimem layer == dense layer over {chunks} chunks ({sparse.cache.history_len} history tokens)")


if __name__ == "__main__":
    main()
