#!/bin/bash
# First-order meta-training (the authors' step) against the one-step lookahead, at a scale this CPU affords: two φ
# meta-trained from the same seed on the same two tasks of the full Tiny ImageNet source (one class-disjoint group,
# 200 classes a task) with Conv4 for 150 steps (a lookahead step costs about 9× a first-order one:
# benchmarks/lookahead_cost.py), then each transferred with Conv4 for 1500 steps to CUB-50 and to Omniglot, 3 seeds,
# MC-10 and the single pass, beside no φ. φ folders go to benchmarks/results/lookahead_phi/, records to
# benchmarks/results/lookahead_1500.jsonl; every stage resumes.
#   bash benchmarks/run_lookahead_1500.sh     # STEPS=150 SEEDS=0,1,2 by default
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
PHI=benchmarks/results/lookahead_phi
mkdir -p "$PHI"
for lookahead in false true; do
  mode=$([ "$lookahead" = true ] && echo lookahead || echo first_order)
  OMP_NUM_THREADS=1 python examples/meta_train.py --dataset "$DATA/tiny_imagenet_32_full" --arch conv4 --num_groups 1 \
    --steps "${STEPS:-150}" --checkpoint_every 25 --log_every 5 --seed 0 --lookahead "$lookahead" \
    --output_dir "$PHI/$mode" --resume > "$PHI/$mode.log" 2>&1 &
done
wait
for shard in 0 1; do
  OMP_NUM_THREADS=1 python benchmarks/transfer_grid.py --name lookahead_1500 \
    --targets "cub=$DATA/cub200_2011_first50_32,omniglot=$DATA/omniglot_bg_small_32" --archs conv4 \
    --methods none,metaperturb \
    --perturbations "first-order=$PHI/first_order,lookahead=$PHI/lookahead" \
    --seeds "${SEEDS:-0,1,2}" --steps 1500 --mc-samples 10 --threads 1 --shard "$shard/2" \
    > "benchmarks/results/lookahead_1500.shard$shard.log" 2>&1 &
done
wait
python benchmarks/transfer_grid.py --name lookahead_1500 --report
