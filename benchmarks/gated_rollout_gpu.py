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

    python benchmarks/gated_rollout_gpu.py [--frames 18 60 237] [--offload] [--json out.json]
    python benchmarks/gated_rollout_gpu.py --smoke   # tiny model on CPU: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from omnimem import GatedCache, GatedWanSelfAttention
from omnimem.gated_wan import wan_rope_freqs


class Block(nn.Module):
    """A Wan block's shape of work: modulated self-attention, cross-attention, FFN."""

    def __init__(
        self, dim: int, heads: int, ffn: int, layer: int, pool: tuple[int, int, int], chunk: int
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.self_attn = GatedWanSelfAttention(
            dim=dim, num_heads=heads, pool_f=pool[0], pool_h=pool[1], pool_w=pool[2],
            num_selected_blocks=16, group_q_size=15, chunk_length=chunk, layer_idx=layer,
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
    blocks = nn.ModuleList(Block(dim, heads, ffn, i, pool, chunk) for i in range(layers)).to(device, dtype)
    freqs = wan_rope_freqs(dim // heads, positions=4096).to(device)
    capacity = (max(frames_list) + 3) * frame
    caches = [
        GatedCache(
            capacity,
            batch=1,
            num_kv_heads=heads,
            head_dim=dim // heads,
            dtype=dtype,
            device=device,
            config=blocks[i].self_attn.config,
            offload=args.offload,
            max_chunk_tokens=chunk,
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
            for block, cache in zip(blocks, caches, strict=True):
                out = block(out, grid, freqs, start_frame, cache, context)
        return out

    rows = []
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
        row = dict(frames=frames, history=history, ms_per_chunk=ms, peak_gib=peak, offload=args.offload)
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
