"""Gather backend: copy each head's attended tokens into a contiguous buffer, then SDPA.

The strongest peer design we measured (docs/design.md), kept as a baseline and fallback:
per KV head, the tokens of the table's blocks and of the chunk are gathered into
``[B, Hkv, W, D]`` buffers (``W = table width * block_size + chunk_len``, static), and
``torch.nn.functional.scaled_dot_product_attention`` runs over them with a boolean mask for
table padding and the history's partial last block. The buffers are proportional to the
attended tokens (the cost the triton backend avoids). With several query groups the buffer
holds the union of the groups' blocks and the mask becomes per query (Union Explosion, made
visible). Any device, any dtype; ``return_lse`` takes an explicit float32 path (SDPA does not
return the log-sum-exp).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnimem.config import OmniMemConfig
from omnimem.selection import Selection, sorted_unique

_LSE_ROWS = 1024  # query rows per step of the log-sum-exp path (bounds its score matrix)


def gathered_tokens(
    selection: Selection, *, chunk_len: int, num_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token_idx [B, Hkv, W], token_mask [B, Hkv, G', W])``: the key positions each KV head
    gathers, and which of them each query group attends (``G' = 1`` for one query group)."""
    table, num_blocks, bs = selection.kv_block_idx, selection.num_history_blocks, selection.block_size
    if num_blocks == 1 and num_tokens is not None:  # one block: only its first num_tokens exist
        bs = min(bs, num_tokens)
    device = table.device
    grouped = table.shape[2] > 1
    if grouped:
        union = sorted_unique(torch.where(table >= 0, table, num_blocks).flatten(2), none=num_blocks)
        blocks = torch.where(union < num_blocks, union, -1)
    else:
        blocks = table[:, :, 0]
    tokens = blocks[..., None] * bs + torch.arange(bs, device=device)
    valid = (blocks[..., None] >= 0) & (tokens < selection.history_len)
    history_idx = torch.where(valid, tokens, 0).flatten(-2)
    chunk_idx = (selection.history_len + torch.arange(chunk_len, device=device)).expand(*blocks.shape[:2], -1)
    token_idx = torch.cat([history_idx, chunk_idx], dim=-1)
    if grouped:
        attended = selection.attended_block_mask()  # [B, Hkv, G, NB]
        slot_attended = attended.gather(
            -1, blocks.clamp(min=0)[:, :, None, :].expand(-1, -1, table.shape[2], -1)
        )
        history_mask = (slot_attended[..., None] & valid[:, :, None]).flatten(-2)
    else:
        history_mask = valid.flatten(-2)[:, :, None]
    chunk_mask = torch.ones(*history_mask.shape[:3], chunk_len, dtype=torch.bool, device=device)
    return token_idx, torch.cat([history_mask, chunk_mask], dim=-1)


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
    num_q_heads, q_len, head_dim = q.shape[1], q.shape[2], q.shape[3]
    heads_per_kv = num_q_heads // k.shape[1]
    token_idx, token_mask = gathered_tokens(selection, chunk_len=chunk_len, num_tokens=k.shape[2])
    index = token_idx[..., None].expand(-1, -1, -1, head_dim)
    # Padding slots gather token 0 and masked ones other tokens: zero whatever no query
    # attends, so that it has no influence at all (a masked NaN still poisons p @ v: 0 * NaN).
    used = token_mask.any(2)[..., None]  # [B, Hkv, W, 1]
    k_gathered = torch.where(used, k.gather(2, index), 0).repeat_interleave(heads_per_kv, dim=1)
    v_gathered = torch.where(used, v.gather(2, index), 0).repeat_interleave(heads_per_kv, dim=1)
    if token_mask.shape[2] > 1:  # per query group: each query row takes its group's mask
        group = (torch.arange(q_len, device=q.device) // selection.query_group_size).clamp(
            max=token_mask.shape[2] - 1
        )
        token_mask = token_mask[:, :, group]
    mask = token_mask.repeat_interleave(heads_per_kv, dim=1)  # [B, Hq, Lq or 1, W]
    if not return_lse:
        out = F.scaled_dot_product_attention(q, k_gathered, v_gathered, attn_mask=mask, scale=scale)
        return out, None
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    k_gathered, v_gathered = k_gathered.float(), v_gathered.float()
    for start in range(0, q_len, _LSE_ROWS):
        rows = slice(start, start + _LSE_ROWS)
        scores = (q[:, :, rows].float() @ k_gathered.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~mask[:, :, rows] if mask.shape[2] > 1 else ~mask, float("-inf"))
        lse[:, :, rows] = torch.logsumexp(scores, dim=-1)
        out[:, :, rows] = (torch.exp(scores - lse[:, :, rows, None]) @ v_gathered).to(q.dtype)
    return out, lse
