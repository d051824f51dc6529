#!/usr/bin/env bash
# The GPU measurements issues 36 and 37 still wait for, one device call each of under 10 minutes (run
# from the repository root on the device machine; results and a log under $OUT; issue 39's
# were taken on 2026-12-07):
#
#   benchmarks/pending_gpu.sh 36   # quantized history: kernels, relative positions rotated in
#                                  # the kernel, the 4-minute int4 rollout (profiled), the
#                                  # selected branch, GPU tests (pytest-xdist)
#   benchmarks/pending_gpu.sh 37   # an hour: one int4 layer with relative positions at 1-60 min;
#                                  # native host offload and the disk tier (half the history
#                                  # paged out before each chunk) at 1 and 10 min
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
elif [ "$1" = rest1 ]; then  # what the H100 runs of 2026-12-07 left: the disk tier's bar, GPU tests
  step 60 python3 hour_gpu.py --minutes 10 --layers 1 --kv-format native --positions absolute \
    --json "$OUT/hour_host.json"
  step 100 python3 hour_gpu.py --minutes 10 --layers 1 --positions absolute --disk /tmp --evict-half \
    --json "$OUT/hour_disk.json"
  cd ..
  step 130 python3 -m pytest -q -p no:cacheprovider -n 16 --tb=short -rf tests/test_positions.py \
    tests/test_index.py tests/test_cache.py tests/test_host_syncs.py tests/test_disk.py
  cd benchmarks
  step 130 python3 codebases_gpu.py --layers 5 --json "$OUT/codebases.json"
elif [ "$1" = rest2 ]; then  # the rotation's cost, issue 38's codebases
  step 80 python3 self_forcing_rollout_gpu.py --frames 237 --no-offload --reps 2 --relative-only \
    --json "$OUT/sf237rel.json"
  step 170 python3 codebases_gpu.py --layers 10 --json "$OUT/codebases.json"
elif [ "$1" = disk ]; then  # the disk tier after it reads only the fetched blocks; the rotation
  step 45 python3 hour_gpu.py --minutes 10 --layers 1 --kv-format native --positions absolute \
    --json "$OUT/hour_host.json"
  step 70 python3 hour_gpu.py --minutes 10 --layers 1 --positions absolute --disk /tmp --evict-half \
    --json "$OUT/hour_disk.json"
  step 75 python3 self_forcing_rollout_gpu.py --frames 237 --no-offload --reps 2 --relative-only \
    --json "$OUT/sf237rel.json"
else
  echo "usage: pending_gpu.sh 36|37|rest1|rest2|disk" >>"$LOG"
fi
grep -v "DEBUG\|PytestBenchmark\|warner(" "$LOG" | tail -c 6000
