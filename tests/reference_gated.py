"""An independent, loop-based float64 implementation of the gated OmniMem layer (DESIGN.md
section 8; docs/gated.md states the exact semantics).

Written from the text with Python lists and sorted(): it shares no code with
``omnimem.gated.attention``, ``omnimem.selection`` or the backends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class GatedReference:
    out: torch.Tensor  # [B, Hq, Lq, D] float64: the gated sum
    compressed: torch.Tensor  # [B, Hq, Lq, D] float64
    selected: torch.Tensor  # [B, Hq, Lq, D] float64 (zero rows where a group selected nothing)
    window: torch.Tensor  # [B, Hq, Lq, D] float64
    selected_blocks: dict  # (b, kv_head, group) -> selected blocks, best first
    margin: float  # smallest score gap at a top-k boundary (near-ties make float32 differ)


def _softmax_attend(q_rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float):
    if keys.shape[0] == 0:
        return torch.zeros(q_rows.shape[0], values.shape[-1], dtype=torch.float64)
    return torch.softmax(q_rows @ keys.T * scale, -1) @ values


def reference_gated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor,
    *,
    history_len: int,
    block_size: int = 30,
    query_group_size: int = 15,
    top_k: int = 16,
    window_tokens: int = 14040,
    candidates: str = "chunks",
    exclude_window_chunks: int = 3,
    exclude_sink_chunks: int = 0,
    progressive_exclude: bool = True,
    scale: float | None = None,
    selected_k: torch.Tensor | None = None,
    selected_v: torch.Tensor | None = None,
) -> GatedReference:
    """``selected_k``/``selected_v``: what the selected branch reads, if not ``k``/``v`` (a
    quantized history: dequantized blocks); block means, selection and the window read ``k``/``v``."""
    q, k, v, gates = q.double().cpu(), k.double().cpu(), v.double().cpu(), gates.double().cpu()
    slc_k = k if selected_k is None else selected_k.double().cpu()
    slc_v = v if selected_v is None else selected_v.double().cpu()
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads = k.shape[1]
    per_kv = q_heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    end = history_len + q_len  # the chunk's end: positions past it are never read
    num_blocks = math.ceil(end / block_size)
    blocks = [range(j * block_size, min((j + 1) * block_size, end)) for j in range(num_blocks)]
    window_start = max(0, end - window_tokens)
    before_window = [j for j in range(num_blocks) if blocks[j][-1] < window_start]
    if candidates == "awe" and len(before_window) >= top_k:
        allowed = before_window
    elif candidates == "chunks":
        # The authors' rule: chunks of q_len tokens; this call is chunk history_len // q_len, a
        # block belongs to the chunk of its first token. Blocks past chunk `chunk` (only when
        # history_len is not a whole number of chunks) are the current chunk's tail.
        chunk = history_len // q_len
        excluding = not progressive_exclude or chunk >= exclude_sink_chunks + exclude_window_chunks
        allowed = []
        for j in range(num_blocks):
            block_chunk = blocks[j][0] // q_len
            in_sink = block_chunk < exclude_sink_chunks
            in_window = exclude_window_chunks > 0 and block_chunk >= chunk - exclude_window_chunks + 1
            if not (excluding and (in_sink or in_window)):
                allowed.append(j)
    else:
        allowed = list(range(num_blocks))
    group = min(query_group_size, q_len)
    groups = [range(s, min(s + group, q_len)) for s in range(0, q_len, group)]

    cmp_out = torch.zeros(batch, q_heads, q_len, head_dim, dtype=torch.float64)
    slc_out, swa_out = torch.zeros_like(cmp_out), torch.zeros_like(cmp_out)
    selected_blocks = {}
    margin = math.inf
    for b in range(batch):
        for kvh in range(kv_heads):
            mean_k = torch.stack([k[b, kvh, list(t)].mean(0) for t in blocks])
            mean_v = torch.stack([v[b, kvh, list(t)].mean(0) for t in blocks])
            heads = range(kvh * per_kv, (kvh + 1) * per_kv)
            for h in heads:
                cmp_out[b, h] = _softmax_attend(q[b, h], mean_k, mean_v, scale)
                window = list(range(window_start, end))
                swa_out[b, h] = _softmax_attend(q[b, h], k[b, kvh, window], v[b, kvh, window], scale)
            for g, rows in enumerate(groups):
                score = {j: 0.0 for j in allowed}
                for h in heads:
                    mean_q = q[b, h, list(rows)].mean(0)
                    for j in allowed:
                        score[j] += float(mean_q @ mean_k[j]) * scale
                ranked = sorted(allowed, key=lambda j: (-score[j], j))
                chosen = ranked[:top_k]
                if len(chosen) < len(ranked):
                    margin = min(margin, score[chosen[-1]] - score[ranked[len(chosen)]])
                selected_blocks[b, kvh, g] = chosen
                tokens = sorted(t for j in chosen for t in blocks[j])
                for h in heads:
                    slc_out[b, h, list(rows)] = _softmax_attend(
                        q[b, h, list(rows)], slc_k[b, kvh, tokens], slc_v[b, kvh, tokens], scale
                    )
    g_cmp, g_slc, g_swa = gates.unbind(-1)
    out = g_cmp[..., None] * cmp_out + g_slc[..., None] * slc_out + g_swa[..., None] * swa_out
    return GatedReference(out, cmp_out, slc_out, swa_out, selected_blocks, margin)
