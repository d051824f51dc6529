"""A small stand-in for a Self-Forcing-family ``CausalWanModel`` and its inference loop, written
from their public signatures and documented behaviour (not their code), for testing
``patch_causal_wan`` on CPU.

What it keeps of theirs: each block's ``self_attn`` has ``q``, ``k``, ``v``, ``o``, ``norm_q``,
``norm_k``, ``num_heads``, ``head_dim``, ``sink_size``, ``local_attn_size`` and the forward
``(x, seq_lens, grid_sizes, freqs, block_mask, kv_cache=None, current_start=0,
cache_start=None)``; Wan's 3-D RoPE with frames numbered from the chunk's start frame; per-layer
cache dicts (``k``, ``v``, ``global_end_index``, ``local_end_index``) that the loop creates once
and resets by item assignment; every denoising pass and the clean pass call the model at the
chunk's ``current_start``. Its own attention is dense over the last ``max_attention_size``
tokens (their 32,760-token window unless ``local_attn_size`` is set).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rope_table(freqs: torch.Tensor, frames: int, height: int, width: int, start_frame: int) -> torch.Tensor:
    """``[F*H*W, D/2]`` complex rotations: time, height and width parts side by side."""
    half = freqs.shape[1]
    t, h, w = freqs.split([half - 2 * (half // 3), half // 3, half // 3], dim=1)
    rows = []
    for f in range(frames):
        for y in range(height):
            for x in range(width):
                rows.append(torch.cat([t[start_frame + f], h[y], w[x]]))
    return torch.stack(rows)


def apply_rope(
    x: torch.Tensor, grid_sizes: torch.Tensor, freqs: torch.Tensor, start_frame: int
) -> torch.Tensor:
    frames, height, width = (int(n) for n in grid_sizes[0])
    table = rope_table(freqs, frames, height, width, start_frame)
    pairs = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * table[None, :, None, :]).flatten(-2).float()


class StandinSelfAttention(nn.Module):
    def __init__(
        self, dim: int, num_heads: int, local_attn_size: int = -1, sink_size: int = 0, window: int = 32760
    ):
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.local_attn_size, self.sink_size = local_attn_size, sink_size
        self.max_attention_size = window
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)

    def roped_qkv(self, x, grid_sizes, freqs, current_start: int):
        """``q``, ``k`` (Wan's RoPE, frames from the chunk's start) and ``v``, ``[B, L, H, D]``."""
        b, s = x.shape[:2]
        n, d = self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, s, n, d)
        k = self.norm_k(self.k(x)).view(b, s, n, d)
        v = self.v(x).view(b, s, n, d)
        start_frame = current_start // int(grid_sizes[0][1] * grid_sizes[0][2])
        q = apply_rope(q, grid_sizes, freqs, start_frame).type_as(v)
        return q, apply_rope(k, grid_sizes, freqs, start_frame).type_as(v), v

    def forward(
        self, x, seq_lens, grid_sizes, freqs, block_mask, kv_cache=None, current_start=0, cache_start=None
    ):
        b, s = x.shape[:2]
        n, d = self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, s, n, d)
        k = self.norm_k(self.k(x)).view(b, s, n, d)
        v = self.v(x).view(b, s, n, d)
        if kv_cache is None:  # the training path: plain bidirectional attention over x
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return self.o(out.transpose(1, 2).flatten(2))
        frame_tokens = int(grid_sizes[0][1] * grid_sizes[0][2])
        start_frame = current_start // frame_tokens
        q = apply_rope(q, grid_sizes, freqs, start_frame).type_as(v)
        k = apply_rope(k, grid_sizes, freqs, start_frame).type_as(v)
        end = current_start + s
        kv_cache["k"][:, current_start:end] = k  # position-addressed, never evicted here
        kv_cache["v"][:, current_start:end] = v
        first = max(0, end - self.max_attention_size)
        keys, values = kv_cache["k"][:, first:end], kv_cache["v"][:, first:end]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2))
        kv_cache["global_end_index"].fill_(end)
        kv_cache["local_end_index"].fill_(end)
        return self.o(out.transpose(1, 2).flatten(2))


class StandinBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = StandinSelfAttention(dim, num_heads, window=window)
        self.ffn = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim)
        )

    def forward(self, x, grid_sizes, freqs, kv_cache, current_start):
        x = x + self.self_attn(self.norm1(x), None, grid_sizes, freqs, None, kv_cache, current_start)
        return x + self.ffn(self.norm2(x))


class StandinModel(nn.Module):
    def __init__(self, num_layers: int = 2, dim: int = 32, num_heads: int = 2, window: int = 32760):
        super().__init__()
        self.blocks = nn.ModuleList(StandinBlock(dim, num_heads, window) for _ in range(num_layers))

    def forward(self, x, grid_sizes, freqs, kv_cache=None, current_start=0):
        for i, block in enumerate(self.blocks):
            x = block(x, grid_sizes, freqs, None if kv_cache is None else kv_cache[i], current_start)
        return x


class StandinPipeline:
    """Their inference loop's shape: caches created once, reset by item assignment; per chunk,
    ``passes`` denoising calls and one clean call, all at the chunk's ``current_start``."""

    def __init__(self, model: StandinModel, *, buffer_tokens: int):
        self.model, self.buffer_tokens, self.kv_cache1 = model, buffer_tokens, None

    def _initialize_kv_cache(self, batch: int, dtype: torch.dtype) -> None:
        heads = self.model.blocks[0].self_attn.num_heads
        head_dim = self.model.blocks[0].self_attn.head_dim
        self.kv_cache1 = [
            {
                "k": torch.zeros(batch, self.buffer_tokens, heads, head_dim, dtype=dtype),
                "v": torch.zeros(batch, self.buffer_tokens, heads, head_dim, dtype=dtype),
                "global_end_index": torch.tensor([0]),
                "local_end_index": torch.tensor([0]),
            }
            for _ in self.model.blocks
        ]

    def _reset_kv_cache(self) -> None:
        for layer in self.kv_cache1:
            layer["global_end_index"] = torch.tensor([0])
            layer["local_end_index"] = torch.tensor([0])

    def inference(
        self, chunks: list[torch.Tensor], grid_sizes: torch.Tensor, freqs: torch.Tensor, passes: int = 2
    ):
        """``chunks``: ``[B, L, dim]`` inputs per chunk; pass ``i`` sees ``chunk * (i + 1)``
        (stand-ins for the noisy latents), the clean pass ``chunk``. Returns the clean outputs."""
        if self.kv_cache1 is None:
            self._initialize_kv_cache(chunks[0].shape[0], chunks[0].dtype)
        else:
            self._reset_kv_cache()
        outputs, start = [], 0
        with torch.no_grad():
            for x in chunks:
                for i in range(passes):
                    self.model(x * (i + 2), grid_sizes, freqs, self.kv_cache1, start)
                outputs.append(self.model(x, grid_sizes, freqs, self.kv_cache1, start))
                start += x.shape[1]
        return outputs


