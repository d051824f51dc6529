"""What OmniMem retrieves for one chunk of a (scaled-down, synthetic) video, on CPU.

A Wan2.1-style history: latent frames of ``--frame-tokens`` tokens, a scene change every
``--scene-frames`` frames, and the current chunk revisits scene 1 (a camera returning to a
place seen long ago). Keys also carry a recency component (neighbouring frames look alike), the
local bias that makes naive top-k spend its budget on frames the local window covers anyway.

For each window-exclusion mode the script prints which history frames a few heads retrieve,
how many retrieved blocks belong to the revisited scene, and the output error against dense
attention over the whole history.

    python examples/chunk_retrieval.py [--backend flex|dense] [--compile]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from omnimem import OmniMemConfig, select_blocks, sparse_attention


def synthetic_history(args: argparse.Namespace, gen: torch.Generator):
    frames = args.history_frames + args.chunk_frames
    tokens = frames * args.frame_tokens
    heads, dim = args.heads, args.head_dim
    scenes = torch.randn(frames // args.scene_frames + 2, heads, dim, generator=gen)
    scenes = F.normalize(scenes, dim=-1)
    scene_of_frame = torch.arange(frames) // args.scene_frames
    scene_of_frame[args.history_frames :] = 1  # the chunk revisits scene 1
    recency = F.normalize(torch.randn(heads, dim, generator=gen), dim=-1)
    # Recency: strongest on the last history frames, fading within a few frames.
    frames_back = (args.history_frames - 1 - torch.arange(frames)).clamp(min=0)
    recency_weight = 5.0 * torch.exp(-frames_back / 1.5)

    def tokens_of(per_frame: torch.Tensor, noise: float) -> torch.Tensor:
        x = per_frame.repeat_interleave(args.frame_tokens, dim=0)  # [tokens, H, D]
        return x + noise * torch.randn(tokens, heads, dim, generator=gen)

    key_frames = 3.0 * scenes[scene_of_frame] + recency_weight[:, None, None] * recency
    k = tokens_of(key_frames, 0.5)
    v = torch.randn(tokens, heads, dim, generator=gen)
    query_frames = 3.0 * scenes[scene_of_frame] + 4.0 * recency
    q = tokens_of(query_frames, 0.5)[args.history_frames * args.frame_tokens :]
    # [B, L, H, D] storage (the flash-attn / Wan layout) viewed as [B, H, L, D]: no copies.
    view = lambda x: x.unsqueeze(0).transpose(1, 2)  # noqa: E731
    return view(q), view(k), view(v), scene_of_frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frame-tokens", type=int, default=104, help="tokens per latent frame (Wan: 1560)")
    parser.add_argument("--history-frames", type=int, default=60)
    parser.add_argument("--chunk-frames", type=int, default=3)
    parser.add_argument("--scene-frames", type=int, default=8)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--backend", default="flex", choices=["flex", "dense"])
    parser.add_argument(
        "--compile", action="store_true", help="compiled FlexAttention (~20 s first call on CPU)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    q, k, v, scene_of_frame = synthetic_history(args, torch.Generator().manual_seed(args.seed))
    history_len = args.history_frames * args.frame_tokens
    print(
        f"chunk: {q.shape[2]} queries x {args.heads} heads; history: {history_len} tokens "
        f"({args.history_frames} frames); the chunk revisits scene 1 = frames "
        f"{(scene_of_frame[: args.history_frames] == 1).nonzero().flatten().tolist()}\n"
    )
    dense = F.scaled_dot_product_attention(q, k, v)
    base = OmniMemConfig(
        block_size=args.frame_tokens,  # one block per latent frame, for readable output
        top_k=args.top_k,
        sink_tokens=args.frame_tokens,  # the first frame
        local_tokens=args.chunk_frames * args.frame_tokens,  # one chunk
        backend=args.backend,
        compile=args.compile,
    )
    for mode in ("adaptive", "never", "always"):
        config = base.replace(window_exclusion=mode)
        sel = select_blocks(q, k, history_len=history_len, config=config)
        out = sparse_attention(q, k, v, history_len=history_len, config=config)
        retrieved = sel.retrieved_block_idx[0, :, 0]  # [H, top_k]; -1 = empty or wasted slot
        hits = (retrieved >= 0) & (scene_of_frame[retrieved.clamp(min=0)] == 1)
        error = float((out - dense).norm() / dense.norm())
        print(f"window_exclusion={mode!r}: output error vs dense {error:.3f}")
        print(f"  retrieved frames of the revisited scene: {int(hits.sum())} of {retrieved.numel()} slots")
        for head in range(3):
            frames = sorted(f for f in retrieved[head].tolist() if f >= 0)
            wasted = int((retrieved[head] < 0).sum())
            print(
                f"  head {head}: frames {frames}"
                + (f"  ({wasted} slots wasted on the local window)" if wasted else "")
            )
        print()
    attended = int(sel.kv_num_blocks[0, 0, 0]) * args.frame_tokens + q.shape[2]
    print(f"each query attends ~{attended} of {k.shape[2]} tokens ({attended / k.shape[2]:.0%})")


if __name__ == "__main__":
    main()
