#!/bin/bash
# The released gated φ (hub_cards/metaperturb-tin-full-resnet20-gated, meta-trained by run_gated_start.sh) across the
# whole 1500-step grid: the three targets × ResNet-20, Conv4 and VGG-9 (which it did not see in meta-training), seeds
# 0-2, κ annealed to STRENGTH (default 0.5, the strength its card gives). Two resumable workers share a claims folder,
# one thread each; records join benchmarks/results/grid_1500.jsonl (runs already there are skipped), then the grid's
# report and summary are remade (grid_summary.py's last table judges this φ against the targets).
#   bash benchmarks/run_gated_grid.sh                      # ResNet-20 and Conv4 first, then VGG-9
#   STRENGTH=1 PHASES="conv4" bash benchmarks/run_gated_grid.sh
# PHASES lists the --archs of each phase, run one after another (default "resnet20,conv4 vgg9"); BUDGET_S=8000 starts
# no run that would end later than that many seconds after this script started (run_grid_1500.sh explains how).
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/targets.sh
targets=$(target_specs "${TARGETS:-cub,cifar10,omniglot}")
started=$(date +%s)
CLAIMS=$(mktemp -d)
trap 'rm -rf "$CLAIMS"' EXIT
for archs in ${PHASES:-resnet20,conv4 vgg9}; do
  budget=()
  if [[ -n "${BUDGET_S:-}" ]]; then
    left=$((BUDGET_S - $(date +%s) + started))
    budget=(--time-budget-s $((left > 0 ? left : 0)))
  fi
  for worker in 0 1; do
    OMP_NUM_THREADS=1 python benchmarks/transfer_grid.py --name grid_1500 --targets "$targets" --archs "$archs" \
      --methods metaperturb --perturbations tin-full-resnet20-gated=hub_cards/metaperturb-tin-full-resnet20-gated \
      --noise-strengths "${STRENGTH:-0.5}" --seeds "${SEEDS:-0,1,2}" --steps 1500 --mc-samples 10 --threads 1 \
      --claims "$CLAIMS" "${budget[@]}" --no-report >> "benchmarks/results/grid_1500.shard$worker-gated.log" 2>&1 &
  done
  wait
done
python benchmarks/transfer_grid.py --name grid_1500 --report
python benchmarks/grid_summary.py benchmarks/results/grid_1500.jsonl --output benchmarks/results/grid_1500_summary.md \
  --chart benchmarks/results/grid_1500_gains.png > /dev/null
