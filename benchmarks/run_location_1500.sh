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
DATA=${DATA:-../shared/data}
REFERENCE=${REFERENCE:-../shared/reference}
declare -A TARGET_PATHS=([cub]="$DATA/cub200_2011_first50_32" [cifar10]="$DATA/cifar10_32:50"
                         [omniglot]="$DATA/omniglot_bg_small_32")
targets=""
TARGETS=${TARGETS:-}
for name in ${TARGETS//,/ }; do
  [[ -n "${TARGET_PATHS[$name]:-}" ]] || { echo "TARGETS names cub, cifar10 or omniglot, got '$name'" >&2; exit 2; }
  targets+="${targets:+,}$name=${TARGET_PATHS[$name]}"
done
CLAIMS=$(mktemp -d)
trap 'rm -rf "$CLAIMS"' EXIT
for worker in 0 1; do
  OMP_NUM_THREADS=1 python benchmarks/transfer_grid.py --name grid_1500 \
    --targets "${targets:-cub=${TARGET_PATHS[cub]},cifar10=${TARGET_PATHS[cifar10]},omniglot=${TARGET_PATHS[omniglot]}}" \
    --archs resnet20 --methods metaperturb \
    --perturbations "${PHI:-authors-tin-resnet20=$REFERENCE/official_tin_resnet20_perturb_750.pth}" \
    --placements all,top:3,bottom:3,top_bottom:3 --seeds "${SEEDS:-0,1,2}" --steps 1500 --mc-samples 10 --threads 1 \
    --claims "$CLAIMS" ${BUDGET_S:+--time-budget-s "$BUDGET_S"} --no-report \
    > "benchmarks/results/location_1500.shard$worker.log" 2>&1 &
done
wait
python benchmarks/transfer_grid.py --name grid_1500 --report
