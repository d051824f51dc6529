"""Scattered-block attention over a quantized history, read in place: the launcher of the
scattered kernels with a store, and its plain-torch twin (``quantized_attention_reference``).

The history's whole blocks live in a ``QuantizedBlocks`` store (``omnimem.store``: fp8 e4m3
with a scale per block and head, or int4 codes with KIVI's scales); the history's partial last
block and the current chunk are native rows of a small *tail* buffer. The tuned
Triton-language kernel (``triton_attention``) runs with the store: a selected whole block is read
as its quantized bytes and decoded in registers (``quantized_tiles``). On Hopper the
warp-specialized kernel (``gluon_attention``) runs instead where it is the faster
(``GLUON_FORMATS``) or is asked for (``kernel="gluon"``): its producer warpgroup brings a
selected block's code bytes into shared memory and dequantizes them there for the
tensor cores. Neither makes a native copy of the history or of the selection's blocks.
"""

from __future__ import annotations

import functools
import logging

import torch

from omnimem.backends.quantized_tiles import check_kernel_device
from omnimem.store.blocks import QuantizedBlocks
from omnimem.store.formats import QuantizedKV, dequantize


def quantized_attention(
    q: torch.Tensor,
    store: QuantizedBlocks,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    *,
    block_idx: torch.Tensor,
    num_blocks: torch.Tensor,
    block_attended: torch.Tensor | None,
    history_len: int | torch.Tensor,
    chunk_len: int,
    query_group_size: int,
    scale: float,
    return_lse: bool,
    block_m: int = 128,
    kernel: str = "auto",
    **options: object,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the scattered kernel over a quantized history: on Hopper the warp-specialized one
    (``gluon_attention``, its producer warpgroup) where it is the faster (``GLUON_FORMATS``)
    and qualifies, else ``triton_attention``'s (docs/memory.md, "The Gluon kernel over
    quantized tiles").

    ``q [B, Hq, Lq, D]``; the history's whole blocks ``[0, history_len // block_size)`` in
    ``store``; ``tail_k``/``tail_v [B, Hkv, T, D]`` (any strides): the history's partial last
    block, then the ``chunk_len`` chunk tokens. ``block_idx [B, Hkv, T, W]`` ascending history
    block indices per query tile (``T = ceil(Lq / block_m)``) or one row for all (``T = 1``),
    ``num_blocks [B, Hkv, T]`` valid; ``block_attended [B, Hkv, G, NB]`` per query group
    (``None``: one group). See ``omnimem.backends.triton.tile_tables``. ``history_len``: an int
    or a 0-d integer tensor on ``q``'s device. ``options``: ``scattered_attention``'s tuning
    keywords (``block_n``, ``num_warps``, ``num_stages``, ``use_tma``, ``num_sms``,
    ``rotation``): the Triton-language kernel's. ``kernel``: ``"auto"`` (the faster one
    as measured, where it can run; why not is logged once), ``"triton"``, or ``"gluon"`` (a
    ``ValueError`` saying why where it cannot run).
    """
    from omnimem.backends.triton_attention import default_num_sms, scattered_attention

    if kernel not in ("auto", "triton", "gluon"):
        raise ValueError(f"kernel must be 'auto', 'triton' or 'gluon', got {kernel!r}")
    check_kernel_device(store.kv_format, q.device)
    if not isinstance(history_len, torch.Tensor):
        history_len = torch.full((), history_len, dtype=torch.int64, device=q.device)
    if kernel == "gluon" or (
        kernel == "auto" and store.kv_format in GLUON_FORMATS and q.device.type == "cuda"
    ):
        reason = _gluon_skip_reason(q, store, tail_k, tail_v, block_idx, block_attended, block_m, options)
        if reason is not None and kernel == "gluon":
            raise ValueError(f"kernel='gluon' cannot run this call: {reason}")
        if reason is not None:
            _say_skipped(store.kv_format, reason)
            return quantized_attention(
                q, store, tail_k, tail_v, block_idx=block_idx, num_blocks=num_blocks,
                block_attended=block_attended, history_len=history_len, chunk_len=chunk_len,
                query_group_size=query_group_size, scale=scale, return_lse=return_lse, block_m=block_m,
                kernel="triton", **options,
            )  # fmt: skip
        from omnimem.backends.gluon_attention import scattered_attention as gluon_attention

        return gluon_attention(
            q, tail_k, tail_v, block_idx=block_idx, num_blocks=num_blocks, history_len=history_len,
            chunk_len=chunk_len, block_size=store.block_size, scale=scale, return_lse=return_lse,
            num_sms=default_num_sms(q.device), store=store,
        )  # fmt: skip
    return scattered_attention(
        q, tail_k, tail_v, block_idx=block_idx, num_blocks=num_blocks, block_attended=block_attended,
        history_len=history_len, chunk_len=chunk_len, block_size=store.block_size,
        query_group_size=query_group_size, scale=scale, return_lse=return_lse, block_m=block_m, store=store,
        **options,
    )  # fmt: skip


# Formats whose quantized call ``kernel="auto"`` runs on the Gluon kernel: both, since the
# word-level decoders (fp8 exact codes scaled by the consumers, int4 unpacked a word at a time):
# fp8 1.147 ms against the Triton-language kernel's 1.198, int4 1.165 against 1.707 (H100,
# 2026-12-07, kv_formats_gpu.py --quick; docs/memory.md).
GLUON_FORMATS: frozenset[str] = frozenset({"fp8", "int4"})


@functools.cache
def _say_skipped(kv_format: str, reason: str) -> None:
    """Once per reason: why a quantized call runs the Triton-language kernel, not the Gluon one."""
    logging.getLogger("omnimem").info(
        "quantized history (%s): the Triton-language kernel, not the Hopper Gluon kernel: %s",
        kv_format, reason,
    )  # fmt: skip


def _gluon_skip_reason(q, store, tail_k, tail_v, block_idx, block_attended, block_m, options) -> str | None:
    """Why the Gluon kernel cannot run a quantized call (``None``: it can)."""
    from omnimem.backends.triton import hopper_kernel

    hopper = hopper_kernel()
    if hopper is None:
        return "this triton has no Gluon for Hopper"
    if options.get("rotation") is not None:
        return "relative positions rotate the keys inside the Triton-language kernel"
    tuned = sorted(name for name, value in options.items() if value is not None and value is not False)
    if tuned:
        return f"Triton-language tuning options {tuned}"
    if block_m != 128 or block_idx.shape[2] != 1:
        return "per-tile block tables"
    return hopper.skip_reason(q, tail_k, tail_v, block_size=store.block_size,
                              grouped=block_attended is not None, store=store)  # fmt: skip


def dequantized_history(
    store: QuantizedBlocks,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    *,
    history_len: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values the kernel reads, as one native ``[B, Hkv, L, D]`` pair in ``dtype``:
    the store's whole blocks dequantized, then the tail (the reference path: it materializes)."""
    whole = history_len // store.block_size * store.block_size
    out = []
    for role, data, scale, minimum, tail in (
        ("key", store.k, store.k_scale, store.k_min, tail_k),
        ("value", store.v, store.v_scale, store.v_min, tail_v),
    ):
        blocks = whole // store.block_size
        if store.kv_format == "int4" and role == "value":
            scale, minimum = scale[:, :, :whole], minimum[:, :, :whole]
        else:
            scale = scale[:, :, :blocks]
            minimum = None if minimum is None else minimum[:, :, :blocks]
        q = QuantizedKV(
            store.kv_format, role, store.block_size, store.head_dim, data[:, :, :whole], scale, minimum
        )
        out.append(torch.cat([dequantize(q, dtype), tail.to(dtype)], dim=2))
    return out[0], out[1]


