#!/usr/bin/env bash
# One prepared GPU session (device tool): meta-train φ with conv4 and with resnet20 on Tiny ImageNet within time
# budgets, then the overhead benchmark on the GPU. Needs .gpu/tin_train_webp.parquet (benchmarks/pack_webp.py)
# carried along; results go to $OUT as archives and JSON lines.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_DISABLE_PROGRESS_BARS=1
OUT="${OUT:-/tmp/gpu-out}"; mkdir -p "$OUT"
WORK=/tmp/metaperturb-gpu; mkdir -p "$WORK"
nvidia-smi -L
python -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
# Both networks at once: these small-batch runs are launch-bound, so they share one GPU with little slowdown.
for spec in "conv4 ${CONV4_BUDGET_S:-100}" "resnet20 ${RESNET20_BUDGET_S:-220}"; do
  set -- $spec
  (python benchmarks/meta_train_tensors.py .gpu/tin_train_webp.parquet --arch "$1" --time-budget-s "$2" \
     --output-dir "$WORK/phi-tin-$1" 2>&1 | grep -v -E "shards|meta-training:" | sed "s/^/[$1] /"
   tar czf "$OUT/phi-tin-$1.tgz" -C "$WORK" "phi-tin-$1") &
done
wait
[ "${SKIP_OVERHEAD:-0}" = 1 ] || python benchmarks/overhead.py --device cuda --repeats 9 --output "$OUT/overhead_gpu.jsonl"
