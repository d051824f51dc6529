#!/usr/bin/env bash
# The GPU measurements of issues 36-38, one device call each of under 10 minutes (run
# from the repository root on the device machine; results and a log under $OUT; issue 39's
# were taken on 2026-12-07):
#
#   benchmarks/pending_gpu.sh 36   # quantized history: kernels, relative positions rotated in
#                                  # the kernel, the 4-minute int4 rollout (profiled), the
#                                  # selected branch, GPU tests (pytest-xdist)
#   benchmarks/pending_gpu.sh 37   # an hour: one int4 layer with relative positions at 1-60 min;
#                                  # native host offload and the disk tier (half the history
#                                  # paged out before each chunk) at 1 and 10 min
#   benchmarks/pending_gpu.sh now  # the sparse call, the kernels' GPU tests, the gated selected
#                                  # branch, their model classes (ran 2026-12-07, H100)
#   benchmarks/pending_gpu.sh words # the word-level decoders beside the byte-wise ones (ran)
#   benchmarks/pending_gpu.sh decode # issue 36: the Gluon kernel's floor and switches, the
#                                  # Hopper kernels' GPU tests; issue 38: the codebases at 30
#                                  # layers, LongLive's class; FULL=1: the 4-minute int4 chunk
#                                  # profiled with the Gluon kernel and the Triton-language one
#   benchmarks/pending_gpu.sh next # issue 36: fp8 key products and the gated kernel's fp16
#                                  # products (tests, then timed beside the defaults), fp16
#   benchmarks/pending_gpu.sh codebases # issue 38: the codebases at 30 layers (an H200), both
#                                  # sides interleaved
#
# Both 36 and 37 ran on an H100 on 2026-12-07 (results in docs/memory.md, docs/positions.md).
#
# The device image has pytest, hypothesis and einops; a machine without them can be given a
# folder of them (`.devpkgs`, excluded from git, passed in `carry`), used only then: a copy from
# another Python would shadow the image's (hypothesis has a compiled part). omnimem runs from
# the tree (omnimem.backends is linked in).
set -u
ln -sfn ../backends omnimem/backends
export PYTHONPATH=$PWD
python3 -c 'import pytest, hypothesis, einops' 2>/dev/null || export PYTHONPATH=$PWD/.devpkgs:$PWD
export OMNIMEM_TEST_DEVICE=cuda HYPOTHESIS_PROFILE=gpu
LOG=$OUT/log_$1.txt
step() { local t=$1; shift; echo "=== $(date +%T) [$t s] $*" >>"$LOG"; (timeout "$t" "$@") >>"$LOG" 2>&1; echo "=== rc=$?" >>"$LOG"; }
{ date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.version.cuda)'; } >>"$LOG" 2>&1
cd benchmarks
if [ "$1" = 36 ]; then
  step 90 python3 kv_formats_gpu.py --json "$OUT/kvfmt.json"
  step 100 python3 self_forcing_rollout_gpu.py --frames 237 --no-offload --reps 2 --relative-only \
    --json "$OUT/sf237rel.json"
  step 170 python3 self_forcing_rollout_gpu.py --kv-format int4 --frames 960 --reps 2 --profile \
    --json "$OUT/sf960.json"
  step 70 python3 gated_gpu.py --patterns random --histories 60 --json "$OUT/gated.json"
  cd ..
  step 150 python3 -m pytest -q -p no:cacheprovider -n 8 --tb=line -rf tests/test_positions.py tests/test_index.py \
    property_tests/test_quantized_attention_property.py property_tests/test_quantized_cache_property.py \
    tests/test_cache.py tests/test_kernels.py tests/test_gated_cache.py tests/test_host_syncs.py
elif [ "$1" = 37 ]; then
  step 280 python3 hour_gpu.py --minutes 1 10 30 60 --layers 1 --kv-format int4 --positions relative \
    --json "$OUT/hour_int4.json"
  step 100 python3 hour_gpu.py --minutes 1 10 --layers 1 --kv-format native --positions relative \
    --json "$OUT/hour_host.json"
  step 150 python3 hour_gpu.py --minutes 1 10 --layers 1 --positions relative --disk /tmp --evict-half \
    --json "$OUT/hour_disk.json"
