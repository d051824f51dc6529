"""Does retrieval find what a chunk needs? Synthetic histories where the answer is known.

The history has the structure real video has: neighbouring frames look alike (a recency
component in every head: local bias), scenes change every few frames and come back much later
(a camera returning to a place), and heads have their own preferences (each head's current
chunk revisits a different old scene). The blocks a head truly needs are the blocks of the
scene it revisits. For each method the script reports:

- recall: share of the needed (far) blocks that were retrieved, averaged over heads;
- mass: share of the dense attention probability on the history that falls on attended
  history tokens (64 sampled queries);
- error: relative output error against dense attention over the whole history;
- union per head / across heads: distinct history blocks a head (all query groups) / all heads
  touch, and the KV buffer a union-gather design would allocate for the across-heads union.

Methods: window_exclusion adaptive / never / always, truncation (sink + local window only,
today's models) and per-query-group selection (MoBA/NSA style, adaptive, 64-query groups).

    python benchmarks/retrieval_quality.py [--top-k 32] [--plot docs/retrieval_quality.png]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F

from omnimem import OmniMemConfig, select_blocks, sparse_attention


@dataclasses.dataclass(frozen=True)
class Scenario:
    frame_tokens: int = 256
    history_frames: int = 120
    chunk_frames: int = 3
    scene_frames: int = 4
    heads: int = 8
    head_dim: int = 64
    block_size: int = 64
    seed: int = 0

    @property
    def history_len(self) -> int:
        return self.history_frames * self.frame_tokens


def make_history(s: Scenario):
    """``q [1, H, Lq, D]``, ``k, v [1, H, history + chunk, D]`` and the needed blocks per head."""
    gen = torch.Generator().manual_seed(s.seed)
    frames = s.history_frames + s.chunk_frames
    num_scenes = s.history_frames // s.scene_frames
    scene_of_frame = torch.arange(frames) // s.scene_frames
    # Each head's chunk revisits its own old scene, from the first two thirds of the history
    # (never scene 0, whose first frame is the always-attended sink).
    revisited = 1 + torch.randperm(num_scenes * 2 // 3 - 1, generator=gen)[: s.heads]
    # Content per (scene, spatial region of the frame, head): a global scene component, a
    # scene-specific regional one and a region "style" shared by all scenes (sky looks like sky).
    regions = s.frame_tokens // s.block_size
    unit = lambda *shape: F.normalize(torch.randn(*shape, s.heads, s.head_dim, generator=gen), dim=-1)  # noqa: E731
    global_emb, regional_emb, style_emb = unit(num_scenes + 1), unit(num_scenes + 1, regions), unit(regions)
    recency_dir = unit()
    frames_back = (s.history_frames - 1 - torch.arange(frames)).clamp(min=0).float()
    recency = 12.0 * torch.exp(-frames_back)  # local bias: neighbouring frames look alike
    recency[s.history_frames :] = 0.0
    heads = torch.arange(s.heads)
    token = torch.arange(frames * s.frame_tokens)
    frame, region = token // s.frame_tokens, (token % s.frame_tokens) // s.block_size
    scene = scene_of_frame.clamp(max=num_scenes)[frame][:, None].expand(-1, s.heads).clone()
    chunk_tokens = frame >= s.history_frames
    scene[chunk_tokens] = revisited  # the chunk shows each head's revisited scene again
    head = heads[None, :]
    content = (
        0.7 * global_emb[scene, head]
        + 0.5 * regional_emb[scene, region[:, None], head]
        + 0.5 * style_emb[region[:, None], head]
    )  # [tokens, H, D]
    k = 8.0 * content + recency[frame][:, None, None] * recency_dir
    k = k + 0.5 * torch.randn(k.shape, generator=gen)
    v = torch.randn(k.shape, generator=gen)
    q = 8.0 * content[chunk_tokens] + 8.0 * recency_dir
    q = q + 0.5 * torch.randn(q.shape, generator=gen)
    to_bhld = lambda x: x.transpose(0, 1).unsqueeze(0).contiguous()  # noqa: E731

    blocks_per_frame = s.frame_tokens // s.block_size
    needed = []
    for h in range(s.heads):
        scene_frames = (scene_of_frame[: s.history_frames] == revisited[h]).nonzero().flatten()
        needed.append({int(f) * blocks_per_frame + b for f in scene_frames for b in range(blocks_per_frame)})
    return to_bhld(q), to_bhld(k), to_bhld(v), needed


def dense_reference(q, k, v, sample: torch.Tensor):
    scale = q.shape[-1] ** -0.5
    out = F.scaled_dot_product_attention(q, k, v)
    probs = torch.softmax((q[:, :, sample] @ k.transpose(-1, -2)) * scale, dim=-1)  # [1, H, S, Lkv]
    return out, probs


def evaluate(s: Scenario, top_k: int = 32, methods=None) -> list[dict]:
    q, k, v, needed = make_history(s)
    history_len = s.history_len
    chunk_len = q.shape[2]
    sample = torch.randperm(chunk_len, generator=torch.Generator().manual_seed(1))[:64]
    dense_out, probs = dense_reference(q, k, v, sample)
    base = OmniMemConfig(
        block_size=s.block_size,
        top_k=top_k,
        sink_tokens=s.frame_tokens,
        local_tokens=s.chunk_frames * s.frame_tokens,
        backend="flex",
        compile=False,
    )
    methods = methods or {
        "adaptive": base,
        "never": base.replace(window_exclusion="never"),
        "always": base.replace(window_exclusion="always"),
        "truncation": None,
        "per-query-group (64)": base.replace(query_group_size=64),
    }
    num_blocks = -(-history_len // s.block_size)
    token_block = torch.arange(k.shape[2]) // s.block_size
    rows = []
    for name, config in methods.items():
        if config is None:  # sink + local window: a selection with nothing retrieved
            sel = select_blocks(q, k, history_len=history_len, config=base)
            fixed = sel.fixed_block_mask[:num_blocks]
            attended = fixed.expand(1, s.heads, 1, -1)
            retrieved = [set() for _ in range(s.heads)]
            keep = torch.cat([fixed[token_block[:history_len]], torch.ones(chunk_len, dtype=torch.bool)])
            out = F.scaled_dot_product_attention(q, k[:, :, keep], v[:, :, keep])
        else:
            sel = select_blocks(q, k, history_len=history_len, config=config)
            attended = sel.attended_block_mask()[..., :num_blocks]  # [1, H, G, NB]
            picked = sel.retrieved_block_idx[0]  # [H, G, top_k]
            retrieved = [set(picked[h][picked[h] >= 0].tolist()) for h in range(s.heads)]
            out = sparse_attention(q, k, v, history_len=history_len, config=config)
        recall = sum(len(retrieved[h] & needed[h]) / len(needed[h]) for h in range(s.heads)) / s.heads
        # Attention mass on attended tokens, for the sampled queries (with their own group).
        group_size = config.query_group_size if config is not None and config.query_group_size else chunk_len
        groups = (sample // group_size).clamp(max=attended.shape[2] - 1)
        token_attended = attended[0][:, groups][..., token_block[:history_len]]  # [H, S, history]
        history_probs = probs[0, :, :, :history_len]
        mass = float(((history_probs * token_attended).sum(-1) / history_probs.sum(-1)).mean())
        per_head_union = attended[0].any(dim=1)  # [H, NB]
        rows.append(
            dict(
                method=name,
                recall=recall,
                mass=mass,
                error=float((out - dense_out).norm() / dense_out.norm()),
                union_per_head=float(per_head_union.sum(-1).float().mean()),
                union_across_heads=int(per_head_union.any(0).sum()),
                union_buffer_mib=int(per_head_union.any(0).sum())
                * s.block_size
                * s.heads
                * s.head_dim
                * 2
                * 2
                / 2**20,
            )
        )
    return rows


SCENARIOS = {
    "recurring scene (needed = 32 blocks = the whole top_k budget)": Scenario(scene_frames=8),
    "short revisit (needed = 16 blocks: budget to spare)": Scenario(scene_frames=4),
}


def mean_rows(runs: list[list[dict]]) -> list[dict]:
    return [
        {
            key: (runs[0][i][key] if key == "method" else sum(run[i][key] for run in runs) / len(runs))
            for key in runs[0][i]
        }
        for i in range(len(runs[0]))
    ]


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}\n")
    print(
        "| method | recall of needed far blocks | dense history attention mass covered | output error vs "
        "dense | blocks per head (union over groups) | blocks across heads (union) | "
        "union-gather KV buffer (bf16) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['recall']:.1%} | {r['mass']:.1%} | {r['error']:.2e} | "
            f"{r['union_per_head']:.0f} | {r['union_across_heads']:.0f} | {r['union_buffer_mib']:.1f} MiB |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--plot", default="")
    args = parser.parse_args()
    s = Scenario()
    print(
        f"history {s.history_frames} frames x {s.frame_tokens} tokens = {s.history_len} tokens, chunk "
        f"{s.chunk_frames} frames, {s.heads} heads x {s.head_dim}, block {s.block_size} tokens (a quarter "
        f"frame), top_k {args.top_k}, sink 1 frame, local window 1 chunk; mean over {args.seeds} seeds"
    )
    results = {}
    for title, scenario in SCENARIOS.items():
        runs = [evaluate(dataclasses.replace(scenario, seed=seed), args.top_k) for seed in range(args.seeds)]
        results[title] = mean_rows(runs)
        print_table(title, results[title])
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
        for ax, (title, rows) in zip(axes, results.items(), strict=True):
            names = [r["method"].replace(" (64)", "") for r in rows]
            x = torch.arange(len(rows)).float()
            for offset, key, label in (
                (-0.2, "recall", "recall of needed blocks"),
                (0.2, "mass", "history attention mass"),
            ):
                ax.bar((x + offset).tolist(), [r[key] for r in rows], width=0.4, label=label)
            ax.set_xticks(x.tolist(), names, fontsize=7)
            ax.set_ylim(0, 1.05)
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
