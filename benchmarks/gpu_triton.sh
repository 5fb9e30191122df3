#!/usr/bin/env bash
# One prepared GPU session for φ's Triton kernels, run from the repository root (device tool: bash
# benchmarks/gpu_triton.sh). First the correctness check on CUDA: tests/test_triton_kernels.py, i.e. the CPU kernel's
# matrix against eager with explicit noise (float32 and float64; TF32 off), drawn noise, torch.compile, max-autotune and
# CUDA-graph capture. Then benchmarks/overhead.py times plain, eager-φ and Triton-φ networks in the same rounds. Results
# go to $OUT (default benchmarks/results), named after the GPU: triton_check_<gpu>.log, overhead_gpu_<gpu>_triton.jsonl.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_OFFLINE=1 TRITON_DEFAULT_FP_FUSION=1
OUT="${OUT:-benchmarks/results}"; mkdir -p "$OUT"
nvidia-smi -L || exit 1
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().lower().replace('nvidia', '').split()[0])") || exit 1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" || exit 1
# Each kernel compiles once per shape and flag set (seconds each): the check is bounded; the benchmark runs anyway.
timeout "${CHECK_TIMEOUT_S:-300}" python -m pytest tests/test_triton_kernels.py -q -rs -p no:cacheprovider 2>&1 |
  tee "$OUT/triton_check_$gpu.log"
check=${PIPESTATUS[0]}
python benchmarks/overhead.py --device cuda --repeats "${REPEATS:-9}" --mc-samples 1,5 \
  --output "$OUT/overhead_gpu_${gpu}_triton.jsonl"
exit "$check"