elif [ "$1" = now ]; then  # one call of under 10 minutes: the sparse call (both decoders of each
                             # format in the Gluon kernel; word-level decoding in the Triton-language
                             # one), the kernels' GPU tests, the gated selected branch, their own
                             # model classes (LongLive 1.3B ran on 2026-12-07)
  step 90 python3 kv_formats_gpu.py --quick --json "$OUT/kvfmt_gluon.json"
  cd ..
  step 100 python3 -m pytest -q -p no:cacheprovider -n 16 --tb=short -rf tests/test_kernels.py -k "hopper" \
    property_tests/test_quantized_attention_property.py tests/test_gated_cache.py
  cd benchmarks
  step 75 python3 gated_gpu.py --patterns random --histories 60 --json "$OUT/gated.json"
  [ -d ../.theirs ] && step 300 python3 their_models_gpu.py --theirs ../.theirs --child-timeout 80 \
    --only Self-Forcing "Rolling Forcing" CausVid LongLive-2.0 --json "$OUT/their_models.json"
elif [ "$1" = words ]; then  # the word-level decoders beside the byte-wise ones, one call: the
                               # sparse call with and without them in the Triton-language kernel
  step 75 python3 kv_formats_gpu.py --quick --json "$OUT/kvfmt_words.json"
  step 75 env OMNIMEM_DECODE_WORDS=0 python3 kv_formats_gpu.py --quick --json "$OUT/kvfmt_bytes.json"
  cd ..
  step 90 python3 -m pytest -q -p no:cacheprovider -n 16 --tb=short -rf tests/test_kernels.py -k "hopper and int4"
elif [ "$1" = decode ]; then  # one call while machines are scarce (ask for an H200): issue 36's
  # kernel rows (the Gluon kernel's floor and switches: early operands, int4's deeper code
  # ring; bf16 with two stages), the Hopper kernels' GPU tests (the fma subtract's first GPU
  # run; poisoned allocations), issue 38's codebases at 30 layers and LongLive's class again
  # (carry .theirs/); then, with time left (FULL=1), the 4-minute int4 chunk profiled
  step 150 python3 kv_formats_gpu.py --quick --json "$OUT/kvfmt_floor.json"
  cd ..
  step 100 python3 -m pytest -q -p no:cacheprovider -n 16 --tb=short -rf tests/test_kernels.py -k "hopper"
  cd benchmarks
  layers=$(python3 -c 'import torch; print(30 if torch.cuda.get_device_properties(0).total_memory > 120e9 else 10)')
  step 200 python3 codebases_gpu.py --layers "$layers" --only LongLive "Rolling Forcing" LongLive-2.0 \
    Self-Forcing CausVid --json "$OUT/codebases.json"
  [ -d ../.theirs ] && step 100 python3 their_models_gpu.py --theirs ../.theirs --child-timeout 95 \
    --only LongLive --json "$OUT/their_models_longlive.json"
  [ -n "${FULL:-}" ] && step 150 python3 self_forcing_rollout_gpu.py --kv-format int4 --frames 960 --reps 2 \
    --kernel gluon --profile --json "$OUT/sf960_gluon.json"
  [ -n "${FULL:-}" ] && step 90 python3 self_forcing_rollout_gpu.py --kv-format int4 --frames 960 --reps 2 \
    --kernel triton --json "$OUT/sf960_lang.json"
elif [ "$1" = next ]; then  # issue 36, what is open after 2026-12-07: the Hopper kernel tests and
  # the quantized property tests (the first GPU run of fp8 key products, of three stages for fp8
  # and int4 and of the gated kernel's fp16 products; the early reads' property tests), the
  # sparse call with every variant beside the default, the same in fp16 (fp8 decodes by one
  # hardware conversion a pair there), the gated selected branch with fp16 products
  cd ..
  step 180 python3 -m pytest -q -p no:cacheprovider -n 16 --tb=short -rf tests/test_kernels.py -k "hopper or fp16" \
    property_tests/test_quantized_attention_property.py tests/test_gated.py
  cd benchmarks
  # (the new variants compile on the device first: 20-30 s each)
  step 150 python3 kv_formats_gpu.py --quick --json "$OUT/kvfmt_bf16.json"
  step 120 python3 kv_formats_gpu.py --quick --dtype float16 --json "$OUT/kvfmt_fp16.json"
  step 70 python3 gated_gpu.py --patterns random --histories 60 --json "$OUT/gated.json"
elif [ "$1" = codebases ]; then  # issue 38 (ask for an H200: its bar is on one; an H100 holds 10
  # layers): the codebases table with both sides interleaved (the last run timed one side after
  # the other and drifted)
  layers=$(python3 -c 'import torch; print(30 if torch.cuda.get_device_properties(0).total_memory > 120e9 else 10)')
  step 280 python3 codebases_gpu.py --layers "$layers" --only LongLive "Rolling Forcing" LongLive-2.0 \
    Self-Forcing CausVid --json "$OUT/codebases.json"
else
  echo "usage: pending_gpu.sh 36|37|now|words|decode|next|codebases" >>"$LOG"
fi
grep -v "DEBUG\|PytestBenchmark\|warner(" "$LOG" | tail -c 6000
