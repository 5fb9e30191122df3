#!/bin/bash
# Where φ goes (the paper's location ablation) at 1500 steps: ResNet-20 with φ at all 9 sites (one per residual block)
# against the top stage only (top:3), the bottom stage only (bottom:3) and both (top_bottom:3), on CUB-50, CIFAR-10
# (50/class) and Omniglot, 3 seeds; two resumable workers taking the next unclaimed run. Records join
# benchmarks/results/grid_1500.jsonl, whose all-sites runs are the same runs, so they are not repeated; the columns
# are named "SOURCE @top:3" and so on.
#   bash benchmarks/run_location_1500.sh                       # the authors' φ
#   PHI=tin-full-resnet20-seed1=hub_cards/metaperturb-tin-full-resnet20-seed1 bash benchmarks/run_location_1500.sh
# SEEDS=0 or TARGETS=omniglot narrow it (the targets run in the order given); BUDGET_S=5000 starts no run that would
# end later than that (benchmarks/run_grid_1500.sh explains how).
set -euo pipefail
cd "$(dirname "$0")/.."
REFERENCE=${REFERENCE:-../shared/reference}
source benchmarks/targets.sh
targets=$(target_specs "${TARGETS:-cub,cifar10,omniglot}")
CLAIMS=$(mktemp -d)
trap 'rm -rf "$CLAIMS"' EXIT
for worker in 0 1; do
  OMP_NUM_THREADS=1 python benchmarks/transfer_grid.py --name grid_1500 \
    --targets "$targets" \
    --archs resnet20 --methods metaperturb \
    --perturbations "${PHI:-authors-tin-resnet20=$REFERENCE/official_tin_resnet20_perturb_750.pth}" \
    --placements all,top:3,bottom:3,top_bottom:3 --seeds "${SEEDS:-0,1,2}" --steps 1500 --mc-samples 10 --threads 1 \
    --claims "$CLAIMS" ${BUDGET_S:+--time-budget-s "$BUDGET_S"} --no-report \
    > "benchmarks/results/location_1500.shard$worker.log" 2>&1 &
done
wait
python benchmarks/transfer_grid.py --name grid_1500 --report
