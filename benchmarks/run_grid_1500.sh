#!/bin/bash
# The transfer grid at 1500 steps (the regime the method is for), tier by tier; two resumable workers side by side,
# one thread each, taking the next unclaimed run of the tier; every finished run is appended to
# benchmarks/results/grid_1500.jsonl and a rerun skips it.
#   TIER=a bash benchmarks/run_grid_1500.sh   # conv4, resnet20 × none, metaperturb (tin-full-conv4,
#                                             # tin-full-resnet20, tin-full-resnet20-seed1, the authors' φ)
#   TIER=b bash benchmarks/run_grid_1500.sh   # vgg9, which no φ saw in meta-training, × the same
#   TIER=c bash benchmarks/run_grid_1500.sh   # conv4, resnet20 × dropout, dropblock, manifold_mixup, info_dropout
# ARCHS=conv4 or SEEDS=0 narrow a tier (the committed records were run so, a part at a time). BUDGET_S=8000 starts
# no run that would end later than that, judged by the worker's longest run so far (its first always starts), so a
# session that must stop loses no run half done. WORKERS=1 leaves the other core free for other work.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
REFERENCE=${REFERENCE:-../shared/reference}
case "${TIER:-a}" in
  a) archs=conv4,resnet20; methods=none,metaperturb ;;
  b) archs=vgg9; methods=none,metaperturb ;;
  c) archs=conv4,resnet20; methods=dropout,dropblock,manifold_mixup,info_dropout ;;
  *) echo "TIER must be a, b or c, got '$TIER'" >&2; exit 2 ;;
esac
CLAIMS=$(mktemp -d)  # fresh each time: a claim left by a killed worker must not hold its run back next time
trap 'rm -rf "$CLAIMS"' EXIT
for worker in $(seq 0 $((${WORKERS:-2} - 1))); do
  OMP_NUM_THREADS=1 python benchmarks/transfer_grid.py --name grid_1500 \
    --targets "cub=$DATA/cub200_2011_first50_32,cifar10=$DATA/cifar10_32:50,omniglot=$DATA/omniglot_bg_small_32" \
    --archs "${ARCHS:-$archs}" --methods "$methods" \
    --perturbations "tin-full-conv4=hub_cards/metaperturb-tin-full-conv4,tin-full-resnet20=hub_cards/metaperturb-tin-full-resnet20,tin-full-resnet20-seed1=hub_cards/metaperturb-tin-full-resnet20-seed1,authors-tin-resnet20=$REFERENCE/official_tin_resnet20_perturb_750.pth" \
    --seeds "${SEEDS:-0,1,2}" --steps 1500 --mc-samples 10 --threads 1 --claims "$CLAIMS" \
    ${BUDGET_S:+--time-budget-s "$BUDGET_S"} --no-report > "benchmarks/results/grid_1500.shard$worker.log" 2>&1 &
done
wait
python benchmarks/transfer_grid.py --name grid_1500 --report
