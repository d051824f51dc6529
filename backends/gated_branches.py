"""The gated layer's three branches (docs/gated.md): compressed attention over the pooled
blocks, sliding-window attention over the last ``window_tokens`` positions, and the selected
branch over each query group's blocks.

The two dense branches attend contiguous ranges of keys, views of the inputs (no copy of the
key/value history is made): on Hopper, for inference in float16/bfloat16 over at least
``HOPPER_MIN_KEYS`` keys, through the warp-specialized Gluon kernel of the ``triton`` backend
(``gluon_attention.py``) given an empty block table and the range as its chunk, which is 8-13%
faster than cuDNN there (docs/gated.md, "Dense branches"); otherwise (gradients, other GPUs,
other dtypes and head dims, fewer keys) SDPA (cuDNN/flash on GPUs). The selected branch runs
the scattered Triton kernel (``selected_attention.py``) or, anywhere,
``selected_attention_gather``: a per-group gather then a masked softmax, the kernel's
plain-torch twin (it allocates ``G * top_k * block_size`` tokens per head, which the kernel
never does).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

# From this many keys the Hopper kernel beats cuDNN on a dense branch (H200, 4,680 bfloat16
# queries, 12 heads of 128: 1,092 keys 0.096 vs 0.074 ms, 3,276 even, 12,480 0.62 vs 0.70;
# benchmarks/dense_branches_gpu.py). Below it the kernel's launch (descriptors, tables) and
# its 128-key tiles cost more than they save.
HOPPER_MIN_KEYS = 4096
# Whether the dense branches may take the Hopper kernel at all (benchmarks turn it off).
HOPPER_DENSE = True


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    if _hopper_runs(q, k, v):
        return _hopper_dense(q, k, v, scale)
    if k.shape[1] != q.shape[1]:  # GQA
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _hopper_runs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether a dense branch over ``k``/``v`` runs the Hopper kernel (forward only: it has no
    backward of its own). Says once per reason why it is skipped where it could pay."""
    if not (HOPPER_DENSE and q.is_cuda and k.shape[2] >= HOPPER_MIN_KEYS):
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    from omnimem.backends.triton import hopper_kernel

    hopper = hopper_kernel()
    reason = (
        "this triton has no Gluon for Hopper"
        if hopper is None
        else hopper.skip_reason(q, k, v, block_size=hopper.BLOCK_N, grouped=False)
    )
    if reason is not None:
        _say_skipped(reason)
    return reason is None


@functools.cache
def _say_skipped(reason: str) -> None:
    logging.getLogger("omnimem").info(
        "gated layer: the dense branches run SDPA; the faster Hopper Gluon kernel is skipped: %s", reason
    )


def _hopper_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *, stages: int = 3
) -> torch.Tensor:
    """Every query attends every key of ``k``/``v``: the scattered kernel with no history
    blocks and all of ``k`` as its chunk."""
    from omnimem.backends.gluon_attention import BLOCK_N, scattered_attention
    from omnimem.backends.triton_attention import default_num_sms

    batch, kv_heads = k.shape[:2]
    # One fill for the empty tables (a zero per (batch, head): no blocks; the table's one
    # unread entry) and the history length 0.
    zeros = torch.zeros(2 * batch * kv_heads + 1, device=q.device, dtype=torch.int32)
    return scattered_attention(
        q, k, v,
        block_idx=zeros[: batch * kv_heads].view(batch, kv_heads, 1, 1),
        num_blocks=zeros[batch * kv_heads : 2 * batch * kv_heads].view(batch, kv_heads, 1),
        history_len=zeros[-1], chunk_len=k.shape[2], block_size=BLOCK_N, scale=scale, return_lse=False,
        num_sms=default_num_sms(q.device), stages=stages,
    )[0]  # fmt: skip


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
