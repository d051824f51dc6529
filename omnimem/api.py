"""Public entry points: ``sparse_attention``, ``select_blocks`` and backend choice."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import os
from collections.abc import Iterator

import torch

from omnimem.backends import get_backend
from omnimem.checks import Layout, check_attention_inputs, check_key_block_sums, check_selection, layout_of
from omnimem.config import BACKEND_NAMES, OmniMemConfig
from omnimem.selection import Selection, select
from omnimem.store.index import Int8BlockSums

BACKEND_ENV_VAR = "OMNIMEM_BACKEND"
_DEFAULT_CONFIG = OmniMemConfig()
_backend_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "omnimem_backend", default=None
)


def _check_backend_name(name: object, source: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"{source} must be one of {BACKEND_NAMES}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ``sparse_attention`` calls inside the block on backend ``name``.

    Takes effect where the config says ``backend="auto"`` (a backend named in the config wins);
    beats the ``OMNIMEM_BACKEND`` environment variable. Nests, and is thread- and task-local.

    Example:
        >>> import torch, omnimem
        >>> q = k = v = torch.randn(1, 2, 8, 16)
        >>> with omnimem.use_backend("dense"):
        ...     out = omnimem.sparse_attention(q, k, v)
        >>> out.shape
        torch.Size([1, 2, 8, 16])
    """
    token = _backend_override.set(_check_backend_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _backend_override.reset(token)


def resolve_backend(
    config: OmniMemConfig,
    device: torch.device,
    *,
    dtype: torch.dtype | None = None,
    head_dim: int | None = None,
) -> str:
    """The concrete backend a call with ``config`` on ``device`` runs on.

    Precedence: ``config.backend``, then ``use_backend``, then ``OMNIMEM_BACKEND``; the first
    that is not ``"auto"`` wins. ``"auto"`` picks by what ``benchmarks/backends_gpu.py
    --auto-check`` measured (H100, docs/benchmarks.md), per shape class of the inputs:

    - CUDA, compute capability >= 9 (TMA), float16/bfloat16, ``head_dim`` 64 or 128, one query
      group: ``"triton"`` (0.76 ms with its Hopper Gluon kernel vs flex 1.12 ms and gather+cuDNN
      0.93 ms at wan-1.3b 60 s, no compile step);
    - CUDA, float32: ``"gather"`` (11.7 ms vs flex 92 ms and triton's IEEE-float32 dots 493 ms);
    - every other CUDA class (older GPUs: triton without TMA measured slower than flex; other
      head dims; query groups): ``"flex"``;
    - CPU: ``"gather"`` (no compile step; on a 2-core CPU, 4 heads of 32, chunks of 192-768
      queries, 4.6k-31k history tokens: 1.4-17 ms against compiled flex 3.7-15 ms, eager flex
      47-1,750 ms and SDPA over the whole history 3-74 ms; docs/backends.md).

    ``dtype``/``head_dim`` describe the query (``None``: unknown, which gives ``"flex"`` on
    CUDA).
    """
    for name, source in (
        (config.backend, "OmniMemConfig.backend"),
        (_backend_override.get(), "use_backend(name)"),
        (os.environ.get(BACKEND_ENV_VAR) or None, f"the {BACKEND_ENV_VAR} environment variable"),
    ):
        if name is not None and _check_backend_name(name, source) != "auto":
            return name
    choice, why = _auto_choice(config, device, dtype, head_dim)
    _say_auto(device.type, dtype, head_dim, config.query_group_size is not None, choice, why)
    return choice


def _auto_choice(
    config: OmniMemConfig, device: torch.device, dtype: torch.dtype | None, head_dim: int | None
) -> tuple[str, str]:
    if device.type != "cuda":
        return "gather", "the fastest measured on CPU"
    if config.query_group_size is not None:
        return "flex", "query groups: the Hopper kernel takes one group"
    if dtype == torch.float32:
        return "gather", "float32: tensor-core kernels would round to TF32"
    if dtype in (torch.float16, torch.bfloat16) and head_dim in (64, 128) and _has_tma(device):
        return "triton", "Hopper (TMA), 16-bit, head_dim 64/128"
    if not _has_tma(device):
        return "flex", "no TMA (pre-Hopper): triton measured slower than flex there"
    return "flex", f"head_dim {head_dim} or dtype {dtype} is outside the triton kernel's measured classes"


@functools.cache
def _say_auto(device_type: str, dtype, head_dim, grouped: bool, choice: str, why: str) -> None:
    """Once per shape class: what ``auto`` picked and why."""
    logging.getLogger("omnimem").info(
        "backend auto (%s, %s, head_dim %s, %s): %s (%s)",
        device_type, dtype, head_dim, "query groups" if grouped else "one query group", choice, why,
    )  # fmt: skip


@functools.cache
def _has_tma(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def _resolve_config(config: OmniMemConfig | None, overrides: dict[str, object]) -> OmniMemConfig:
    if config is None:
        config = _DEFAULT_CONFIG
    elif not isinstance(config, OmniMemConfig):
        raise TypeError(f"config must be an OmniMemConfig, got {type(config).__name__}")
    return config.replace(**overrides) if overrides else config


def _select(
    q: torch.Tensor,
    k: torch.Tensor,
    history_len: int,
    config: OmniMemConfig,
    scale: float,
    key_block_sums: torch.Tensor | Int8BlockSums | None,
    history: torch.Tensor | None = None,
) -> Selection:
    check_key_block_sums(key_block_sums, k, config.block_size)
    # A device scalar (a fill kernel, no host sync) keeps every shape independent of the history;
    # a cache passes its own (``history``), which it updates only when the history changes.
    if history is None:
        history = torch.full((), history_len, dtype=torch.int64, device=q.device)
    # Compiling pays on GPUs, where eager selection is launch-bound; on CPU it would only add
    # compile time.
    compiled = config.compile and q.device.type == "cuda"
    selection = select(q, k, history, config, scale=scale, compiled=compiled, key_block_sums=key_block_sums)
    return dataclasses.replace(selection, planned_history_len=history_len)


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    history_len: int | None = None,
    chunk_len: int | None = None,
    config: OmniMemConfig | None = None,
    key_block_sums: torch.Tensor | Int8BlockSums | None = None,
    layout: Layout = "bhld",
    **overrides: object,
) -> Selection:
    """Choose, per (batch, KV head, query group), the history blocks a chunk attends.

    Args:
        q: ``[B, Hq, Lq, D]`` queries of the current chunk (any float dtype; a
            ``[B, Lq, Hq, D]`` tensor ``.transpose(1, 2)`` works without a copy).
        k: ``[B, Hkv, Lkv, D]`` keys: history ``[0, history_len)``, then the chunk; anything
            after ``history_len + chunk_len`` is ignored. ``Hq % Hkv == 0``. Same device/dtype as q.
        history_len: history tokens in ``k``; default ``Lkv - chunk_len``.
        chunk_len: current-chunk tokens in ``k``; default ``Lq``.
        config: retrieval configuration; default ``OmniMemConfig()``.
        layout: ``"bhld"`` (default: q and k are ``[B, H, L, D]``) or ``"blhd"`` (``[B, L, H,
            D]``, read through views without copies).
        key_block_sums: optional float32 ``[B, Hkv, ceil(Lkv / block_size), D]`` sums of each
            block's history keys (what a KV cache maintains incrementally), or an
            ``omnimem.store.index.Int8BlockSums`` of them. Without it the whole key history is
            read once per call to compute block means.
        **overrides: config fields to replace for this call (e.g. ``top_k=16``).

    Returns:
        Selection: the chosen blocks, as a [`Selection`][omnimem.Selection] holding
            ``kv_block_idx`` ``[B, Hkv, G, K]`` (ascending, ``-1`` padded), ``kv_num_blocks``
            ``[B, Hkv, G]``, the ranked ``selected_block_idx`` and ``retrieved_block_idx``
            (what the budget bought beyond the sink and local window).

    Raises:
        TypeError, ValueError: invalid inputs (see ``sparse_attention``).

    Example:
        >>> import torch
        >>> from omnimem import select_blocks
        >>> q, k = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16 + 64, 8)
        >>> sel = select_blocks(q, k, block_size=8, top_k=2, sink_tokens=8, local_tokens=16)
        >>> sel.kv_block_idx.shape, sel.kv_num_blocks.tolist()
        (torch.Size([1, 2, 1, 6]), [[[5], [5]]])
    """
    config = _resolve_config(config, overrides)
    if layout_of(layout) == "blhd":
        q, k = (x.transpose(1, 2) if isinstance(x, torch.Tensor) else x for x in (q, k))
    history_len, _ = check_attention_inputs(q, k, None, history_len=history_len, chunk_len=chunk_len)
    return _select(q, k, history_len, config, config.scale or q.shape[-1] ** -0.5, key_block_sums)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    history_len: int | None = None,
    chunk_len: int | None = None,
    config: OmniMemConfig | None = None,
    return_lse: bool = False,
    key_block_sums: torch.Tensor | Int8BlockSums | None = None,
    selection: Selection | None = None,
    layout: Layout = "bhld",
    **overrides: object,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of a chunk over its own tokens and the history blocks OmniMem retrieves.

    Each query attends every current-chunk token and, per head, the sink blocks, the local
    window blocks and the ``top_k`` blocks selected for its KV head and query group
    ([Concepts](concepts.md#the-exact-rule); see ``select_blocks``).

    Args:
        q: ``[B, Hq, Lq, D]`` current-chunk queries (float16, bfloat16, float32 or float64).
            A ``[B, Lq, Hq, D]`` (flash-attn/Wan layout) tensor can be passed as
            ``q.transpose(1, 2)``: no copy is made by the selection or the flex backend (on
            the CPU flex copies ``v`` once, zeroing the values nobody attends).
        k: ``[B, Hkv, Lkv, D]`` keys, ``Hq % Hkv == 0``: positions ``[0, history_len)`` are the
            history, ``[history_len, history_len + chunk_len)`` the current chunk; positions
            after that (preallocated, unwritten space) are never attended and influence no
            output (flex on CUDA excepted: there values beside attended ones must be finite).
        v: values, same shape as ``k``.
        history_len: history tokens in ``k``; default ``Lkv - chunk_len``. ``0`` gives plain
            attention over the chunk.
        chunk_len: current-chunk tokens in ``k`` (``>= 1``); default ``Lq``.
        config: retrieval and backend configuration; default ``OmniMemConfig()``.
        layout: ``"bhld"`` (default: q, k, v are ``[B, H, L, D]``) or ``"blhd"`` (they are
            ``[B, L, H, D]``, the flash-attn/Wan layout, read through views without copies; the
            output is ``[B, Lq, Hq, D]`` too, the log-sum-exp stays ``[B, Hq, Lq]``).
        return_lse: also return the float32 log-sum-exp ``[B, Hq, Lq]``.
        key_block_sums: optional cached per-block key sums (see ``select_blocks``); spares
            selection its pass over the whole key history.
        selection: a precomputed [`Selection`][omnimem.Selection] for these ``k``/``v`` (from
            ``select_blocks``; plan once, run many): no selection is made. Its table must index
            ``k``'s blocks (``num_history_blocks == ceil(Lkv / block_size)``).
        **overrides: config fields to replace for this call, e.g. ``top_k=16, backend="dense"``.

    Returns:
        ``[B, Hq, Lq, D]`` in ``q.dtype``, and the log-sum-exp when ``return_lse``.

    Raises:
        TypeError: non-tensor inputs, unsupported or mismatched dtypes, non-int lengths,
            unknown config fields.
        ValueError: wrong ranks or shapes, ``Hq % Hkv != 0``, mismatched devices, lengths
            outside ``k``, invalid config values or backend names.

    Example:
        >>> import torch
        >>> from omnimem import sparse_attention
        >>> q = torch.randn(1, 4, 32, 16)            # one chunk of 32 tokens
        >>> k = v = torch.randn(1, 4, 256 + 32, 16)  # 256 history tokens + the chunk
        >>> out = sparse_attention(q, k, v, block_size=16, top_k=4, local_tokens=32, backend="dense")
        >>> out.shape
        torch.Size([1, 4, 32, 16])
    """
    config = _resolve_config(config, overrides)
    if layout_of(layout) == "blhd":  # views, no copies; the result goes back the same way
        result = sparse_attention(
            *(x.transpose(1, 2) if isinstance(x, torch.Tensor) else x for x in (q, k, v)),
            history_len=history_len, chunk_len=chunk_len, config=config, return_lse=return_lse,
            key_block_sums=key_block_sums, selection=selection,
        )  # fmt: skip
        return (result[0].transpose(1, 2), result[1]) if return_lse else result.transpose(1, 2)
    history_len, chunk_len = check_attention_inputs(q, k, v, history_len=history_len, chunk_len=chunk_len)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    return _attend_checked(
        q, k, v, history_len=history_len, chunk_len=chunk_len, config=config, return_lse=return_lse,
        key_block_sums=key_block_sums, selection=selection,
    )  # fmt: skip


def _attend_checked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    history_len: int,
    chunk_len: int,
    config: OmniMemConfig,
    return_lse: bool,
    key_block_sums: torch.Tensor | Int8BlockSums | None,
    selection: Selection | None = None,
    history: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``sparse_attention`` on validated ``[B, H, L, D]`` inputs. ``history``: ``history_len``
    as a 0-d int64 device tensor that the caller keeps (a cache's), so that the launched work
    holds no position and a CUDA graph of it stays valid as the history grows."""
    if q.shape[0] == 0 or q.shape[1] == 0:  # nothing to attend: the empty result, on every backend
        # ... still part of the graph when an input requires grad (its gradients are empty too).
        out = (
            q * 0 + (k.sum() + v.sum()).to(q.dtype) * 0
            if q.requires_grad or k.requires_grad or v.requires_grad
            else torch.empty_like(q)
        )
        return (out, torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)) if return_lse else out
    forward = get_backend(resolve_backend(config, q.device, dtype=q.dtype, head_dim=q.shape[-1]))
    scale = config.scale or q.shape[-1] ** -0.5
    if selection is None:
        selection = _select(q, k, history_len, config, scale, key_block_sums, history)
    else:
        check_selection(selection, q, k, config.block_size, history_len)
    out, lse = forward(
        q, k, v, selection, chunk_len=chunk_len, scale=scale, return_lse=return_lse, config=config
    )
    return (out, lse) if return_lse else out