def fp8_queries(q: torch.Tensor) -> torch.Tensor:
    """The queries with which fp8 key codes are multiplied on the tensor cores (the Gluon
    kernel's ``FP8_KEY_PRODUCTS``), as values of ``q``'s dtype (exact in float32 and float64,
    the twin's): each row (one query of one head, ``[..., D]``) rounded to float8 e4m3 under one
    float32 scale, ``amax / 448`` (1 for an all-zero row), computed in float32 as the kernel does.

    >>> q = torch.tensor([[1.0, 0.3, -2.0]])
    >>> fp8_queries(q)  # scale 2/448: 0.3 is 67.2 of them, whose nearest e4m3 value is 64
    tensor([[ 1.0000,  0.2857, -2.0000]])
    """
    x = q.float()
    amax = x.abs().amax(-1, keepdim=True)
    amax = torch.where(amax > 0, amax, 448.0)
    codes = (x * (448.0 / amax)).to(torch.float8_e4m3fn)
    return codes.to(q.dtype) * (amax * (1.0 / 448.0)).to(q.dtype)


def quantized_attention_reference(
    q: torch.Tensor,
    store: QuantizedBlocks,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    selection,
    *,
    history_len: int,
    chunk_len: int,
    scale: float,
    return_lse: bool = False,
    fp8_key_products: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The kernel's plain-torch twin: ``dequantized_history`` (in ``q``'s dtype, float64 for a
    float64 reference), then the dense backend with ``selection`` (history block numbering).

    ``fp8_key_products``: the twin of the Gluon kernel's ``FP8_KEY_PRODUCTS`` (fp8 stores): the
    store's whole blocks are scored against ``fp8_queries(q)``, the tail against ``q``. (One
    dense call: queries ``[fp8_queries(q), q]`` against keys ``[k, 0]`` in the whole blocks and
    ``[0, k]`` in the tail.)"""
    from omnimem.backends import dense
    from omnimem.config import OmniMemConfig

    length = history_len % store.block_size + chunk_len
    k, v = dequantized_history(store, tail_k[:, :, :length], tail_v[:, :, :length], history_len=history_len,
                               dtype=q.dtype)  # fmt: skip
    if fp8_key_products:
        if store.kv_format != "fp8":
            raise ValueError(f"fp8_key_products needs an fp8 store, got kv_format={store.kv_format!r}")
        whole = history_len - history_len % store.block_size
        coded = (torch.arange(k.shape[2], device=k.device) < whole)[:, None]
        q = torch.cat([fp8_queries(q), q], dim=-1)
        k = torch.cat([k * coded, k * ~coded], dim=-1)
    out, lse = dense.forward(q, k, v, selection, chunk_len=chunk_len, scale=scale, return_lse=True,
                             config=OmniMemConfig())  # fmt: skip
    return (out, lse) if return_lse else out
