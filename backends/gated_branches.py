"""The gated layer's three branches (docs/gated.md): compressed attention over the pooled
blocks, sliding-window attention over the last ``window_tokens`` positions, and the selected
branch over each query group's blocks.

The two dense branches are plain SDPA calls (cuDNN/flash on GPUs) over views of the inputs: no
copy of the key/value history is made. The selected branch runs the scattered Triton kernel
(``selected_attention.py``) or, anywhere, ``selected_attention_gather``: a per-group gather
then a masked softmax, the kernel's plain-torch twin (it allocates ``G * top_k * block_size``
tokens per head, which the kernel never does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    if k.shape[1] != q.shape[1]:  # GQA
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def compressed_attention(
    q: torch.Tensor, k_means: torch.Tensor, v_means: torch.Tensor, num_blocks: int, *, scale: float
) -> torch.Tensor:
    """Every query attends the first ``num_blocks`` pooled blocks (no mask); the means in
    ``q``'s dtype (views: no copy)."""
    return _sdpa(q, k_means[:, :, :num_blocks], v_means[:, :, :num_blocks], scale)


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_len: int, *, window_tokens: int, scale: float
) -> torch.Tensor:
    """Every query attends positions ``[max(0, seq_len - window_tokens), seq_len)`` (no mask)."""
    start = max(0, seq_len - window_tokens)
    return _sdpa(q, k[:, :, start:seq_len], v[:, :, start:seq_len], scale)


def selected_attention_gather(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_idx: torch.Tensor,
    seq_len: torch.Tensor,
    block_size: int,
    query_group_size: int,
    scale: float,
) -> torch.Tensor:
    """The selected branch in plain torch: group ``g`` of query head ``h`` attends the tokens
    of ``block_idx[b, h // (Hq // Hkv), g]`` (``-1`` entries and tokens at or past ``seq_len``
    excluded); 0 where a group has no block. Float32 softmax, any device."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, groups = k.shape[1], block_idx.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32  # float32 softmax, or float64
    per_kv = q_heads // kv_heads
    token = block_idx.long()[..., None] * block_size + torch.arange(block_size, device=q.device)
    valid = (block_idx[..., None] >= 0) & (token < seq_len)  # [B, Hkv, G, K, bs]
    token = torch.where(valid, token, 0).flatten(-2)  # [B, Hkv, G, K * bs]
    valid = valid.flatten(-2)

    def gathered(x: torch.Tensor) -> torch.Tensor:
        index = token.flatten(2)[..., None].expand(-1, -1, -1, head_dim)
        # Where valid is False the gathered token is never weighted; zero it so that
        # whatever lies there (even NaN) has no influence.
        rows = x.gather(2, index).unflatten(2, (groups, -1)).to(acc)
        return torch.where(valid[..., None], rows, 0.0)

    keys, values = gathered(k), gathered(v)  # [B, Hkv, G, K * bs, D]
    padded = groups * query_group_size
    qg = F.pad(q.to(acc), (0, 0, 0, padded - q_len)).view(
        batch, kv_heads, per_kv, groups, query_group_size, head_dim
    )
    scores = torch.einsum("bhrgqd,bhgtd->bhrgqt", qg, keys) * scale
    scores = scores.masked_fill(~valid[:, :, None, :, None, :], float("-inf"))
    weights = torch.softmax(scores, -1)
    has_tokens = valid.any(-1)[:, :, None, :, None, None]
    weights = torch.where(has_tokens, weights, 0.0)  # a group with no token: 0, not NaN
    out = torch.einsum("bhrgqt,bhgtd->bhrgqd", weights, values)
    return out.reshape(batch, q_heads, padded, head_dim)[:, :, :q_len].to(q.dtype)
