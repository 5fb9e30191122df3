#!/bin/bash
# Which half of φ carries the authors' result on Omniglot? ResNet-20 at 1500 steps with two grafts
# (benchmarks/graft_phi.py, written to benchmarks/results/phi_graft/): the authors' scale network with μ = 0
# (authors-s_mu0: noise that ignores the input) and tin-full-resnet20-seed1's scale network with the authors' noise
# generator (seed1-s_authors-mu); 3 seeds, seed by seed, into benchmarks/results/phi_graft_1500.jsonl (a rerun skips
# what is there). Compare with the none, authors-tin-resnet20 and tin-full-resnet20-seed1 columns of grid_1500.
#   bash benchmarks/run_graft_1500.sh     # SEEDS=0 narrows it; WORKERS=2 runs on both cores
set -euo pipefail
cd "$(dirname "$0")/.."
AUTHORS=${REFERENCE:-../shared/reference}/official_tin_resnet20_perturb_750.pth
SEED1=hub_cards/metaperturb-tin-full-resnet20-seed1
GRAFTS=benchmarks/results/phi_graft
python benchmarks/graft_phi.py --scale-from "$AUTHORS" --noise-from zero --output "$GRAFTS/authors-s_mu0"
python benchmarks/graft_phi.py --scale-from "$SEED1" --noise-from "$AUTHORS" --output "$GRAFTS/seed1-s_authors-mu"
SEEDS=${SEEDS:-0,1,2}
CLAIMS=$(mktemp -d)
trap 'rm -rf "$CLAIMS"' EXIT
for worker in $(seq 0 $((${WORKERS:-1} - 1))); do
  for seed in ${SEEDS//,/ }; do
    OMP_NUM_THREADS=1 python benchmarks/transfer_grid.py --name phi_graft_1500 \
      --targets "omniglot=${DATA:-../shared/data}/omniglot_bg_small_32" --archs resnet20 --methods metaperturb \
      --perturbations "authors-s_mu0=$GRAFTS/authors-s_mu0,seed1-s_authors-mu=$GRAFTS/seed1-s_authors-mu" \
      --seeds "$seed" --steps 1500 --mc-samples 10 --threads 1 --claims "$CLAIMS" --no-report
  done > "benchmarks/results/phi_graft_1500.shard$worker.log" 2>&1 &
done
wait
python benchmarks/transfer_grid.py --name phi_graft_1500 --report
