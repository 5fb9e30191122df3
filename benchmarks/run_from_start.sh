#!/bin/bash
# Meta-train a ResNet-20 φ from a given start, then transfer it: the shared second half of run_two_stage.sh and
# run_gated_start.sh, which build the start.
#   1. STEPS meta-training steps from the φ in START (`--phi-init-from`), the authors' protocol otherwise, with
#      meta-training seed SEED (default 0), in OUT/phi (resumes when rerun, THREADS default 2); the φ, its
#      meta_training.json and its log are copied to PHI;
#   2. its transfer to TARGETS (default omniglot,cub) with ResNet-20 at 1500 steps, SEEDS (default 0,1,2), two
#      resumable workers, κ annealed to STRENGTH (default 1, the full perturbation), into
#      benchmarks/results/NAME.jsonl under the perturbation name LABEL; NAME_summary.md pairs it by seed with the
#      grid's none runs (grid_summary.py --baseline).
#   START=runs/x/start OUT=runs/x STEPS=750 PHI=benchmarks/results/phi_x NAME=x_1500 LABEL=x bash benchmarks/run_from_start.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
for required in START OUT STEPS PHI NAME LABEL; do
  [[ -n "${!required:-}" ]] || { echo "run_from_start.sh needs $required (see its header)" >&2; exit 2; }
done
source benchmarks/targets.sh
targets=$(target_specs "${TARGETS:-omniglot,cub}")

resume=()
[[ -d "$OUT/phi/checkpoints" ]] && resume=(--resume)
OMP_NUM_THREADS=${THREADS:-2} python examples/meta_train.py --dataset "$DATA/tiny_imagenet_32_full" --arch resnet20 \
  --phi-init-from "$START" --seed "${SEED:-0}" --steps "$STEPS" --log-every 5 --checkpoint-every 25 \
  --output-dir "$OUT/phi" "${resume[@]}"
mkdir -p "$PHI"
cp "$OUT/phi/config.json" "$OUT/phi/model.safetensors" "$OUT/phi/meta_training.json" "$PHI/"
cp "$OUT/phi/logs/metrics.jsonl" "$PHI/metrics.jsonl"

CLAIMS=$(mktemp -d)
trap 'rm -rf "$CLAIMS"' EXIT
for worker in 0 1; do
  OMP_NUM_THREADS=1 python benchmarks/transfer_grid.py --name "$NAME" --targets "$targets" --archs resnet20 \
    --methods metaperturb --perturbations "$LABEL=$PHI" \
    --noise-strengths "${STRENGTH:-1}" --seeds "${SEEDS:-0,1,2}" \
    --steps 1500 --mc-samples 10 --threads 1 --claims "$CLAIMS" ${BUDGET_S:+--time-budget-s "$BUDGET_S"} \
    --no-report > "benchmarks/results/$NAME.shard$worker.log" 2>&1 &
done
wait
python benchmarks/transfer_grid.py --name "$NAME" --report
python benchmarks/grid_summary.py "benchmarks/results/$NAME.jsonl" --baseline benchmarks/results/grid_1500.jsonl \
  --output "benchmarks/results/${NAME}_summary.md" > /dev/null
