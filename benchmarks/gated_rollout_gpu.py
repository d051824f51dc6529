"""What a user of the authors' model sees: one chunk of a 30-layer Wan2.1-1.3B-shaped model whose
self-attention is ``GatedWanSelfAttention``, at growing history (GPU; one device call).

Random weights, bf16: dim 1536, 12 heads, FFN 8960, 512 text tokens for cross-attention, chunks
of 3 latent frames (4680 tokens in 30 x 52 patches, blocks of 1 x 15 x 2). One chunk is what
their pipeline runs per 0.75 s of video: 4 denoising passes plus the commit pass, every pass a
full forward at the chunk's ``start_frame``. Each layer's ``GatedCache`` is first filled with
random keys/values up to the history (chunk by chunk through ``GatedCache.write``, so the block
means are the cache's own), then the chunk is timed (``triton.testing.do_bench`` median) with
the peak GPU memory. Their figures: DESIGN.md section 8 (2.08 s per chunk at 237 frames, all
resident, 84 GiB).

With ``--patched``, each block's self-attention is first a stand-in of *their* layer (their
``CausalNSSelfAttention``'s constructor settings and weight layout, released settings:
exclusion of 3 chunks, progressive) and the model goes through ``patch_causal_wan(model,
max_frames=...)``, as a user of their model would run it: the layers' own caches are sized by
``max_frames`` at their first call, ``--offload`` reaches them through the patch.

    python benchmarks/gated_rollout_gpu.py [--frames 18 60 237] [--offload] [--json out.json]
    python benchmarks/gated_rollout_gpu.py --patched --max-frames 240 --frames 237 [--offload]
        [--kv-format int4]
    python benchmarks/gated_rollout_gpu.py --smoke [--patched]  # tiny model on CPU: the script runs
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from omnimem import GatedCache, GatedWanSelfAttention, patch_causal_wan
from omnimem.gated.wan import RMSNorm, wan_rope_freqs

# Their released configuration's selection settings (configs/causal/*_nsa_15x2_top16_qg15.yaml).
RELEASED = dict(num_selected_blocks=16, group_q_size=15, exclude_window_chunks=3, progressive_exclude=True)


class AuthorsLayer(nn.Module):
    """Their ``CausalNSSelfAttention`` as its public constructor and weights describe it: the
    settings as attributes of those names, Wan's projections and norms, the gate projection.
    Its forward is theirs to run; here it must be patched first."""

    def __init__(self, dim: int, heads: int, layer: int, pool: tuple[int, int, int], chunk: int) -> None:
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, heads, dim // heads
        self.window_size, self.qk_norm, self.eps = (-1, -1), True, 1e-6
        self.pool_f, self.pool_h, self.pool_w = pool
        self.gate_mode, self.layer_idx, self.chunk_length, self.skip_module = "sigmoid", layer, chunk, None
        self.exclude_sink_chunks, self.num_kv_head_groups = 0, None
        for name, value in RELEASED.items():
            setattr(self, name, value)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps=1e-6), RMSNorm(dim, eps=1e-6)
        self.g_proj = nn.Linear(dim, 3 * heads)

    def forward(self, *args, **kwargs):
        raise RuntimeError("the stand-in of the authors' layer runs only once patched")


class Block(nn.Module):
    """A Wan block's shape of work: modulated self-attention, cross-attention, FFN."""

    def __init__(
        self, dim: int, heads: int, ffn: int, layer: int, pool: tuple[int, int, int], chunk: int,
        theirs: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        if theirs:
            self.self_attn = AuthorsLayer(dim, heads, layer, pool, chunk)
        else:
            self.self_attn = GatedWanSelfAttention(
                dim=dim, num_heads=heads, pool_f=pool[0], pool_h=pool[1], pool_w=pool[2],
                chunk_length=chunk, layer_idx=layer, **RELEASED,
            )  # fmt: skip
        self.cross_q, self.cross_kv, self.cross_o = (
            nn.Linear(dim, dim),
            nn.Linear(dim, 2 * dim),
            nn.Linear(dim, dim),
        )
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, dim))
        self.modulation = nn.Parameter(torch.randn(6, dim) / dim**0.5)
        self.heads = heads

    def forward(self, x, grid, freqs, start_frame, cache, context):
        shift, scale, gate, shift2, scale2, gate2 = self.modulation.unbind(0)
        y = self.self_attn(self.norm(x) * (1 + scale) + shift, None, grid, freqs, start_frame, kv_cache=cache)
        x = x + y * gate
        b, length, _ = x.shape
        q = self.cross_q(self.norm(x)).view(b, length, self.heads, -1).transpose(1, 2)
        k, v = self.cross_kv(context).view(b, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        x = x + self.cross_o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        return x + self.ffn(self.norm(x) * (1 + scale2) + shift2) * gate2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--frames", type=int, nargs="+", default=[18, 60, 237], help="history in latent frames"
    )
    parser.add_argument("--smoke", action="store_true", help="a tiny model on CPU")
    parser.add_argument(
        "--offload", action="store_true", help="GatedCache(offload=True): the history in host memory"
    )
    parser.add_argument(
        "--patched", action="store_true", help="a stand-in of their layers through patch_causal_wan"
    )
    parser.add_argument(
        "--max-frames", type=int, default=None, help="--patched: patch_causal_wan's max_frames"
    )
    parser.add_argument("--kv-format", default="native", help="the history's format: native, fp8, int4")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        dim, heads, ffn, layers, text = 64, 2, 128, 2, 8
        frame_hw, pool, frames_list = (6, 4), (1, 3, 2), [2, 6]
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        dim, heads, ffn, layers, text = 1536, 12, 8960, 30, 512
        frame_hw, pool, frames_list = (30, 52), (1, 15, 2), args.frames
    torch.manual_seed(0)
    frame = frame_hw[0] * frame_hw[1]
    chunk = 3 * frame
    blocks = nn.ModuleList(Block(dim, heads, ffn, i, pool, chunk, args.patched) for i in range(layers))
    blocks = blocks.to(device, dtype)
    freqs = wan_rope_freqs(dim // heads, positions=4096).to(device)
    max_frames = args.max_frames or max(frames_list) + 3
    if args.patched:  # their layers -> GatedWanSelfAttention, each with its own cache of max_frames
        patch_causal_wan(blocks, max_frames=max_frames, offload=args.offload, kv_format=args.kv_format)
        caches = [None] * layers
    else:
        caches = [
            GatedCache(
                max_frames * frame,
                batch=1,
                num_kv_heads=heads,
                head_dim=dim // heads,
                dtype=dtype,
                device=device,
                config=blocks[i].self_attn.config,
                offload=args.offload,
                max_chunk_tokens=chunk,
                kv_format=args.kv_format,
            )
            for i in range(layers)
        ]
    context = torch.randn(1, text, dim, device=device, dtype=dtype)
    grid = torch.tensor([[3, *frame_hw]])
    x = torch.randn(1, chunk, dim, device=device, dtype=dtype)

    @torch.no_grad()
    def one_chunk(start_frame: int) -> torch.Tensor:
        out = x
        for _ in range(5):  # 4 denoising passes, then the commit pass: same start, each rewrites
            out = x
            for block, cache in zip(blocks, caches, strict=True):  # patched: the layers' own
                out = block(out, grid, freqs, start_frame, cache, context)
        return out

    rows = []
    if args.patched:  # the first call allocates each layer's cache (max_frames, checked up front)
        torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
        with torch.no_grad():
            out = x
            for block in blocks:
                out = block(out, grid, freqs, 0, None, context)
        caches = [block.self_attn._cache for block in blocks]
        for cache in caches:
            cache.rewind(0)
    for frames in frames_list:
        history = frames * frame
        for cache in caches:  # fill the history chunk by chunk with random keys/values
            shape = (1, heads, chunk, dim // heads)
            while cache.end < history:
                step = min(chunk, history - cache.end)
                kv = torch.randn(shape, device=device, dtype=dtype)[:, :, :step]
                cache.write(kv, kv, start=cache.end)
        one_chunk(frames)  # warm-up (compiles the kernels once)
        if device.type == "cuda":
            import triton

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            ms = triton.testing.do_bench(lambda f=frames: one_chunk(f), warmup=1, rep=5, return_mode="median")
            peak = torch.cuda.max_memory_allocated() / 2**30
        else:
            begin = time.perf_counter()
            one_chunk(frames)
            ms, peak = (time.perf_counter() - begin) * 1e3, float("nan")
        for cache in caches:  # the timed chunk was written at `history`; drop it for the next point
            cache.rewind(history)
        row = dict(
            frames=frames, history=history, ms_per_chunk=ms, peak_gib=peak, offload=args.offload,
            patched=args.patched, max_frames=max_frames, kv_format=args.kv_format,
        )  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| history frames | ms per chunk (4 passes + commit) | vs real time (750 ms) | peak GiB |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['frames']} | {r['ms_per_chunk']:.0f} | {r['ms_per_chunk'] / 750:.2f}x | "
            f"{r['peak_gib']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
