"""Dense reference backend: an explicit boolean mask and a float32 (or float64) softmax.

The oracle every other backend is tested against; O(Lq * Lkv) time and memory, never the fast
path. Runs on any device.
"""

from __future__ import annotations

import torch

from omnimem.config import OmniMemConfig
from omnimem.selection import Selection, token_mask_mod


def attended_token_mask(selection: Selection, *, num_q_heads: int, q_len: int, kv_len: int, chunk_len: int):
    """``[B, Hq, Lq, Lkv]`` bool: query ``i`` of head ``h`` attends key ``t``."""
    mask_mod = token_mask_mod(selection, num_q_heads=num_q_heads, chunk_len=chunk_len)
    device = selection.kv_block_idx.device
    batch = selection.kv_block_idx.shape[0]
    b = torch.arange(batch, device=device)[:, None, None, None]
    h = torch.arange(num_q_heads, device=device)[None, :, None, None]
    q_idx = torch.arange(q_len, device=device)[None, None, :, None]
    kv_idx = torch.arange(kv_len, device=device)[None, None, None, :]
    return mask_mod(b, h, q_idx, kv_idx)


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: Selection,
    *,
    chunk_len: int,
    scale: float,
    return_lse: bool,
    config: OmniMemConfig,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    num_q_heads, q_len = q.shape[1], q.shape[2]
    kv_len = k.shape[2]
    mask = attended_token_mask(
        selection, num_q_heads=num_q_heads, q_len=q_len, kv_len=kv_len, chunk_len=chunk_len
    )
    heads_per_kv = num_q_heads // k.shape[1]
    k = k.to(compute_dtype).repeat_interleave(heads_per_kv, dim=1)
    v = v.to(compute_dtype).repeat_interleave(heads_per_kv, dim=1)
    # Keys/values no query attends are zeroed so unwritten buffer space cannot leak through 0 * x.
    used = mask.any(dim=2, keepdim=True).transpose(-1, -2)
    v = torch.where(used, v, 0)
    scores = (q.to(compute_dtype) @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.exp(scores - lse[..., None]) @ v
    return out.to(q.dtype), (lse.float() if return_lse else None)
