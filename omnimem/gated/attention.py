"""``gated_attention``: the OmniMem layer as its authors built it (docs/gated.md).

Three branches over one chunk's queries, summed with per-(token, head) gates the model
computes: compressed attention over every pooled block of history and chunk, sliding-window
attention over the last ``window_tokens`` positions, and the selected branch, where each group
of ``query_group_size`` queries attends its own ``top_k`` blocks per head.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable

import torch

from omnimem.backends.gated_branches import compressed_attention, selected_attention_gather, window_attention
from omnimem.checks import check_attention_inputs, check_gates
from omnimem.config import GatedConfig
from omnimem.gated.selection import CandidateRule, GroupSelection, select_groups
from omnimem.pooling import PooledKV, accumulation_dtype, pool_kv
from omnimem.store.blocks import QuantizedBlocks

_DEFAULT = GatedConfig()
logger = logging.getLogger("omnimem")


def _resolve(config: GatedConfig | None, overrides: dict[str, object]) -> GatedConfig:
    if config is None:
        config = _DEFAULT
    elif not isinstance(config, GatedConfig):
        raise TypeError(f"config must be an omnimem.GatedConfig, got {type(config).__name__}")
    return config.replace(**overrides) if overrides else config


def resolve_gated_backend(
    config: GatedConfig, device: torch.device, dtype: torch.dtype | None = None, kv_format: str = "native"
) -> str:
    """``"triton"`` or ``"gather"``: ``"auto"`` takes the kernels on CUDA devices, except for an
    fp8 history on a GPU whose triton has no float8 e4m3 (compute capability before 8.9), which
    ``"gather"`` dequantizes with torch; ``"triton"`` named there is a ``ValueError``."""
    from omnimem.backends.quantized_tiles import check_kernel_device, kernels_decode

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if config.backend == "auto":
        if device.type != "cuda":
            return "gather"
        if not kernels_decode(kv_format, device):
            _log_fp8_fallback(torch.cuda.get_device_name(device))
            return "gather"
        return "triton"
    if config.backend == "triton":
        check_kernel_device(kv_format, device)
    if config.backend == "triton" and device.type != "cuda":
        if not interpreted:
            raise ValueError(
                f"GatedConfig.backend='triton' needs CUDA tensors (got {device}); use backend='gather' "
                "(CPU runs the kernels only under TRITON_INTERPRET=1, for tests)"
            )
        if dtype == torch.bfloat16:
            raise ValueError(
                "GatedConfig.backend='triton' under TRITON_INTERPRET=1 cannot run bfloat16 (the "
                "interpreter's bf16 tl.dot is wrong): use float16 or float32 there, or backend='gather'"
            )
    return config.backend


@functools.cache
def _log_fp8_fallback(device_name: str) -> None:
    logger.info(
        "gated_attention: an fp8 history on %s runs the gather backend (triton has no float8 e4m3 "
        "before compute capability 8.9)", device_name,
    )  # fmt: skip


@functools.cache
def _log_choice(backend: str, device_type: str) -> None:
    logger.info("gated_attention: the selected branch runs on %r (%s tensors)", backend, device_type)


def _check_pooled(
    pooled: object, q: torch.Tensor, k: torch.Tensor, block_size: int, seq_len: int
) -> PooledKV:
    if not isinstance(pooled, PooledKV):
        raise TypeError(f"pooled must be an omnimem.PooledKV, got {type(pooled).__name__}")
    needed = math.ceil(seq_len / block_size)
    batch, heads, _, head_dim = k.shape
    for name, x, dtype in (
        ("pooled.k", pooled.k, torch.float32),
        ("pooled.k_attn", pooled.k_attn, q.dtype),
        ("pooled.v_attn", pooled.v_attn, q.dtype),
    ):
        if (
            x.dim() != 4
            or (x.shape[0], x.shape[1], x.shape[3]) != (batch, heads, head_dim)
            or x.shape[2] < needed
        ):
            raise ValueError(
                f"{name} must have shape [{batch}, {heads}, >= {needed}, {head_dim}] "
                f"([B, Hkv, block slots, D]), got {tuple(x.shape)}"
            )
        if x.dtype != dtype:
            raise TypeError(f"{name} must be {dtype}, got {x.dtype}")
        if x.device != k.device:
            raise ValueError(f"{name} must be on k's device {k.device}, got {x.device}")
    bounds = pooled.k_bounds
    if bounds is not None:
        want = (*pooled.k.shape[:3], 2)
        if not isinstance(bounds, torch.Tensor) or tuple(bounds.shape) != want:
            raise ValueError(
                f"pooled.k_bounds must be None or a {list(want)} tensor (omnimem.pooling.key_bounds), "
                f"got {getattr(bounds, 'shape', type(bounds).__name__)}"
            )
        if bounds.dtype != torch.float32 or bounds.device != k.device:
            raise TypeError(
                f"pooled.k_bounds must be float32 on {k.device}, got {bounds.dtype} on {bounds.device}"
            )
    if not isinstance(pooled.k_attn_rounded, bool):
        raise TypeError(f"pooled.k_attn_rounded must be a bool, got {type(pooled.k_attn_rounded).__name__}")
    if pooled.block_size != block_size:
        raise ValueError(
            f"pooled.block_size must equal the config's block_size {block_size}, got {pooled.block_size}"
        )
    return pooled


def _prepare(q, k, v, history_len, config, pooled, detach=False):
    history_len, _ = check_attention_inputs(q, k, v, history_len=history_len, chunk_len=None)
    seq_len = history_len + q.shape[2]
    if pooled is None and config.block_size > seq_len:
        # One block of the whole sequence: the same layer, without allocations sized by the block.
        config = config.replace(block_size=seq_len)
    if pooled is None and detach:  # the means' gradient is SelectedAttentionFanout's to make
        pooled = pool_kv(k.detach(), v.detach(), seq_len=seq_len, block_size=config.block_size)
    elif pooled is None:
        pooled = pool_kv(k, v, seq_len=seq_len, block_size=config.block_size)
    else:
        pooled = _check_pooled(pooled, q, k, config.block_size, seq_len)
    return seq_len, pooled, config


def select_groups_for(
    q: torch.Tensor, pooled: PooledKV, seq_len: int, config: GatedConfig, backend: str
) -> GroupSelection:
    """The selection ``gated_attention`` makes: ``config``'s rule over ``pooled``'s block means."""
    approx_keys = _approx_keys(pooled, q)
    return select_groups(
        q,
        pooled.k,
        torch.full((), seq_len, dtype=torch.int64, device=q.device),
        query_group_size=config.query_group_size,
        rule=CandidateRule.of(config),
        precision=config.pool_precision,
        scale=config.scale or q.shape[-1] ** -0.5,
        use_kernel=backend == "triton",
        approx_keys=approx_keys,
        key_bounds=None if approx_keys is None else pooled.k_bounds,
    )


def _approx_keys(pooled: PooledKV, q: torch.Tensor) -> torch.Tensor | None:
    """The selection kernel's first pass reads a bfloat16 model's block means (``k_attn``):
    half the bytes at the bfloat16 tensor-core rate, the same result (its error bound comes
    from ``pooled.k_bounds``). CUDA only: Triton's CPU interpreter computes bfloat16 dots
    wrongly."""
    if not q.is_cuda or pooled.k_attn.dtype != torch.bfloat16:
        return None
    if pooled.k_bounds is None:
        _log_no_bounds()
        return None
    return pooled.k_attn


@functools.cache
def _log_no_bounds() -> None:
    logger.info(
        "gated selection: pooled.k_bounds is None (a PooledKV not built by pool_kv or a cache), "
        "so the first pass scores the float32 means in tf32 instead of k_attn in bfloat16"
    )


def select_group_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    history_len: int | None = None,
    config: GatedConfig | None = None,
    pooled: PooledKV | None = None,
    **overrides: object,
) -> GroupSelection:
    """The blocks the selected branch of ``gated_attention`` attends, per (batch, KV head,
    query group); arguments as for ``gated_attention``.

    Example:
        >>> import torch
        >>> from omnimem import select_group_blocks
        >>> q, k = torch.randn(1, 2, 30, 16), torch.randn(1, 2, 300, 16)
        >>> sel = select_group_blocks(q, k, top_k=4)
        >>> sel.block_idx.shape, sel.num_blocks.unique().tolist()
        (torch.Size([1, 2, 2, 4]), [4])
    """
    config = _resolve(config, overrides)
    backend = resolve_gated_backend(config, q.device, q.dtype)
    seq_len, pooled, config = _prepare(q, k, k, history_len, config, pooled)
    return select_groups_for(q, pooled, seq_len, config, backend)


def gated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor,
    *,
    history_len: int | None = None,
    config: GatedConfig | None = None,
    pooled: PooledKV | None = None,
    **overrides: object,
) -> torch.Tensor:
    """The gated three-branch OmniMem attention of one chunk (docs/gated.md).

    ``out = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa`` per (token, head), where over the
    sequence ``[0, seq_len)``, ``seq_len = history_len + Lq`` (the history, then the chunk):

    - ``o_cmp`` attends every pooled block (block means of keys and values);
    - ``o_swa`` attends the last ``window_tokens`` positions at full resolution;
    - ``o_slc``: each group of ``query_group_size`` queries attends, per head, the ``top_k``
      blocks whose mean key best matches the group's mean query (candidates per
      ``config.candidates``); 0 for a group with no candidate.

    Args:
        q: ``[B, Hq, Lq, D]`` the chunk's queries (float16, bfloat16, float32 or float64;
            a ``[B, Lq, Hq, D]`` tensor passed as ``.transpose(1, 2)`` is not copied).
        k: ``[B, Hkv, Lkv, D]`` keys: the history, then the chunk; positions past
            ``history_len + Lq`` are never read. ``Hq % Hkv == 0``.
        v: values, k's shape.
        gates: ``[B, Hq, Lq, 3]`` the already-activated weights of the compressed, selected
            and window branches, in that order (any floating dtype).
        history_len: history tokens in ``k``; default ``Lkv - Lq``.
        config: a [`GatedConfig`][omnimem.GatedConfig]; default ``GatedConfig()`` (the
            authors' released model).
        pooled: the block means of ``k``/``v`` when the caller keeps them (a cache does), a
            [`PooledKV`][omnimem.PooledKV] with ``>= ceil(seq_len / block_size)`` block slots;
            default: pooled here from ``k`` and ``v``.
        **overrides: config fields to replace for this call, e.g. ``top_k=12``.

    Returns:
        ``[B, Hq, Lq, D]`` in ``q.dtype``.

    Raises:
        TypeError, ValueError: invalid inputs or config, naming the argument.

    Example:
        >>> import torch
        >>> from omnimem import gated_attention
        >>> q = torch.randn(1, 2, 60, 16)           # a chunk of 60 tokens
        >>> k = v = torch.randn(1, 2, 240 + 60, 16)  # 240 history tokens + the chunk
        >>> gates = torch.full((1, 2, 60, 3), 0.5)
        >>> gated_attention(q, k, v, gates, top_k=4, window_tokens=120).shape
        torch.Size([1, 2, 60, 16])
    """
    config = _resolve(config, overrides)
    backend = resolve_gated_backend(config, q.device, q.dtype)
    wants_grad = torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in (q, k, v, gates)
    )
    # Training from k and v alone: the means' gradient is the one-pass backward's to make.
    fanout = fanout_backward(backend, wants_grad) and pooled is None
    if fanout_backward(backend, wants_grad) and pooled is not None:
        _log_pooled_autograd()
    seq_len, pooled, config = _prepare(q, k, v, history_len, config, pooled, detach=fanout)
    check_gates(gates, q)
    _log_choice(backend, q.device.type)
    scale = config.scale or q.shape[-1] ** -0.5
    selection, ready = _select_beside(
        q, backend, lambda: select_groups_for(q, pooled, seq_len, config, backend)
    )
    num_blocks = math.ceil(seq_len / config.block_size)
    return run_branches(
        q, k, v, gates, selection, seq_len=seq_len, k_means=pooled.k_attn, v_means=pooled.v_attn,
        num_blocks=num_blocks, config=config, backend=backend, scale=scale, wants_grad=wants_grad,
        selection_ready=ready, fanout=fanout,
    )  # fmt: skip


# Whether the triton backend selects on a side stream beside the dense branches (benchmarks
# turn it off to measure the difference).
OVERLAP_SELECTION = True
# Whether differentiable calls on the triton backend make dk/dv in one backward
# (SelectedAttentionFanout) rather than letting autograd sum three branches' (benchmarks).
FANOUT_BACKWARD = True


def fanout_backward(backend: str, wants_grad: bool) -> bool:
    """Whether a call's k/v gradients come from ``SelectedAttentionFanout``'s one backward."""
    return FANOUT_BACKWARD and backend == "triton" and wants_grad


@functools.cache
def _log_pooled_autograd() -> None:
    logging.getLogger("omnimem").info(
        "gated_attention: pooled= was passed with gradients on; the block means' gradient goes "
        "through autograd (one more full-history pass per branch than without pooled=)"
    )


@functools.cache
def _selection_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def _select_beside(
    q: torch.Tensor, backend: str, select: Callable[[], GroupSelection]
) -> tuple[GroupSelection, Callable[[], None] | None]:
    """The selection, on CUDA with the triton backend on a side stream: its kernels are
    latency-bound (few warps per SM), so they fill the SMs the compute-bound dense branches
    leave idle. Returns the selection and what the selected branch calls before reading it
    (the main stream waits; the selection's tensors are marked as used there so the caching
    allocator never hands their memory to the side stream early). Same order on every call,
    so a CUDA graph captures it as it runs eagerly."""
    if not (OVERLAP_SELECTION and backend == "triton" and q.is_cuda):
        return select(), None
    main = torch.cuda.current_stream(q.device)
    side = _selection_stream(q.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        selection = select()

    def ready() -> None:
        main.wait_stream(side)
        for tensor in (selection.block_idx, selection.num_blocks, selection.seq_len):
            tensor.record_stream(main)

    return selection, ready


def run_branches(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor,
    selection: GroupSelection,
    *,
    seq_len: int,
    k_means: torch.Tensor,
    v_means: torch.Tensor,
    num_blocks: int,
    config: GatedConfig,
    backend: str,
    scale: float,
    wants_grad: bool,
    selection_ready: Callable[[], None] | None = None,
    fanout: bool = False,
    compact: tuple[torch.Tensor, torch.Tensor] | None = None,
    k_start: int = 0,
    means_seq_len: int | None = None,
    store: QuantizedBlocks | None = None,
    live_first: int = 0,
) -> torch.Tensor:
    """The run step of ``gated_attention``, its selection made: the three branches over
    ``k``/``v`` ``[0, seq_len)`` (the window: the last ``window_tokens`` of them; the selected
    branch: ``selection``'s blocks of ``k``) and the first ``num_blocks`` block means, summed
    with the gates. A cache that trains attends compact keys this way (``GatedCache``).
    ``selection_ready`` runs after the dense branches, before anything reads ``selection``
    (the side-stream join of ``_select_beside``). ``fanout`` (triton, with gradients):
    ``k_means``/``v_means`` carry no gradient of their own, and ``SelectedAttentionFanout``
    makes the whole ``dk``/``dv`` in one backward; then ``compact`` (the attended keys and
    values when ``k``/``v`` are only their differentiable last tokens: a cache's compact copy),
    ``k_start`` (``k``'s first token in the sequence the means pool) and ``means_seq_len``
    (that sequence's length; default ``seq_len``) place ``k`` among the means. ``store`` (a
    quantized cache's history; triton): the selected branch reads blocks before ``live_first``
    from its bytes, and ``k``/``v`` hold the tokens from block ``live_first`` on (the window
    lies among them); with gradients only through ``fanout`` (``compact``: those tokens, ``k``/
    ``v`` the differentiable chunk at their end), whose backward reads the same bytes."""
    if store is not None and (backend != "triton" or (wants_grad and not fanout)):
        raise ValueError(
            "a quantized store is read by the triton backend's selected kernel (gradients through "
            "its one-pass backward)"
        )
    if store is not None and not fanout:
        from omnimem.backends.selected_attention import selected_attention

        offset = live_first * config.block_size
        o_cmp = compressed_attention(q, k_means, v_means, num_blocks, scale=scale)
        o_swa = window_attention(q, k, v, seq_len - offset, window_tokens=config.window_tokens, scale=scale)
        return selected_attention(
            q, k, v, block_idx=selection.block_idx, num_blocks=selection.num_blocks,
            seq_len=selection.seq_len, block_size=config.block_size,
            query_group_size=selection.query_group_size, scale=scale, combine=(o_cmp, o_swa, gates),
            store=store, live_first=live_first,
        )  # fmt: skip
    if backend == "triton" and wants_grad and q.dtype == torch.float64:
        raise ValueError(
            "the gated layer's triton kernels compute in float32 at most: for float64 gradients "
            "(gradcheck) use backend='gather'"
        )
    if fanout:
        from omnimem.backends.selected_attention import SelectedAttentionFanout

        if selection_ready is not None:
            selection_ready()
        keys, values = compact if compact is not None else (None, None)
        o_slc, k_means, v_means, k_window, v_window = SelectedAttentionFanout.apply(
            q, k, v, keys, values, k_means, v_means, selection.block_idx, selection.num_blocks,
            selection.seq_len, seq_len, max(0, seq_len - config.window_tokens), k_start,
            seq_len if means_seq_len is None else means_seq_len, config.block_size,
            selection.query_group_size, scale, store, live_first,
        )  # fmt: skip
        o_cmp = compressed_attention(q, k_means, v_means, num_blocks, scale=scale)
        window_len = k_window.shape[2]
        o_swa = window_attention(q, k_window, v_window, window_len, window_tokens=window_len, scale=scale)
        return _gated_sum(gates, o_cmp, o_slc, o_swa, q.dtype)
    o_cmp = compressed_attention(q, k_means, v_means, num_blocks, scale=scale)
    o_swa = window_attention(q, k, v, seq_len, window_tokens=config.window_tokens, scale=scale)
    if selection_ready is not None:
        selection_ready()
    if backend == "triton" and wants_grad:
        # The selected branch alone (its backward needs its output and LSE); the gated sum in
        # torch below, so that the gates and the dense branches differentiate as usual.
        from omnimem.backends.selected_attention import SelectedAttention

        o_slc = SelectedAttention.apply(
            q, k, v, selection.block_idx, selection.num_blocks, selection.seq_len,
            config.block_size, selection.query_group_size, scale,
        )  # fmt: skip
    elif backend == "triton":
        from omnimem.backends.selected_attention import selected_attention

        return selected_attention(
            q,
            k,
            v,
            block_idx=selection.block_idx,
            num_blocks=selection.num_blocks,
            seq_len=selection.seq_len,
            block_size=config.block_size,
            query_group_size=selection.query_group_size,
            scale=scale,
            combine=(o_cmp, o_swa, gates),
        )
    else:
        o_slc = selected_attention_gather(
            q,
            k,
            v,
            block_idx=selection.block_idx,
            seq_len=selection.seq_len,
            block_size=config.block_size,
            query_group_size=selection.query_group_size,
            scale=scale,
        )
    return _gated_sum(gates, o_cmp, o_slc, o_swa, q.dtype)


def _gated_sum(gates, o_cmp, o_slc, o_swa, dtype: torch.dtype) -> torch.Tensor:
    acc = accumulation_dtype(dtype)
    g_cmp, g_slc, g_swa = gates.to(acc).unbind(-1)
    out = (
        g_cmp[..., None] * o_cmp.to(acc) + g_slc[..., None] * o_slc.to(acc) + g_swa[..., None] * o_swa.to(acc)
    )
    return out.to(dtype)