class StandinCausVidSelfAttention(StandinSelfAttention):
    """CausVid's layer as its public signature describes it: no sink, ``current_end`` where
    Self-Forcing has ``cache_start``, and dense attention over the whole cache up to it."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim, num_heads)
        del self.sink_size, self.local_attn_size, self.max_attention_size

    def forward(
        self, x, seq_lens, grid_sizes, freqs, block_mask, kv_cache=None, current_start=0, current_end=0
    ):
        b, s = x.shape[:2]
        n, d = self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, s, n, d)
        k = self.norm_k(self.k(x)).view(b, s, n, d)
        v = self.v(x).view(b, s, n, d)
        if kv_cache is None:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return self.o(out.transpose(1, 2).flatten(2))
        start_frame = current_start // int(grid_sizes[0][1] * grid_sizes[0][2])
        q = apply_rope(q, grid_sizes, freqs, start_frame).type_as(v)
        k = apply_rope(k, grid_sizes, freqs, start_frame).type_as(v)
        kv_cache["k"][:, current_start:current_end] = k
        kv_cache["v"][:, current_start:current_end] = v
        keys, values = kv_cache["k"][:, :current_end], kv_cache["v"][:, :current_end]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2))
        return self.o(out.transpose(1, 2).flatten(2))


class StandinCausVidBlock(StandinBlock):
    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim, num_heads, window=0)
        self.self_attn = StandinCausVidSelfAttention(dim, num_heads)

    def forward(self, x, grid_sizes, freqs, kv_cache, current_start):
        end = current_start + x.shape[1]  # their blocks pass current_start, current_end positionally
        x = x + self.self_attn(self.norm1(x), None, grid_sizes, freqs, None, kv_cache, current_start, end)
        return x + self.ffn(self.norm2(x))


class StandinCausVidModel(StandinModel):
    def __init__(self, num_layers: int = 2, dim: int = 32, num_heads: int = 2):
        super().__init__(num_layers, dim, num_heads)
        self.blocks = nn.ModuleList(StandinCausVidBlock(dim, num_heads) for _ in range(num_layers))


class StandinCausVidPipeline(StandinPipeline):
    """CausVid's loop: cache dicts of ``k`` and ``v`` only (a whole video's tokens), created once."""

    def _initialize_kv_cache(self, batch: int, dtype: torch.dtype) -> None:
        heads = self.model.blocks[0].self_attn.num_heads
        head_dim = self.model.blocks[0].self_attn.head_dim
        shape = (batch, self.buffer_tokens, heads, head_dim)
        self.kv_cache1 = [
            {"k": torch.zeros(shape, dtype=dtype), "v": torch.zeros(shape, dtype=dtype)}
            for _ in self.model.blocks
        ]

    def _reset_kv_cache(self) -> None:  # its dicts hold no end indices: a new video just writes at 0
        pass


class StandinBlockMask:
    """Stands for the flex ``BlockMask`` LongLive builds for a re-cache: block-causal over
    blocks of ``frames_per_block`` frames (a query attends every key before its block's end)."""

    def __init__(self, frames_per_block: int):
        self.frames_per_block = frames_per_block


class StandinLongLiveSelfAttention(StandinSelfAttention):
    """LongLive's layer (NVlabs/LongLive ``wan/modules/causal_model.py`` at d69a1fa) as its public
    behaviour describes it: Self-Forcing's signature; at inference the chunk's keys go into a
    *copy* of the cache, attention reads the copy (dense over the whole history here: global
    attention, ``local_attn_size=-1``; block-causal when ``block_mask`` is given), and the layer
    returns ``(out, (current_end, local_end_index, update))``: the model writes ``update`` into
    the cache after all blocks."""

    def forward(
        self, x, seq_lens, grid_sizes, freqs, block_mask, kv_cache=None, current_start=0, cache_start=None
    ):
        if kv_cache is None:
            return super().forward(x, seq_lens, grid_sizes, freqs, block_mask)
        s, frame_tokens = x.shape[1], int(grid_sizes[0][1] * grid_sizes[0][2])
        q, k, v = self.roped_qkv(x, grid_sizes, freqs, current_start)
        end = current_start + s
        keys, values = kv_cache["k"].clone(), kv_cache["v"].clone()
        keys[:, current_start:end], values[:, current_start:end] = k, v
        keys, values = keys[:, :end].transpose(1, 2), values[:, :end].transpose(1, 2)
        mask = None
        if block_mask is not None:  # query token i sees keys before the end of its block
            step = block_mask.frames_per_block * frame_tokens
            block_end = current_start + (torch.arange(s) // step + 1) * step
            mask = torch.arange(end)[None, :] < block_end[:, None]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask)
        recompute = end <= int(kv_cache["global_end_index"]) and current_start > 0
        update = dict(start=current_start, end=end, k=k, v=v, is_recompute=recompute)
        return self.o(out.transpose(1, 2).flatten(2)), (end, end, update)


class StandinLongLiveBlock(StandinBlock):
    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim, num_heads, window=0)
        self.self_attn = StandinLongLiveSelfAttention(dim, num_heads)

    def forward(self, x, grid_sizes, freqs, kv_cache, current_start, block_mask=None):
        result = self.self_attn(self.norm1(x), None, grid_sizes, freqs, block_mask, kv_cache, current_start)
        y, info = result if kv_cache is not None else (result, None)
        x = x + y
        return x + self.ffn(self.norm2(x)), info


