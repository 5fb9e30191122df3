#!/usr/bin/env bash
# The 1500-step transfer grid on one GPU: WORKERS processes share it, each taking the next unclaimed run of the
# queue below (most wanted first), none starting a run it would not finish within BUDGET_S.
#   bash benchmarks/gpu_grid.sh --stage   # here: the three targets into .gpu/grid
#   bash benchmarks/gpu_grid.sh           # on the GPU machine, with .gpu carried along (device tool)
#   python benchmarks/transfer_grid.py --name grid_1500 --merge FILES_AT/grid_1500.jsonl   # back here
#   DEVICE=cpu STEPS=2 WORKERS=2 BUDGET_S=60 bash benchmarks/gpu_grid.sh   # a dry run of the machinery on a CPU
# The records already in benchmarks/results/grid_1500.jsonl travel with the working tree, so finished runs are
# skipped; the merge adds only new runs, which name the device they ran on.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=.gpu/grid
if [ "${1:-}" = --stage ]; then
  DATA=${DATA:-../shared/data}
  for target in cub200_2011_first50_32 cifar10_32 omniglot_bg_small_32; do
    mkdir -p "$STAGE/$target" && cp "$DATA/$target"/*.parquet "$DATA/$target"/*.json "$STAGE/$target/" || exit 1
  done
  du -sh "$STAGE"
  exit 0
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT="${OUT:-/tmp/gpu-grid}"; mkdir -p "$OUT"
WORK=$(mktemp -d); cp benchmarks/results/grid_1500.jsonl "$WORK/"
[ -d "$STAGE/cub200_2011_first50_32" ] || { echo "no $STAGE: run bash benchmarks/gpu_grid.sh --stage first" >&2; exit 2; }
DEVICE=${DEVICE:-cuda}
[ "$DEVICE" = cpu ] || nvidia-smi -L || exit 1
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-480} ))
TARGETS="cub=$STAGE/cub200_2011_first50_32,cifar10=$STAGE/cifar10_32:50,omniglot=$STAGE/omniglot_bg_small_32"
RESNET20_PHI="tin-full-resnet20=hub_cards/metaperturb-tin-full-resnet20,tin-full-resnet20-seed1=hub_cards/metaperturb-tin-full-resnet20-seed1"
# One grid per line, in the order they are wanted; finished runs are skipped. Tiers a, b and c are complete for the
# authors' φ and tin-full-conv4; the ResNet-20 φ (released after them) first on their own network, then the others.
QUEUE=(
  "grid_1500|$TARGETS|resnet20|metaperturb|$RESNET20_PHI|all|1"
  "grid_1500|$TARGETS|conv4,vgg9|metaperturb|$RESNET20_PHI|all|1"
)
worker() {
  for entry in "${QUEUE[@]}"; do
    IFS='|' read -r name targets archs methods perturbations placements strengths <<< "$entry"
    left=$(( DEADLINE - $(date +%s) ))
    [ "$left" -gt 0 ] || break
    python benchmarks/transfer_grid.py --name "$name" --results-dir "$WORK" --targets "$targets" --archs "$archs" \
      --methods "$methods" --perturbations "$perturbations" --placements "$placements" --noise-strengths "$strengths" \
      --seeds 0,1,2 --steps "${STEPS:-1500}" --mc-samples 10 --threads 1 --device "$DEVICE" --claims "$WORK/claims-$name" \
      --time-budget-s "$left" --no-report 2>&1 | grep -v -E "^Generating|it/s\]$" | sed "s/^/[worker $1] /"
  done
}
workers=()
for i in $(seq 1 "${WORKERS:-12}"); do worker "$i" & workers+=($!); done
# A run still going at the deadline (its first, or one longer than the worker's longest) is stopped: it leaves no
# record and runs again next session.
( sleep $(( DEADLINE - $(date +%s) + ${GRACE_S:-60} )); pkill -f "transfer_grid.py --name" ) & killer=$!
wait "${workers[@]}"
kill "$killer" 2>/dev/null
cp "$WORK"/grid_1500.jsonl "$OUT/"; rm -rf "$WORK"
echo "grid_1500: $(( $(wc -l < "$OUT/grid_1500.jsonl") - $(wc -l < benchmarks/results/grid_1500.jsonl) )) new records"
