"""Fake checkouts for ``benchmarks/their_models_gpu.py``'s CI test (``tests/fake_codebase/<name>``,
laid out as the script expects): a ``CausalWanModel`` with Self-Forcing's constructor and
inference call (latents, timesteps, text, cache dicts, ``current_start``, ``cache_start``),
built from the stand-in blocks of ``tests/causal_wan_standin.py`` (written from their public
signatures, not their code). Rolling Forcing's and CausVid's fakes subclass it."""

from __future__ import annotations

import math

import torch
from torch import nn

from omnimem.gated.wan import wan_rope_freqs
from tests.causal_wan_standin import StandinBlock


class CausalWanModel(nn.Module):
    def __init__(self, model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=2048,
                 ffn_dim=8192, freq_dim=256, text_dim=4096, out_dim=16, num_heads=16, num_layers=32,
                 local_attn_size=-1, sink_size=0, qk_norm=True, cross_attn_norm=True, eps=1e-6):  # fmt: skip
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=patch_size, stride=patch_size)
        self.blocks = nn.ModuleList(self.block(dim, num_heads) for _ in range(num_layers))
        self.head = nn.Linear(dim, out_dim * math.prod(patch_size))
        self.freqs = wan_rope_freqs(dim // num_heads)

    @staticmethod
    def block(dim: int, num_heads: int) -> nn.Module:
        return StandinBlock(dim, num_heads, window=32760)

    def forward(self, x, t, context, seq_len, kv_cache=None, crossattn_cache=None, current_start=0,
                cache_start=None, **extra):  # fmt: skip
        x = self.patch_embedding(x)
        grid_sizes = torch.tensor([x.shape[2:]])
        x = x.flatten(2).transpose(1, 2)
        for block, cache in zip(self.blocks, kv_cache, strict=True):
            x = block(x, grid_sizes, self.freqs, cache, current_start, **extra)
        return self.head(x)
