#!/bin/bash
# Where φ goes (the paper's location ablation) at 1500 steps: ResNet-20 with the authors' φ at all 9 sites (one per
# residual block) against the top stage only (top:3), the bottom stage only (bottom:3) and both (top_bottom:3), on
# CUB-50 and CIFAR-10 (50/class), 3 seeds; two resumable shards. Records join benchmarks/results/grid_1500.jsonl, whose
# all-sites runs are the same runs, so they are not repeated; the columns are named "SOURCE @top:3" and so on.
#   bash benchmarks/run_location_1500.sh     # SEEDS=0 narrows it
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
REFERENCE=${REFERENCE:-../shared/reference}
for shard in 0 1; do
  OMP_NUM_THREADS=1 python benchmarks/transfer_grid.py --name grid_1500 \
    --targets "cub=$DATA/cub200_2011_first50_32,cifar10=$DATA/cifar10_32:50" --archs resnet20 --methods metaperturb \
    --perturbations "authors-tin-resnet20=$REFERENCE/official_tin_resnet20_perturb_750.pth" \
    --placements all,top:3,bottom:3,top_bottom:3 --seeds "${SEEDS:-0,1,2}" --steps 1500 --mc-samples 10 --threads 1 \
    --shard "$shard/2" > "benchmarks/results/location_1500.shard$shard.log" 2>&1 &
done
wait
python benchmarks/transfer_grid.py --name grid_1500 --report
