#!/bin/bash
# The single pass against MC-10 with every candidate of today's code (the "fitted" statistics included), on the
# released gated φ's ResNet-20 runs (κ = 0.5, 1500 steps) of the three targets: each (target, seed) is trained once
# with its model saved as benchmarks/saved_runs/<target>_s<seed>.pt (git-ignored; a saved run is not trained again),
# then evaluated again by single_pass_saved.py into benchmarks/results/single_pass_saved.jsonl (once per run), and
# the table is remade (benchmarks/results/single_pass_saved.md). Two workers, one thread each.
# NAME=... PHI=... runs another φ at its own strength (saved runs <NAME>_<target>_s<seed>.pt, records
# single_pass_saved_<NAME>.{jsonl,md}).
#   bash benchmarks/run_single_pass_saved.sh
#   TARGETS=omniglot SEEDS=0 bash benchmarks/run_single_pass_saved.sh
#   NAME=authors PHI=../shared/reference/official_tin_resnet20_perturb_750.pth TARGETS=omniglot \
#     bash benchmarks/run_single_pass_saved.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/targets.sh
PHI=${PHI:-hub_cards/metaperturb-tin-full-resnet20-gated}
RUN_PREFIX=${NAME:+${NAME}_}
RECORDS=benchmarks/results/single_pass_saved${NAME:+_$NAME}.jsonl
mkdir -p benchmarks/saved_runs
CLAIMS=$(mktemp -d)
trap 'rm -rf "$CLAIMS"' EXIT
target_seed() {  # train (unless saved) and evaluate one run
  local target=$1 seed=$2 spec=${TARGET_PATHS[$1]} per_class=() saved=benchmarks/saved_runs/$RUN_PREFIX$1_s$2.pt
  [[ "$spec" == *:* ]] && per_class=(--train-per-class "${spec##*:}")
  local dataset=${spec%%:*}
  if [[ ! -f "$saved" ]]; then
    python examples/transfer.py --dataset "$dataset" "${per_class[@]}" --arch resnet20 --method metaperturb \
      --perturbation "$PHI" --steps 1500 --seeds "$seed" --save-model "$saved"
  fi
  if ! grep -q "\"run\": \"$RUN_PREFIX$1_s$2\"" "$RECORDS" 2>/dev/null; then
    python benchmarks/single_pass_saved.py --model "$saved" --dataset "$dataset" "${per_class[@]}" --seed "$seed" \
      --perturbation "$PHI" --label "$RUN_PREFIX$1_s$2" --output "$RECORDS"
  fi
}
targets=${TARGETS:-omniglot,cifar10,cub}
seeds=${SEEDS:-0,1,2}
target_specs "$targets" > /dev/null  # exits with a clear error on an unknown target
worker() {
  local target seed
  for target in ${targets//,/ }; do
    for seed in ${seeds//,/ }; do
      mkdir "$CLAIMS/${target}_$seed" 2>/dev/null || continue
      target_seed "$target" "$seed"
    done
  done
}
export OMP_NUM_THREADS=1
worker > "${RECORDS%.jsonl}.shard0.log" 2>&1 &
worker > "${RECORDS%.jsonl}.shard1.log" 2>&1 &
wait
python benchmarks/single_pass_saved.py --report "$RECORDS" > "${RECORDS%.jsonl}.md"
