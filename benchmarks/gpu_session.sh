#!/usr/bin/env bash
# One prepared GPU session (device tool): meta-train φ runs side by side on one GPU within time budgets, then the
# overhead benchmark on the GPU (SKIP_OVERHEAD=1 skips it). Each run in RUNS is ARCH:SEED:BUDGET_S; they share the
# GPU (small-batch runs are launch-bound, so several slow each other little). Needs PACKED (benchmarks/pack_webp.py)
# carried along; results go to $OUT as one archive per φ folder (weights, meta_training.json, metrics) and JSON lines.
#   bash benchmarks/gpu_session.sh   # Conv4 and ResNet-20 on the 150-per-class repack, as for tin-conv4 / tin-resnet20
#   PACKED=.gpu/tin_full_train_q80.parquet SOURCE="tiny_imagenet_32_full (train split, WebP q80 repack)" \
#     RUNS="resnet20:0:480 resnet20:1:480" SKIP_OVERHEAD=1 bash benchmarks/gpu_session.sh
#     # a residual φ from the full protocol, two meta-training seeds (the paper keeps the best of 5); beside a
#     # Conv4 run, ResNet-20 took 0.8 s a step on an H100, so each may be cut short of 750 steps (meta_training.json says)
#   DEVICE_CHECK=0 SKIP_OVERHEAD=1 STEPS=2 RUNS=conv4:0:60 PACKED=... bash benchmarks/gpu_session.sh   # a dry run on a CPU
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_DISABLE_PROGRESS_BARS=1
OUT="${OUT:-/tmp/gpu-out}"; mkdir -p "$OUT"
WORK=$(mktemp -d)
PACKED=${PACKED:-.gpu/tin_train_webp.parquet}
[ -f "$PACKED" ] || { echo "no $PACKED: make it with benchmarks/pack_webp.py and carry it along" >&2; exit 2; }
[ "${DEVICE_CHECK:-1}" = 0 ] || nvidia-smi -L || exit 1
python -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
for run in ${RUNS:-conv4:0:100 resnet20:0:220}; do
  IFS=: read -r arch seed budget <<< "$run"
  name="phi-$arch-seed$seed"
  (python benchmarks/meta_train_tensors.py "$PACKED" --arch "$arch" --seed "$seed" --steps "${STEPS:-750}" \
     --time-budget-s "$budget" --source-name "${SOURCE:-tiny_imagenet_32 (train split)}" --output-dir "$WORK/$name" \
     2>&1 | grep -v -E "shards|meta-training:" | sed "s/^/[$arch seed $seed] /"
   tar czf "$OUT/$name.tgz" -C "$WORK" "$name") &
done
wait
rm -rf "$WORK"
[ "${SKIP_OVERHEAD:-0}" = 1 ] || python benchmarks/overhead.py --device cuda --repeats 9 --output "$OUT/overhead_gpu.jsonl"