class StandinLongLiveModel(StandinModel):
    """Blocks return their cache updates; ``_apply_cache_updates`` writes them after all blocks
    (end indices are not moved back by a re-cache). ``cond`` stands for the prompt."""

    num_frame_per_block = 2

    def __init__(self, num_layers: int = 2, dim: int = 32, num_heads: int = 2):
        super().__init__(num_layers, dim, num_heads)
        self.blocks = nn.ModuleList(StandinLongLiveBlock(dim, num_heads) for _ in range(num_layers))

    def _apply_cache_updates(self, kv_cache, infos) -> None:
        for index, (end, local_end, update) in infos:
            if update is not None:
                kv_cache[index]["k"][:, update["start"] : update["end"]] = update["k"]
                kv_cache[index]["v"][:, update["start"] : update["end"]] = update["v"]
            if update is None or not update["is_recompute"]:
                kv_cache[index]["global_end_index"].fill_(end)
                kv_cache[index]["local_end_index"].fill_(local_end)

    def forward(self, x, grid_sizes, freqs, kv_cache=None, current_start=0, block_mask=None, cond=0.0):
        # The prompt: a direction in feature space (a constant shift would vanish in LayerNorm).
        x, infos = x + cond * torch.linspace(-1, 1, x.shape[-1]), []
        for i, block in enumerate(self.blocks):
            x, info = block(x, grid_sizes, freqs, None if kv_cache is None else kv_cache[i], current_start,
                            block_mask)  # fmt: skip
            infos.append((i, info))
        if kv_cache is not None:
            self._apply_cache_updates(kv_cache, infos)
        return x


