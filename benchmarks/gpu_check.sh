#!/usr/bin/env bash
# The checks that need a GPU, as one command, from a machine that already has torch with CUDA:
#   1. rge's engine tests on CUDA in float32 (real graph capture, real kernels; the authors' reference on
#      the CPU in float32, compared by token ids and cosine; a graph that falls back is an error),
#   2. a quick profile of the GPU benchmark (Qwen2.5-VL-3B shapes, random weights, bf16; the authors'
#      batch-1 loop timed on a sample of 4 queries),
#   3. the KV caches compared (dynamic, preallocated, static: speed and same tokens),
#   4. how often bf16 flips a greedy token against fp32.
# Each step runs under its own timeout (9 minutes in all at most); everything lands in one folder.
#
#   benchmarks/gpu_check.sh [FOLDER]                          # default folder: gpu-check-<date>
#   RGE_CHECK_DEVICE=cpu RGE_CHECK_QUICK=1 benchmarks/gpu_check.sh FOLDER   # the same steps, tiny, on the CPU
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-check-$(date +%Y%m%d-%H%M%S)}
device=${RGE_CHECK_DEVICE:-cuda}
mkdir -p "$out"
status=0

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a timeout, its output in FOLDER/NAME.log
  local name=$1 seconds=$2
  shift 2
  echo "== $name (at most ${seconds}s)"
  timeout --kill-after=10 "$seconds" "$@" > "$out/$name.log" 2>&1
  local code=$?
  echo "$name: exit $code" | tee -a "$out/summary.txt"
  [ "$code" -eq 0 ] || status=1
}

python -c "import torch, platform; print(platform.platform(), 'torch', torch.__version__, 'cuda',
torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" > "$out/machine.txt" 2>&1
tests="tests/test_queries.py tests/test_kv_cache.py tests/test_stream.py tests/test_cache_pool.py
tests/test_static_step.py tests/test_decoding_settings.py tests/test_batches.py tests/test_vision_attention.py"
if [ "${RGE_CHECK_QUICK:-0}" = 1 ]; then
  tests="tests/test_static_step.py"
  size=tiny run=(--queries 4 --documents 4 --batch-sizes 4 --budget 4 --floor-batch 4)
  kv=(--queries 4 --batch-size 4 --budget 4 --repeats 1) flips=(--queries 4 --budget 4 --batch-size 4)
else
  size=3b run=(--queries 32 --documents 64 --batch-sizes 8 32 --budget 64 --floor-batch 32 --reference-queries 4)
  kv=(--queries 64 --batch-size 64 --budget 32 --repeats 1) flips=(--queries 32 --budget 32 --batch-size 16)
fi

# shellcheck disable=SC2086  # the test files are separate words
step tests 220 python -m pytest -q -p no:cacheprovider --rge-device "$device" \
  -W error::rge.engine.static_step.GraphFallbackWarning --junitxml "$out/tests.xml" $tests
step run 140 python benchmarks/run.py --mode gpu --device "$device" --sizes "$size" "${run[@]}" --output "$out/run.json"
step kv_cache 80 python benchmarks/kv_cache.py --device "$device" --sizes "$size" "${kv[@]}"
step bf16_flips 80 python benchmarks/bf16_flips.py --device "$device" --sizes "$size" "${flips[@]}" \
  --output "$out/bf16-flips.json"
echo "results in $out (summary.txt, one .log per step)"
exit "$status"
