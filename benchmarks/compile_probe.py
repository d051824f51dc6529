"""Where does the compiled selection's first call spend its time at a given head count? (GPU)

Usage: ``python benchmarks/compile_probe.py --heads 40 --dump-after 150``: compiles
``select_blocks`` at wan shapes (60 s history) and, if still compiling after ``--dump-after``
seconds, prints every thread's stack and exits; else times later calls (median).
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
import time

import torch
import triton

from omnimem import OmniMemConfig, select_blocks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--history", type=int, default=369720)
    parser.add_argument("--dump-after", type=float, default=150)
    args = parser.parse_args()
    faulthandler.dump_traceback_later(args.dump_after, exit=True, file=sys.stdout)
    chunk = 4680
    q = torch.randn(1, args.heads, chunk, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, args.heads, args.history + chunk, 128, device="cuda", dtype=torch.bfloat16)
    sums = torch.randn(1, args.heads, -(-(args.history + chunk) // 128), 128, device="cuda")
    config = OmniMemConfig(top_k=32, sink_tokens=1560, local_tokens=chunk)
    start = time.perf_counter()
    select_blocks(q, k, history_len=args.history, config=config, key_block_sums=sums)
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    ms = triton.testing.do_bench(
        lambda: select_blocks(q, k, history_len=args.history, config=config, key_block_sums=sums),
        return_mode="median",
    )
    print(f"heads {args.heads}: first call {first:.1f} s, then {ms:.3f} ms per call", flush=True)


if __name__ == "__main__":
    main()