class StandinLongLivePipeline(StandinPipeline):
    """LongLive's interactive loop: Self-Forcing's per chunk, and at a prompt switch the frames
    so far re-encoded (global attention: all of them) under the new prompt, in one call with a
    block-causal mask at their start, before the next chunk."""

    def inference(self, chunks, grid_sizes, freqs, passes: int = 2, *, switches=(), prompts=(0.0,)):
        self._initialize_kv_cache(chunks[0].shape[0], chunks[0].dtype)
        outputs, start, clean, prompt = [], 0, [], 0
        block = StandinBlockMask(self.model.num_frame_per_block)
        with torch.no_grad():
            for index, x in enumerate(chunks):
                if index in switches:
                    prompt += 1
                    self.model(torch.cat(clean, 1), grid_sizes_of(grid_sizes, len(clean)), freqs,
                               self.kv_cache1, 0, block, prompts[prompt])  # fmt: skip
                for i in range(passes):
                    self.model(x * (i + 2), grid_sizes, freqs, self.kv_cache1, start, cond=prompts[prompt])
                outputs.append(self.model(x, grid_sizes, freqs, self.kv_cache1, start, cond=prompts[prompt]))
                clean.append(x)
                start += x.shape[1]
        return outputs


def grid_sizes_of(grid_sizes: torch.Tensor, chunks: int) -> torch.Tensor:
    """The grid of ``chunks`` chunks of ``grid_sizes`` each, in one call."""
    frames, height, width = (int(n) for n in grid_sizes[0])
    return torch.tensor([[frames * chunks, height, width]])


class StandinRollingSelfAttention(StandinSelfAttention):
    """Rolling Forcing's layer (TencentARC/RollingForcing ``wan/modules/causal_model.py`` at
    a1477d0) as its public behaviour describes it: Self-Forcing's call plus ``updating_cache``;
    every call writes its first ``block_length`` tokens' keys and values at ``current_start``
    into the clean cache and attends that cache before ``current_start`` and all of its own
    tokens (a whole window of blocks at staggered noise levels, bidirectionally). No
    ``sink_size`` attribute: the first block is its anchor. Full range here (their working
    cache is truncated to ``max_attention_size`` and re-places the anchor; not at these sizes)."""

    def __init__(self, dim: int, num_heads: int, block_length: int):
        super().__init__(dim, num_heads)
        del self.sink_size
        self.block_length, self.max_attention_size = block_length, 10 * block_length

    def forward(
        self, x, seq_lens, grid_sizes, freqs, block_mask, kv_cache=None, current_start=0, cache_start=None,
        updating_cache=False,
    ):  # fmt: skip
        if kv_cache is None:
            return super().forward(x, seq_lens, grid_sizes, freqs, block_mask)
        q, k, v = self.roped_qkv(x, grid_sizes, freqs, current_start)
        block_end = current_start + self.block_length
        kv_cache["k"][:, current_start:block_end] = k[:, : self.block_length]
        kv_cache["v"][:, current_start:block_end] = v[:, : self.block_length]
        keys = torch.cat([kv_cache["k"][:, :current_start], k], dim=1).transpose(1, 2)
        values = torch.cat([kv_cache["v"][:, :current_start], v], dim=1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values)
        return self.o(out.transpose(1, 2).flatten(2))


