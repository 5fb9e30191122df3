#!/bin/bash
# single_pass_choice.py on every saved run of run_single_pass_saved.sh (the released gated φ's, and with NAME=authors
# the authors' φ's on Omniglot), two workers, one thread each, into benchmarks/results/single_pass_choice.jsonl (once
# per run); then the table (benchmarks/results/single_pass_choice.md). A run not saved is skipped with a note.
#   bash benchmarks/run_single_pass_choice.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/targets.sh
RECORDS=benchmarks/results/single_pass_choice.jsonl
GATED=hub_cards/metaperturb-tin-full-resnet20-gated
AUTHORS=../shared/reference/official_tin_resnet20_perturb_750.pth
runs=()  # "label target seed φ"
for target in cifar10 cub omniglot; do
  for seed in 0 1 2; do runs+=("${target}_s$seed $target $seed $GATED"); done
done
for seed in 0 1 2; do runs+=("authors_omniglot_s$seed omniglot $seed $AUTHORS"); done
one_run() {
  local label=$1 target=$2 seed=$3 phi=$4 spec=${TARGET_PATHS[$2]} per_class=()
  [[ "$spec" == *:* ]] && per_class=(--train-per-class "${spec##*:}")
  if [[ ! -f benchmarks/saved_runs/$label.pt ]]; then
    echo "benchmarks/saved_runs/$label.pt is missing (run_single_pass_saved.sh saves it): skipped"; return
  fi
  grep -q "\"run\": \"$label\"" "$RECORDS" 2>/dev/null && return
  python benchmarks/single_pass_choice.py --model "benchmarks/saved_runs/$label.pt" --dataset "${spec%%:*}" \
    "${per_class[@]}" --seed "$seed" --perturbation "$phi" --label "$label" --output "$RECORDS"
}
worker() {  # runs first, first + 2, ...
  for ((i = $1; i < ${#runs[@]}; i += 2)); do one_run ${runs[$i]}; done
}
export OMP_NUM_THREADS=1
worker 0 > "${RECORDS%.jsonl}.shard0.log" 2>&1 &
worker 1 > "${RECORDS%.jsonl}.shard1.log" 2>&1 &
wait
python benchmarks/single_pass_choice.py --report "$RECORDS" > "${RECORDS%.jsonl}.md"
