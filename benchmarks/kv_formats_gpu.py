"""The sparse ``triton`` call over a quantized history (fp8, int4) beside the bf16 cache, at
Wan2.1-1.3B shapes (GPU; one device call). Issue 36's speed and bytes bars.

Per history length: bf16 keys/values, a selection from their block sums (the same for every
format: selection reads the native keys), the whole blocks quantized into a ``QuantizedBlocks``
store, the partial block and the chunk in a native tail. Each format's kernel output is checked
against a float32 attention over exactly the attended tokens of the *dequantized* history (the
kernel's correctness), and its error against the bf16 cache's output is reported (the format's
cost). Timed with ``triton.testing.do_bench`` (median): the bf16 run step
(``triton_backend.forward``, on Hopper the Gluon kernel) and the quantized kernel per format and
tile configuration; beside them the Triton-language kernel on the bf16 history, the same kernel
the quantized formats run (on Hopper the bf16 call runs the faster Gluon kernel). Bytes: the
store's against the bf16 history's. ``--dtype float16``: the same in fp16 (the "bf16" rows are
then the native fp16 history): fp8 codes become fp16 pairs by one hardware conversion each.

    python benchmarks/kv_formats_gpu.py [--histories 369720] [--top-k 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
from attention_gpu import FRAME_TOKENS, bench, environment, gather_reference
from backends_gpu import make_inputs, rel_err

from omnimem import OmniMemConfig, select_blocks
from omnimem.backends import gluon_attention
from omnimem.backends import triton as triton_backend
from omnimem.backends.quantized_attention import dequantized_history, quantized_attention
from omnimem.kernels.block_sums import block_sums
from omnimem.store.blocks import QuantizedBlocks

# Tile configurations of the quantized kernel (keyword arguments of quantized_attention, over
# triton_attention.scattered_attention's defaults: 128 x 128 tiles, 8 warps, 3 stages).
VARIANTS = [
    dict(),  # the default (GLUON_FORMATS on Hopper, else the Triton-language kernel)
    dict(kernel="triton"),  # the Triton-language kernel (decodes in registers)
    dict(kernel="gluon"),  # Hopper: a producer warpgroup loads and dequantizes code tiles
    # the Gluon kernel's floor: code bytes widened into the stages, not decoded (wrong outputs)
    dict(kernel="gluon", floor_copy=True),
    # the producer's global reads after the stage wait (as before 2026-12-07)
    dict(kernel="gluon", early_operands=False),
    # fp8 only (last of --quick's: new, not yet run on a GPU): key codes multiplied as stored by
    # e4m3 queries (FP8_KEY_PRODUCTS), values decoded
    dict(kernel="gluon", key_products=True),
    # and three stages, values decoded in place, e4m3 queries in registers (FP8_THREE_STAGES)
    dict(kernel="gluon", key_products=True, three_stages=True),
    # int4 only: three stages, both halves decoded in place (INT4_THREE_STAGES)
    dict(kernel="gluon", int4_three_stages=True),
    dict(block_n=64),
    dict(num_stages=2),
    dict(block_m=64, num_warps=4),
]


TIMED = ("ms", "err_vs_dequantized", "err_vs_bf16_cache")
SWITCHES = dict(
    floor_copy="FLOOR_COPY",
    early_operands="EARLY_OPERANDS",
    key_products="FP8_KEY_PRODUCTS",
    three_stages="FP8_THREE_STAGES",
    int4_three_stages="INT4_THREE_STAGES",
)  # key: switch
DEFAULTS = {name: getattr(gluon_attention, name) for name in SWITCHES.values()}


def run_shape(heads: int, history_len: int, top_k: int, chunk_len: int, dtype=torch.bfloat16) -> dict:
    q, k, v = make_inputs(heads, history_len, chunk_len, dtype=dtype)
    scale, bs = 128**-0.5, 128
    config = OmniMemConfig(block_size=bs, top_k=top_k, sink_tokens=FRAME_TOKENS, local_tokens=chunk_len)
    history = torch.tensor(history_len, device="cuda")
    sel = select_blocks(
        q, k, history_len=history_len, config=config, key_block_sums=block_sums(k, history, bs)
    )
    row = dict(heads=heads, history=history_len, top_k=top_k, chunk=chunk_len, dtype=str(dtype))
    bf16 = triton_backend.forward(
        q, k, v, sel, chunk_len=chunk_len, scale=scale, return_lse=False, config=config
    )[0]
    ref = gather_reference(q, k, v, sel, history_len, chunk_len, scale)
    row["bf16"] = dict(ms=bench(lambda: triton_backend.forward(
        q, k, v, sel, chunk_len=chunk_len, scale=scale, return_lse=False, config=config)),
        err_vs_float32=rel_err(bf16, ref), history_bytes=2 * k[:, :, :history_len].numel() * 2)  # fmt: skip
    from omnimem.backends.triton_attention import scattered_attention

    table_idx, table_num = triton_backend.tile_tables(sel, q_len=chunk_len, block_m=128)
    lang = functools.partial(
        scattered_attention, q, k, v, block_idx=table_idx, num_blocks=table_num, block_attended=None,
        history_len=history, chunk_len=chunk_len, block_size=bs, query_group_size=chunk_len, scale=scale,
        return_lse=False,
    )  # fmt: skip
    row["bf16_triton_lang"] = dict(ms=bench(lang), err_vs_float32=rel_err(lang()[0], ref))
    if gluon_attention.supported(q, k, v, block_size=bs, grouped=False):
        # the Gluon kernel on bf16 with the quantized kernels' two stages (they have three):
        # what the stage count alone costs
        two = functools.partial(
            gluon_attention.scattered_attention, q, k, v, block_idx=table_idx, num_blocks=table_num,
            history_len=history, chunk_len=chunk_len, block_size=bs, scale=scale, return_lse=False,
            num_sms=torch.cuda.get_device_properties(q.device).multi_processor_count, stages=2,
        )  # fmt: skip
        row["bf16_gluon_2_stages"] = dict(ms=bench(two), err_vs_float32=rel_err(two()[0], ref))
    whole = history_len // bs * bs
    for kv_format in ("fp8", "int4"):
        store = QuantizedBlocks(kv_format, batch=1, num_kv_heads=heads, capacity=history_len, head_dim=128,
                                block_size=bs, device=q.device)  # fmt: skip
        store.write(0, k[:, :, :whole], v[:, :, :whole])
        tail_k, tail_v = k[:, :, whole:], v[:, :, whole:]
        result = dict(history_bytes=store.nbytes + 2 * (history_len - whole) * heads * 128 * 2)
        result["bytes_vs_bf16"] = result["history_bytes"] / row["bf16"]["history_bytes"]
        read_k, read_v = dequantized_history(store, tail_k, tail_v, history_len=history_len, dtype=dtype)
        want = gather_reference(q, read_k, read_v, sel, history_len, chunk_len, scale)
        del read_k, read_v
        result["variants"] = []
        for variant in VARIANTS:
            if (variant.get("key_products") and kv_format != "fp8") or (
                variant.get("int4_three_stages") and kv_format != "int4"
            ):
                continue
            options = {k: v for k, v in variant.items() if k not in SWITCHES}
            for key, name in SWITCHES.items():
                setattr(gluon_attention, name, variant.get(key, DEFAULTS[name]))
            block_idx, num_blocks = triton_backend.tile_tables(
                sel, q_len=chunk_len, block_m=variant.get("block_m", 128)
            )

            run = functools.partial(
                quantized_attention, q, store, tail_k, tail_v, block_idx=block_idx, num_blocks=num_blocks,
                block_attended=None, history_len=history_len, chunk_len=chunk_len,
                query_group_size=chunk_len, scale=scale, return_lse=False, **options,
            )  # fmt: skip

            try:
                out = run()[0]
                result["variants"].append(dict(
                    **variant, ms=bench(run), err_vs_dequantized=rel_err(out, want),
                    err_vs_bf16_cache=rel_err(out, bf16.float()),
                ))  # fmt: skip
            except Exception as err:  # a tile configuration that does not compile: say so, go on
                result["variants"].append(dict(**variant, error=str(err).splitlines()[0][:200]))
            for name, value in DEFAULTS.items():
                setattr(gluon_attention, name, value)
        timed = [r for r in result["variants"] if "ms" in r and not r.get("floor_copy")]  # a floor: wrong
        result["best"] = min(timed, key=lambda r: r["ms"]) if timed else None
        row[kv_format] = result
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--histories", type=int, nargs="+", default=[369720], help="history tokens")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--chunk-tokens", type=int, default=3 * FRAME_TOKENS)
    parser.add_argument("--json", default=None)
    # float16: fp8 codes become exact fp16 pairs by one hardware conversion each (bf16 needs five
    # integer operations a pair): what the decode would cost with fp16 operands
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the default, the Triton-language and Gluon kernels (the Gluon kernel's floor, switches) only",
    )
    args = parser.parse_args()
    if args.quick:
        VARIANTS[8:] = []
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    rows = [run_shape(args.heads, h, args.top_k, args.chunk_tokens, dtype) for h in args.histories]
    result = dict(environment=environment(), rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(result["environment"])
    head = ("history", "format", "ms", "x bf16", "bytes x", "err kernel", "err vs bf16")
    print("{:>8} {:>6} {:>7} {:>7} {:>8} {:>11} {:>11}".format(*head))
    for row in rows:
        base, bf16 = row["bf16"]["ms"], row["bf16"]
        print(f"{row['history']:>8} {'bf16':>6} {base:7.3f} {1:7.2f} {1:8.3f} {bf16['err_vs_float32']:11.2e}")
        lang = row["bf16_triton_lang"]
        print(f"{'':>8} {'(lang)':>6} {lang['ms']:7.3f} {lang['ms'] / base:7.2f} {1:8.3f} "
              f"{lang['err_vs_float32']:11.2e}  (the Triton-language kernel on bf16)")  # fmt: skip
        if "bf16_gluon_2_stages" in row:
            two = row["bf16_gluon_2_stages"]
            print(f"{'':>8} {'(2st)':>6} {two['ms']:7.3f} {two['ms'] / base:7.2f} {1:8.3f} "
                  f"{two['err_vs_float32']:11.2e}  (the Gluon kernel on bf16, 2 stages)")  # fmt: skip
        for kv_format in ("fp8", "int4"):
            r, best = row[kv_format], row[kv_format]["best"]
            if best is None:
                print(f"{row['history']:>8} {kv_format:>6} failed: {r['variants']}")
                continue
            errors = f"{best['err_vs_dequantized']:11.2e} {best['err_vs_bf16_cache']:11.2e}"
            options = ", ".join(f"{k}={v}" for k, v in best.items() if k not in TIMED)
            tile = f"({options or 'defaults'})"
            timing = f"{best['ms']:7.3f} {best['ms'] / base:7.2f} {r['bytes_vs_bf16']:8.3f}"
            print(f"{row['history']:>8} {kv_format:>6} {timing} {errors}  {tile}")
            for other in r["variants"]:  # every variant: the side-by-side the issue asks for
                if other is best:
                    continue
                label = ", ".join(f"{k}={v}" for k, v in other.items() if k not in TIMED) or "defaults"
                ms = f"{other['ms']:7.3f} {other['ms'] / base:7.2f}" if "ms" in other else other["error"][:60]
                print(f"{'':>8} {'':>6} {ms}  ({label})")


if __name__ == "__main__":
    main()