class StandinRollingBlock(StandinBlock):
    def __init__(self, dim: int, num_heads: int, block_length: int):
        super().__init__(dim, num_heads, window=0)
        self.self_attn = StandinRollingSelfAttention(dim, num_heads, block_length)

    def forward(self, x, grid_sizes, freqs, kv_cache, current_start, updating_cache=False):
        x = x + self.self_attn(self.norm1(x), None, grid_sizes, freqs, None, kv_cache, current_start,
                               updating_cache=updating_cache)  # fmt: skip
        return x + self.ffn(self.norm2(x))


class StandinRollingModel(StandinModel):
    def __init__(self, num_layers: int = 2, dim: int = 32, num_heads: int = 2, block_length: int = 24):
        super().__init__(num_layers, dim, num_heads)
        self.blocks = nn.ModuleList(
            StandinRollingBlock(dim, num_heads, block_length) for _ in range(num_layers)
        )

    def forward(self, x, grid_sizes, freqs, kv_cache=None, current_start=0, updating_cache=False):
        for i, block in enumerate(self.blocks):
            x = block(
                x, grid_sizes, freqs, None if kv_cache is None else kv_cache[i], current_start, updating_cache
            )
        return x


class StandinRollingPipeline(StandinPipeline):
    """Rolling Forcing's loop: windows of ``steps`` blocks (fewer at the ends), window ``w``
    covering blocks ``[max(0, w - steps + 1), min(blocks - 1, w)]``, each block one noise level
    further than the next; one call per window at its first block, then the window's first block
    again, clean, with ``updating_cache=True``."""

    def inference(self, chunks, grid_sizes, freqs, passes: int = 3):
        self._initialize_kv_cache(chunks[0].shape[0], chunks[0].dtype)
        outputs, steps = [], passes
        with torch.no_grad():
            for window in range(len(chunks) + steps - 1):
                first, last = max(0, window - steps + 1), min(len(chunks) - 1, window)
                noisy = torch.cat(
                    [chunks[i] * (1 + 0.3 * (window - i)) for i in range(first, last + 1)], dim=1
                )
                start = first * chunks[0].shape[1]
                grid = torch.tensor(
                    [[int(grid_sizes[0][0]) * (last - first + 1), *map(int, grid_sizes[0][1:])]]
                )
                outputs.append(self.model(noisy, grid, freqs, self.kv_cache1, start))
                self.model(chunks[first], grid_sizes, freqs, self.kv_cache1, start, updating_cache=True)
        return outputs


