"""An independent, loop-based float64 implementation of DESIGN.md section 2.

Written from the contract's text with Python sets and sorted(): it shares no code with
``omnimem.selection`` or the backends, so agreement between the two means something.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class ReferenceResult:
    out: torch.Tensor  # [B, Hq, Lq, D] float64
    lse: torch.Tensor  # [B, Hq, Lq] float64
    attended_blocks: dict  # (b, kv_head, group) -> sorted list of attended history blocks
    selected_blocks: dict  # (b, kv_head, group) -> list of selected blocks, rank order
    margin: float  # smallest score gap at a top-k boundary (near-ties make float32 differ)


def _blocks_touching(lo: int, hi: int, history_len: int, block_size: int) -> set[int]:
    """History blocks with at least one token in [lo, hi)."""
    lo, hi = max(lo, 0), min(hi, history_len)
    if lo >= hi:
        return set()
    return set(range(lo // block_size, (hi - 1) // block_size + 1))


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    history_len: int,
    chunk_len: int | None = None,
    block_size: int,
    top_k: int,
    sink_tokens: int = 0,
    local_tokens: int = 0,
    exclusion_tokens: int | None = None,
    window_exclusion: str = "adaptive",
    query_group_size: int | None = None,
    scale: float | None = None,
) -> ReferenceResult:
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads = k.shape[1]
    group_heads = q_heads // kv_heads
    chunk_len = q_len if chunk_len is None else chunk_len
    scale = head_dim**-0.5 if scale is None else scale
    exclusion_tokens = local_tokens if exclusion_tokens is None else exclusion_tokens
    group_size = q_len if query_group_size is None else min(query_group_size, q_len)
    num_groups = math.ceil(q_len / group_size)
    num_blocks = math.ceil(history_len / block_size)

    sink = _blocks_touching(0, sink_tokens, history_len, block_size)
    local = _blocks_touching(history_len - local_tokens, history_len, history_len, block_size) - sink
    window = (
        _blocks_touching(history_len - exclusion_tokens, history_len, history_len, block_size) - sink
    ) | local
    far = set(range(num_blocks)) - sink - local - window

    out = torch.zeros(batch, q_heads, q_len, head_dim, dtype=torch.float64)
    lse = torch.zeros(batch, q_heads, q_len, dtype=torch.float64)
    attended_blocks, selected_blocks = {}, {}
    margin = math.inf
    for b in range(batch):
        for kvh in range(kv_heads):
            mean_k = {}
            for j in range(num_blocks):
                tokens = range(j * block_size, min((j + 1) * block_size, history_len))
                mean_k[j] = sum(k[b, kvh, t] for t in tokens) / len(tokens)
            for g in range(num_groups):
                queries = range(g * group_size, min((g + 1) * group_size, q_len))
                score = {j: 0.0 for j in range(num_blocks)}
                for h in range(kvh * group_heads, (kvh + 1) * group_heads):
                    mean_q = sum(q[b, h, i] for i in queries) / len(queries)
                    for j in range(num_blocks):
                        score[j] += float(mean_q @ mean_k[j]) * scale

                if window_exclusion == "never":
                    ranked = sorted(far | window, key=lambda j: (-score[j], j))
                    tiers = [ranked]
                elif window_exclusion == "always":
                    tiers = [sorted(far, key=lambda j: (-score[j], j))]
                else:
                    tiers = [
                        sorted(far, key=lambda j: (-score[j], j)),
                        sorted(window, key=lambda j: (-score[j], j)),
                    ]
                chosen: list[int] = []
                for ranked in tiers:
                    take = ranked[: top_k - len(chosen)]
                    if 0 < len(take) < len(ranked):
                        margin = min(margin, score[take[-1]] - score[ranked[len(take)]])
                    chosen += take
                selected_blocks[b, kvh, g] = chosen
                blocks = sorted(sink | local | set(chosen))
                attended_blocks[b, kvh, g] = blocks

                tokens = [
                    t for j in blocks for t in range(j * block_size, min((j + 1) * block_size, history_len))
                ]
                tokens += list(range(history_len, history_len + chunk_len))
                idx = torch.tensor(tokens, dtype=torch.long)
                rows = torch.tensor(list(queries), dtype=torch.long)
                for h in range(kvh * group_heads, (kvh + 1) * group_heads):
                    logits = (q[b, h, rows] @ k[b, kvh, idx].T) * scale
                    lse[b, h, rows] = torch.logsumexp(logits, -1)
                    out[b, h, rows] = torch.softmax(logits, -1) @ v[b, kvh, idx]
    return ReferenceResult(out, lse, attended_blocks, selected_blocks, margin)


def stored_history(x: torch.Tensor, upto: int, kv_format: str, role: str, block_size: int) -> torch.Tensor:
    """What a ``kv_format`` cache reads back of ``x [B, H, L, D]``: the whole blocks before
    ``upto`` quantized then dequantized (``omnimem.store.formats``, the reference of the
    formats themselves, held to float64 bounds by their property tests), the rest as is."""
    from omnimem.store.formats import dequantize, quantize

    cut = upto - upto % block_size
    if cut == 0:
        return x
    kept = dequantize(quantize(x[:, :, :cut], kv_format, role=role, block_size=block_size), x.dtype)
    return torch.cat([kept, x[:, :, cut:]], dim=2)


def relative_frame_rule(frames: list[int], window_frame: int, rank: int) -> list[int]:
    """``omnimem.positions``' rule for one KV head's attended history tokens, with sets."""
    covered = {f for f in frames if f < window_frame}
    return [
        rank - sum(d >= f for d in covered) if f < window_frame else rank + f - window_frame for f in frames
    ]


def relative_attention_reference(
    q, k_all, v_all, *, history: int, chunk_len: int, config, time, k_select=None
) -> torch.Tensor:
    """What ``OmniMemCache(positions=time)`` returns for a chunk at ``history``, in float64 from
    the rule: the library's selection (held to its own reference elsewhere), then per KV head its
    attended blocks' tokens (the union over query groups) at the rule's positions, per query its
    group's blocks and the chunk. ``k_select``: the keys selection reads, when they are not the
    ones attended (a quantized cache's native keys)."""
    from omnimem import select_blocks
    from omnimem.positions import reserve

    q, k_all, v_all = q.double(), k_all.double(), v_all.double()
    batch, q_heads, length, head_dim = q.shape
    kv_heads, bs, tpf = k_all.shape[1], config.block_size, time.frame_tokens
    window = max(history - config.local_tokens, 0) // tpf
    chunk = list(range(history, history + chunk_len))
    out = torch.zeros_like(q)
    if history:
        keys = k_all if k_select is None else k_select.double()  # a quantized cache selects on native keys
        sel = select_blocks(q, keys, history_len=history, chunk_len=chunk_len, config=config)
        table, group_size = sel.kv_block_idx, sel.query_group_size
        width = max(1, min(table.shape[2] * table.shape[3], history // bs))
        rank = reserve(window, width * bs + history % bs, bs, tpf)
    else:
        table, group_size, rank = None, length, 0
    scale = config.scale or head_dim**-0.5
    for b in range(batch):
        for hk in range(kv_heads):
            blocks = sorted({int(x) for x in table[b, hk].flatten() if x >= 0}) if history else []
            tokens = [t for x in blocks for t in range(x * bs, min(x * bs + bs, history))]
            where = dict(
                zip(tokens, relative_frame_rule([t // tpf for t in tokens], window, rank), strict=True)
            )
            for head in range(hk * (q_heads // kv_heads), (hk + 1) * (q_heads // kv_heads)):
                for i in range(length):
                    mine = set()
                    if history:
                        group = min(i // group_size, table.shape[2] - 1)
                        mine = {int(x) for x in table[b, hk, group] if x >= 0}
                    attended = [t for t in tokens if t // bs in mine] + chunk
                    pos = torch.tensor([where.get(t, rank + t // tpf - window) for t in attended])
                    qi = time.rotate(
                        q[b, head, i][None, None, None], torch.tensor([rank + (history + i) // tpf - window])
                    )
                    ki = time.rotate(k_all[b, hk, attended][None, None], pos)
                    weights = ((qi @ ki.transpose(-1, -2)) * scale).softmax(-1)
                    out[b, head, i] = (weights @ v_all[b, hk, attended][None, None])[0, 0, 0]
    return out
