"""Relative temporal positions: a long video's retrieved history placed inside the RoPE table.

A Wan-style 3-D RoPE rotates the first ``T`` complex pairs of each head by the token's frame
and the rest by its row and column. The frame part is what outgrows the table (Self-Forcing's
models hold 1,024 frames) and what no trained model has seen past ~21 frames. With
``RelativeTime`` a cache keeps its keys rotated in space only and each call rotates in time:

- the chunk and the local window keep their true distances: a token of frame ``f >= F_w`` (the
  local window's first frame) sits at ``R + f - F_w``;
- the retrieved history (sink and selected blocks before the window) is packed right before
  the window, in temporal order: a token of frame ``f < F_w`` sits at ``R - n(f)``, where
  ``n(f)`` counts the distinct frames ``>= f`` (and ``< F_w``) that the KV head's attended
  blocks (the union over its query groups) cover;
- ``R = min(F_w, cap)``, where ``cap`` bounds the distinct frames the attended blocks can cover,
  so positions never go below 0 and stay under ``cap + window + chunk`` frames however long the
  video grows.

While the history fits the budget (every frame before the window attended, ``F_w <= cap``),
``n(f) = F_w - f`` and every position equals the absolute one: relative and absolute agree.
Selection scores use the keys and queries rotated in space only (as if every frame sat at the
same time): the time rotation depends on the selection, so it cannot enter it.

On the triton backend the scattered kernel rotates each key tile in time after its load
(``frame_positions`` lays the rule out per frame; ``backends/triton_attention.py``); elsewhere
plain torch rotates a compact copy of the attended blocks (``buffer_positions``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch


@dataclasses.dataclass(frozen=True)
class RelativeTime:
    """How a cache rotates in time (see the module docstring).

    Attributes:
        freqs: ``[P, T]`` complex: ``exp(i * p * theta_t)`` for positions ``p < P`` and the ``T``
            temporal pairs (a Wan RoPE table's first ``T`` columns: ``wan_time_table``).
        frame_tokens: tokens per latent frame (token ``t`` is in frame ``t // frame_tokens``).

    Example:
        >>> from omnimem.gated.wan import wan_rope_freqs
        >>> from omnimem.positions import RelativeTime, wan_time_table
        >>> time = RelativeTime(wan_time_table(wan_rope_freqs(128, positions=1024)), frame_tokens=1560)
        >>> time
        RelativeTime(positions=1024, pairs=22, frame_tokens=1560)
    """

    freqs: torch.Tensor
    frame_tokens: int

    def __post_init__(self) -> None:
        if not isinstance(self.freqs, torch.Tensor) or not self.freqs.is_complex() or self.freqs.dim() != 2:
            raise TypeError("RelativeTime freqs must be a complex [positions, pairs] tensor")
        if (
            isinstance(self.frame_tokens, bool)
            or not isinstance(self.frame_tokens, int)
            or self.frame_tokens < 1
        ):
            raise ValueError(f"RelativeTime frame_tokens must be a positive int, got {self.frame_tokens!r}")

    def __repr__(self) -> str:
        positions, pairs = self.freqs.shape
        return f"RelativeTime(positions={positions}, pairs={pairs}, frame_tokens={self.frame_tokens})"

    def to(self, device: torch.device | str) -> RelativeTime:
        return dataclasses.replace(self, freqs=self.freqs.to(device))

    @functools.cached_property
    def cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``: the table as two contiguous float32 ``[P, T]`` tensors (what the
        kernel that rotates keys in place reads; the same values ``rotate`` uses)."""
        return self.freqs.real.float().contiguous(), self.freqs.imag.float().contiguous()

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x [B, H, L, D]`` with its first ``T`` pairs rotated by ``positions`` (``[L]`` or
        ``[B, H, L]`` integers ``< P``); in float64 for float64 ``x``, else float32, returned
        in ``x``'s dtype."""
        pairs = self.freqs.shape[1]
        real = torch.float64 if x.dtype == torch.float64 else torch.float32
        head = x[..., : 2 * pairs].to(real).unflatten(-1, (pairs, 2))
        re, im = head[..., 0], head[..., 1]
        turn = self.freqs.to(x.device)[positions]
        cos, sin = turn.real.to(real), turn.imag.to(real)
        # Separate products and sums (no fused complex multiply): the same bits whatever the
        # tensor's length or layout, so a staged copy rotates exactly like a compact one.
        rotated = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2).to(x.dtype)
        return torch.cat([rotated, x[..., 2 * pairs :]], dim=-1)

    def check_reach(self, last: int, *, what: str) -> None:
        """A ``ValueError`` when position ``last`` is past the table."""
        if last >= self.freqs.shape[0]:
            raise ValueError(
                f"relative positions reach frame {last}, past the RoPE table's {self.freqs.shape[0]} "
                f"frames ({what}): attend fewer blocks (top_k, sink/local frames) or use a longer table"
            )


def wan_time_table(freqs: torch.Tensor) -> torch.Tensor:
    """The temporal columns of Wan's complex RoPE table ``[P, D/2]`` (its first
    ``D/2 - 2 * (D/2 // 3)``)."""
    half = freqs.shape[1]
    return freqs[:, : half - 2 * (half // 3)]


def scaled_time_table(
    freqs: torch.Tensor, frames: int, start_frame: int, t_scale: float, offset: float | torch.Tensor
) -> torch.Tensor:
    """The temporal rotations ``[frames, T]`` of frames ``start_frame ..`` with LongLive-2.0's
    linear temporal RoPE: frame ``f`` at angle ``(f + offset) * t_scale * theta_t`` for each
    temporal frequency ``theta_t`` of Wan's table ``freqs`` (its row 1), in float64; ``offset``
    a number, a 0-d tensor, or per-frame values (``[frames]``, or ``[>= start_frame + frames]``
    indexed by absolute frame). Unscaled and unshifted: the table's own rows (their rule).

    Raises:
        ValueError: per-frame offsets that do not cover the frames.
    """
    temporal = wan_time_table(freqs)
    if t_scale == 1.0 and not torch.is_tensor(offset) and float(offset) == 0.0:
        return temporal[start_frame : start_frame + frames]
    frame = torch.arange(frames, dtype=torch.float64, device=freqs.device) + start_frame
    if torch.is_tensor(offset) and offset.ndim == 1:
        offset = offset.to(freqs.device, torch.float64)
        if offset.numel() == frames:
            frame = frame + offset
        elif offset.numel() >= start_frame + frames:
            frame = frame + offset[start_frame : start_frame + frames]
        else:
            raise ValueError(
                f"temporal_offset has {offset.numel()} frames; frames {start_frame}.."
                f"{start_frame + frames - 1} need it per frame of the chunk or of the whole video"
            )
    else:
        frame = frame + (offset.to(freqs.device, torch.float64) if torch.is_tensor(offset) else float(offset))
    angles = (frame * t_scale)[:, None] * torch.angle(temporal[1]).to(torch.float64)[None, :]
    return torch.polar(torch.ones_like(angles), angles)


def reserve(window_frame: int, attended_tokens: int, block_size: int, frame_tokens: int) -> int:
    """``R``: at most the frames before the window, and at most the distinct frames that the
    attended whole blocks and a partial block (``attended_tokens`` in all) can cover."""
    span = math.ceil((block_size - 1) / frame_tokens) + 1  # frames one block can touch
    blocks = math.ceil(attended_tokens / block_size) + 1
    return min(window_frame, blocks * span)


def relative_frames(
    frames: torch.Tensor, valid: torch.Tensor, *, window_frame: int, reserve: int
) -> torch.Tensor:
    """Positions ``[B, H, N]`` of tokens with true ``frames [B, H, N]`` (``valid`` ones count;
    the others get ``reserve``), by the rule of the module docstring."""
    retrieved = valid & (frames < window_frame)
    covered = torch.zeros(*frames.shape[:-1], window_frame + 1, dtype=torch.int32, device=frames.device)
    covered.scatter_(-1, torch.where(retrieved, frames, window_frame).long(), 1)
    covered = covered[..., :window_frame]
    at_or_after = covered.flip(-1).cumsum(-1).flip(-1)  # distinct covered frames >= f
    count = (
        at_or_after.gather(-1, frames.clamp(0, max(window_frame - 1, 0)).long()) if window_frame else frames
    )
    before = reserve - count
    after = reserve + frames - window_frame
    return torch.where(retrieved, before, torch.where(valid, after, reserve)).long()


def window_and_reserve(
    history: int, *, table_width: int, block_size: int, local_tokens: int, frame_tokens: int
) -> tuple[int, int]:
    """``(F_w, R)`` for a chunk at ``history``: the local window's first frame and the reserve.
    ``table_width``, the selection's entries per KV head (groups x slots), bounds the attended
    blocks, so ``R`` depends on it and the history only, not on the buffer a caller rotates."""
    window = max(history - local_tokens, 0) // frame_tokens
    slots = max(1, min(table_width, history // block_size))
    return window, reserve(window, slots * block_size + history % block_size, block_size, frame_tokens)


def buffer_positions(
    time: RelativeTime,
    blocks: torch.Tensor,
    none: int,
    table: torch.Tensor | None,
    *,
    history: int,
    block_size: int,
    local_tokens: int,
    chunk_len: int,
    length: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions for keys laid out ``[W attended blocks | the partial last block | the chunk |
    unused]`` (the compact copy of ``OmniMemCache``, the staging buffer of its offload):
    ``blocks [B, H, W]`` their indices (``none``: an empty slot), ``table [B, H, G, K]`` the
    selection's ``kv_block_idx`` (``None`` with no history), ``length`` the buffer's tokens.
    Returns ``([B, H, length]`` key positions (0 on unused tokens, never attended)``,
    [chunk_len]`` query positions``)``.

    Raises:
        ValueError: a position past ``time``'s table.
    """
    tpf, device = time.frame_tokens, blocks.device
    width = 1 if table is None else table[0, 0].numel()
    window, rank = window_and_reserve(
        history, table_width=width, block_size=block_size, local_tokens=local_tokens, frame_tokens=tpf
    )
    time.check_reach(rank + (history + chunk_len - 1) // tpf - window, what="the chunk's last frame")
    tokens = (blocks[..., None] * block_size + torch.arange(block_size, device=device)).flatten(2)
    valid = (blocks < none)[..., None].expand(-1, -1, -1, block_size).flatten(2)
    partial = torch.arange(history // block_size * block_size, history, device=device)
    partial = partial.expand(*tokens.shape[:2], -1)
    # The partial last block's frames count only where the head attends it.
    partial_read = torch.zeros_like(partial, dtype=torch.bool)
    if table is not None:
        partial_read = (table == history // block_size).flatten(2).any(-1, keepdim=True).expand_as(partial)
    frames = torch.cat([tokens, partial], dim=-1) // tpf
    hist = relative_frames(
        frames, torch.cat([valid, partial_read], dim=-1), window_frame=window, reserve=rank
    )
    chunk = rank + (history + torch.arange(chunk_len, device=device)) // tpf - window
    rest = hist.new_zeros(*hist.shape[:2], length - hist.shape[-1] - chunk_len)
    return torch.cat([hist, chunk.expand(*hist.shape[:2], -1), rest], dim=-1), chunk


def frame_positions(
    time: RelativeTime,
    table: torch.Tensor | None,
    *,
    lead: tuple[int, int],
    history: int,
    block_size: int,
    local_tokens: int,
    chunk_len: int,
    num_frames: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule per frame instead of per buffer token: ``([B, H, num_frames]`` int32 position
    of every frame of the cache, ``[chunk_len]`` query positions``)``, for a kernel that rotates
    the keys it reads where they lie (``backends/triton_attention.py``, ``KeyRotation``).
    ``table [B, H, G, K]``: the selection's ``kv_block_idx`` over the cache's blocks (``None``
    with no history; ``lead = (B, H)``). A frame before the window gets its place among the
    frames the head's attended blocks cover (the union over its query groups, the partial block
    where it is attended); any other frame before it is never read (its value is arbitrary).
    Equal to ``buffer_positions`` on every token a call attends.

    Raises:
        ValueError: a position past ``time``'s table.
    """
    tpf = time.frame_tokens
    device = time.freqs.device if table is None else table.device
    width = 1 if table is None else table[0, 0].numel()
    window, rank = window_and_reserve(
        history, table_width=width, block_size=block_size, local_tokens=local_tokens, frame_tokens=tpf
    )
    time.check_reach(rank + (history + chunk_len - 1) // tpf - window, what="the chunk's last frame")
    frames = torch.arange(num_frames, device=device)
    positions = (rank + frames - window).expand(*lead, -1)
    if table is not None and window > 0:
        # Frames the attended blocks cover, as +1/-1 marks at each block's first and past its
        # last frame (a block may straddle frames; groups may repeat a block: only > 0 counts).
        blocks = table.flatten(2).long()
        attended = blocks >= 0
        first = torch.where(attended, blocks * block_size // tpf, window)
        end = (torch.minimum((blocks + 1) * block_size, torch.full_like(blocks, history)) - 1) // tpf + 1
        marks = torch.zeros(*lead, window + 1, dtype=torch.int32, device=device)
        ones = torch.ones_like(blocks, dtype=torch.int32)
        marks.scatter_add_(-1, first.clamp(max=window), ones)
        marks.scatter_add_(-1, torch.where(attended, end, window).clamp(max=window), -ones)
        covered = (marks.cumsum(-1)[..., :window] > 0).int()
        at_or_after = covered.flip(-1).cumsum(-1).flip(-1)  # distinct covered frames >= f
        before = rank - at_or_after
        positions = torch.cat([before, positions[..., window:]], dim=-1)[..., :num_frames]
    chunk = rank + (history + torch.arange(chunk_len, device=device)) // tpf - window
    return positions.to(torch.int32).contiguous(), chunk