def scaled_time_table(
    freqs: torch.Tensor, frames: int, start_frame: int, t_scale: float, offset
) -> torch.Tensor:
    """LongLive-2.0's temporal rotations as its docstrings describe them: frame ``f`` of the chunk
    at angle ``(start_frame + f + offset) * t_scale * theta`` for each temporal frequency
    ``theta`` (Wan's, the table's row 1), in float64; ``offset`` a number or per-frame values
    (``[>= start_frame + frames]``, indexed by absolute frame). Without scale or offset: the
    table's rows themselves."""
    half = freqs.shape[1]
    temporal = freqs[:, : half - 2 * (half // 3)]
    if t_scale == 1.0 and not torch.is_tensor(offset) and float(offset) == 0.0:
        return temporal[start_frame : start_frame + frames]
    frame = torch.arange(frames, dtype=torch.float64) + start_frame
    if torch.is_tensor(offset) and offset.ndim == 1:
        frame = frame + offset.double()[start_frame : start_frame + frames]
    else:
        frame = frame + (offset.double() if torch.is_tensor(offset) else float(offset))
    angles = (frame * t_scale)[:, None] * torch.angle(temporal[1]).double()[None, :]
    return torch.polar(torch.ones_like(angles), angles)


def apply_scaled_rope(x, grid_sizes, freqs, start_frame: int, t_scale: float, offset) -> torch.Tensor:
    frames = int(grid_sizes[0][0])
    table = freqs.clone()
    time = scaled_time_table(freqs, frames, start_frame, t_scale, offset)
    table = torch.cat([table, table[-1:].expand(max(0, start_frame + frames - table.shape[0]), -1)])
    table[start_frame : start_frame + frames, : time.shape[1]] = time
    return apply_rope(x, grid_sizes, table, start_frame)


class StandinLongLive2SelfAttention(StandinLongLiveSelfAttention):
    """LongLive-2.0's layer (NVlabs/LongLive ``wan_5b/modules/causal_model.py`` at fcd6475) as its
    signature and docstrings describe it: LongLive's, plus ``t_scale`` (temporal RoPE scale),
    ``use_relative_rope`` (keys kept raw, the attended window rotated at window-local frames:
    over a window that starts at frame 0, the absolute ones), ``method`` ("linear"),
    ``original_seq_len`` and ``temporal_offset`` (multi-shot shift; ignored by the relative
    path). Global attention here: the window is the whole history."""

    def forward(self, x, seq_lens, grid_sizes, freqs, block_mask, kv_cache=None, current_start=0,
                cache_start=None, t_scale=1.0, use_relative_rope=False, method="linear",
                original_seq_len=None, temporal_offset=0.0):  # fmt: skip
        assert method == "linear" and original_seq_len is None
        b, s = x.shape[:2]
        n, d = self.num_heads, self.head_dim
        frame_tokens = int(grid_sizes[0][1] * grid_sizes[0][2])
        start_frame = current_start // frame_tokens
        q = self.norm_q(self.q(x)).view(b, s, n, d)
        k = self.norm_k(self.k(x)).view(b, s, n, d)
        v = self.v(x).view(b, s, n, d)
        offset = 0.0 if use_relative_rope else temporal_offset
        q, k = (self.rope(t, grid_sizes, freqs, start_frame, t_scale, offset).type_as(v) for t in (q, k))
        end = current_start + s
        keys, values = kv_cache["k"].clone(), kv_cache["v"].clone()
        keys[:, current_start:end], values[:, current_start:end] = k, v
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys[:, :end].transpose(1, 2), values[:, :end].transpose(1, 2)
        )
        update = dict(start=current_start, end=end, k=k, v=v, is_recompute=False)
        return self.o(out.transpose(1, 2).flatten(2)), (end, end, update)

    @staticmethod
    def rope(x, grid_sizes, freqs, start_frame: int, t_scale: float, offset) -> torch.Tensor:
        """Their float64 rotation (their path under autograd)."""
        return apply_scaled_rope(x, grid_sizes, freqs, start_frame, t_scale, offset)


class StandinLongLive2Block(StandinLongLiveBlock):
    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim, num_heads)
        self.self_attn = StandinLongLive2SelfAttention(dim, num_heads)

    def forward(self, x, grid_sizes, freqs, kv_cache, current_start, block_mask=None, **rope):
        y, info = self.self_attn(self.norm1(x), None, grid_sizes, freqs, block_mask, kv_cache, current_start,
                                 **rope)  # fmt: skip
        x = x + y
        return x + self.ffn(self.norm2(x)), info


class StandinLongLive2Model(StandinLongLiveModel):
    """The model holds the RoPE options and passes them to every layer by keyword."""

    def __init__(self, num_layers: int = 2, dim: int = 32, num_heads: int = 2):
        super().__init__(num_layers, dim, num_heads)
        self.blocks = nn.ModuleList(StandinLongLive2Block(dim, num_heads) for _ in range(num_layers))
        self.t_scale, self.use_relative_rope, self.rope_method, self.rope_temporal_offset = (
            1.0,
            False,
            "linear",
            0.0,
        )

    def forward(self, x, grid_sizes, freqs, kv_cache=None, current_start=0, block_mask=None, cond=0.0):
        rope = dict(t_scale=self.t_scale, use_relative_rope=self.use_relative_rope, method=self.rope_method,
                    original_seq_len=None, temporal_offset=self.rope_temporal_offset)  # fmt: skip
        infos = []
        for i, block in enumerate(self.blocks):
            x, info = block(x, grid_sizes, freqs, kv_cache[i], current_start, block_mask, **rope)
            infos.append((i, info))
        self._apply_cache_updates(kv_cache, infos)
        return x
