#!/bin/bash
# A ResNet-20 φ whose noise generator learns: meta-train the noise generator on top of a scale network that already
# learned (benchmarks/results/phi_escape/README.md, "Where meta-training starts"), then transfer it.
#   1. the start: tin-full-resnet20's scale network (750 steps, seed 0; its own noise generator is at the origin) with
#      the structured noise generator of benchmarks/structured_phi.py (γ₁ = λ₂ = γ₂ = GAIN, default 0.05, on every tap);
#   2. STAGE2_STEPS (default 250) meta-training steps from there, the authors' protocol otherwise (resumes when rerun);
#   3. its transfer to TARGETS (default omniglot,cub) with ResNet-20 at 1500 steps, 3 seeds, two resumable workers,
#      into benchmarks/results/two_stage_1500.jsonl; the φ is copied to benchmarks/results/phi_two_stage/.
#   bash benchmarks/run_two_stage.sh   # the run lives in OUT (default runs/two-stage); SEEDS=0, TARGETS=omniglot narrow it
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/two-stage}
STAGE2_STEPS=${STAGE2_STEPS:-250}
PHI=benchmarks/results/phi_two_stage
source benchmarks/targets.sh
targets=$(target_specs "${TARGETS:-omniglot,cub}")

if [[ ! -f "$OUT/start/model.safetensors" ]]; then
  python benchmarks/structured_phi.py --gain "${GAIN:-0.05}" --output "$OUT/structured-mu"
  python benchmarks/graft_phi.py --scale-from hub_cards/metaperturb-tin-full-resnet20 --noise-from "$OUT/structured-mu" \
    --output "$OUT/start"
fi
resume=()
[[ -d "$OUT/phi/checkpoints" ]] && resume=(--resume)
OMP_NUM_THREADS=${THREADS:-2} python examples/meta_train.py --dataset "$DATA/tiny_imagenet_32_full" --arch resnet20 \
  --phi-init-from "$OUT/start" --steps "$STAGE2_STEPS" --log-every 5 --checkpoint-every 25 --output-dir "$OUT/phi" \
  "${resume[@]}"
mkdir -p "$PHI"
cp "$OUT/phi/config.json" "$OUT/phi/model.safetensors" "$OUT/phi/meta_training.json" "$PHI/"
cp "$OUT/phi/logs/metrics.jsonl" "$PHI/metrics.jsonl"

CLAIMS=$(mktemp -d)
trap 'rm -rf "$CLAIMS"' EXIT
for worker in 0 1; do
  OMP_NUM_THREADS=1 python benchmarks/transfer_grid.py --name two_stage_1500 --targets "$targets" --archs resnet20 \
    --methods metaperturb --perturbations "tin-full-resnet20-two-stage=$PHI" --seeds "${SEEDS:-0,1,2}" \
    --steps 1500 --mc-samples 10 --threads 1 --claims "$CLAIMS" ${BUDGET_S:+--time-budget-s "$BUDGET_S"} \
    --no-report > "benchmarks/results/two_stage_1500.shard$worker.log" 2>&1 &
done
wait
python benchmarks/transfer_grid.py --name two_stage_1500 --report
