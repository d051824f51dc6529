#!/usr/bin/env bash
# The GPU measurements issues 36 and 39 still wait for, in two device calls of under 10 minutes
# each (run from the repository root on the device machine; results and a log under $OUT).
#
#   benchmarks/pending_gpu.sh 39   # the authors' model: layer + cache update, patched rollouts, GPU tests
#   benchmarks/pending_gpu.sh 36   # quantized history: kernels, the 4-minute int4 rollout, GPU tests
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
if [ "$1" = 39 ]; then
  step 150 python3 gated_gpu.py --patterns random --histories 60 237 --json "$OUT/gated.json"
  step 90 python3 gated_rollout_gpu.py --patched --max-frames 240 --frames 237 --json "$OUT/resident.json"
  step 90 python3 gated_rollout_gpu.py --patched --max-frames 240 --frames 237 --offload --json "$OUT/offload.json"
  step 90 python3 gated_rollout_gpu.py --patched --max-frames 240 --frames 237 --offload --kv-format int4 \
    --json "$OUT/offload_int4.json"
  cd ..
  step 150 python3 -m pytest -q -p no:cacheprovider tests/test_gated.py tests/test_causal_wan.py \
    tests/test_gated_cache.py property_tests/test_gated_property.py tests/test_host_syncs.py
else
  step 120 python3 kv_formats_gpu.py --json "$OUT/kvfmt.json"
  step 200 python3 self_forcing_rollout_gpu.py --kv-format int4 --frames 960 --reps 2 --json "$OUT/sf960.json"
  step 80 python3 kv_formats_error.py --frames 60 --json "$OUT/kverr.json"
  cd ..
  step 150 python3 -m pytest -q -p no:cacheprovider property_tests/test_quantized_attention_property.py \
    property_tests/test_quantized_cache_property.py tests/test_cache.py tests/test_sizing.py tests/test_kernels.py
fi
tail -c 4000 "$LOG"
