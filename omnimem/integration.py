"""Adapters for AR video models: the lines that replace a causal DiT's cached attention call.

A Self-Forcing/LongLive-style ``CausalWanSelfAttention.forward`` writes the chunk's roped keys
into a fixed cache, reads the cache end index back with ``.item()`` (a host sync per layer),
and attends a truncated local window::

    kv_cache["k"][:, local_start:local_end] = roped_key
    kv_cache["v"][:, local_start:local_end] = v
    x = flash_attention(
        roped_query,
        kv_cache["k"][:, max(0, local_end - max_attention_size):local_end],
        kv_cache["v"][:, max(0, local_end - max_attention_size):local_end],
    )

With omnimem each layer owns an ``OmniMemCache`` (``OmniMemCache.for_layers``) and the three
statements become one; the whole history is kept, nothing is copied or synced::

    x = cached_attention(roped_query, roped_key, v, caches[layer], commit=is_clean_pass)

where ``is_clean_pass`` is true for the extra forward at timestep ~0 that writes the finished
chunk's KV (Self-Forcing's cache update), false for the denoising steps.
"""

from __future__ import annotations

import torch

from omnimem.sparse.cache import OmniMemCache


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: OmniMemCache,
    *,
    commit: bool = False,
) -> torch.Tensor:
    """OmniMem attention of a chunk in the Wan/flash-attn layout, through a layer's cache.

    Args:
        q: ``[B, L, Hq, D]`` the chunk's queries after RoPE.
        k: ``[B, L, Hkv, D]`` the chunk's keys after RoPE, in the cache's dtype and device.
            RoPE positions are the chunk's absolute frame positions, as with a dense cache:
            keys are stored already rotated.
        v: ``[B, L, Hkv, D]`` the chunk's values.
        cache: this layer's ``OmniMemCache``.
        commit: also append ``k, v`` to the history after attending (the clean final pass).

    Returns:
        ``[B, L, Hq, D]`` (a transposed view of the ``[B, Hq, L, D]`` result).

    Raises:
        ValueError: a non-4-D input, a chunk longer than ``max_chunk_tokens``, mismatched
            shapes or devices, or a commit past the cache's capacity.
        TypeError: inputs not in the cache's dtype.

    Example:
        >>> import torch
        >>> from omnimem import OmniMemConfig
        >>> from omnimem.sparse.cache import OmniMemCache
        >>> from omnimem.integration import cached_attention
        >>> config = OmniMemConfig(block_size=8, backend="dense")
        >>> caches = OmniMemCache.for_layers(2, 64, max_chunk_tokens=8, batch=1, num_kv_heads=4,
        ...                                  head_dim=16, config=config, layout="blhd")
        >>> q = k = v = torch.randn(1, 8, 4, 16)   # [B, L, H, D]
        >>> cached_attention(q, k, v, caches[0]).shape
        torch.Size([1, 8, 4, 16])
        >>> _ = cached_attention(q, k, v, caches[0], commit=True)
        >>> caches[0].history_len, caches[1].history_len
        (8, 0)
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(
                f"{name} must be a 4-D [B, L, H, D] tensor, got {getattr(x, 'shape', type(x).__name__)}"
            )
    k_chunk, v_chunk = k.transpose(1, 2), v.transpose(1, 2)
    out = cache.attend(q.transpose(1, 2), k_chunk, v_chunk)
    if commit:
        cache.commit(k_chunk, v_chunk)
    return out.transpose(1, 2)
