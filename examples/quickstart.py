"""The ten-line example of the docs' Getting started page (CPU, about a second and a half)."""

import torch

from omnimem import OmniMemConfig, sparse_attention

config = OmniMemConfig(block_size=64, top_k=4, sink_tokens=64, local_tokens=192)
q = torch.randn(1, 4, 192, 64)  # [B, H, Lq, D]: the current chunk's queries
k = torch.randn(1, 4, 2048 + 192, 64)  # [B, H, history + chunk, D]: the whole history, then the chunk
v = torch.randn(1, 4, 2048 + 192, 64)
out = sparse_attention(q, k, v, config=config)  # attends sink + local window + 4 retrieved blocks per head
print(out.shape)  # torch.Size([1, 4, 192, 64])
