#!/bin/bash
# A weaker perturbation on Conv4, which the full one over-regularizes (grid_1500): the best released φ with κ annealed
# to 0.5, then to 0.25, on the three targets, seeds 0-2; two resumable shards side by side, one thread each. The runs
# go into benchmarks/results/grid_1500.jsonl as columns "tin-full-conv4 κ=0.5" and "tin-full-conv4 κ=0.25", beside
# the full-strength ones, which they share seeds and protocol with.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
for strength in ${STRENGTHS:-0.5 0.25}; do
  for shard in 0 1; do
    OMP_NUM_THREADS=1 python benchmarks/transfer_grid.py --name grid_1500 \
      --targets "cub=$DATA/cub200_2011_first50_32,cifar10=$DATA/cifar10_32:50,omniglot=$DATA/omniglot_bg_small_32" \
      --archs conv4 --methods metaperturb --perturbations "tin-full-conv4=hub_cards/metaperturb-tin-full-conv4" \
      --noise-strengths "$strength" --seeds "${SEEDS:-0,1,2}" --steps 1500 --mc-samples 10 --threads 1 \
      --shard "$shard/2" >> "benchmarks/results/grid_1500.shard$shard-strength.log" 2>&1 &
  done
  wait
done
python benchmarks/transfer_grid.py --name grid_1500 --report
