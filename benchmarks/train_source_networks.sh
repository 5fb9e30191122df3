#!/bin/bash
# The source networks of the fine-tuning baseline: each of ARCHS trained on a source dataset without a regularizer,
# side by side, one thread each; a finished one is kept. Prints the `--source-networks` value for transfer_grid.py.
#   bash benchmarks/train_source_networks.sh DATASET STEPS NAME [RECORD_PREFIX]
# writes benchmarks/source_networks/NAME_ARCH.{pt,log} (not committed) and RECORD_PREFIX_ARCH.json, the network's
# test accuracy on the source (RECORD_PREFIX defaults to benchmarks/source_networks/NAME).
set -euo pipefail
cd "$(dirname "$0")/.."
DATASET=$1 STEPS=$2 NAME=$3
SOURCES=benchmarks/source_networks
RECORDS=${4:-$SOURCES/$NAME}
mkdir -p "$SOURCES"
pids=()
for arch in ${ARCHS//,/ }; do
  [ -f "$SOURCES/${NAME}_$arch.pt" ] && continue
  OMP_NUM_THREADS=1 python examples/transfer.py --dataset "$DATASET" --arch "$arch" --method none --steps "$STEPS" \
    --seeds 0 --mc-samples 1 --save-model "$SOURCES/${NAME}_$arch.pt" --output "${RECORDS}_$arch.json" \
    > "$SOURCES/${NAME}_$arch.log" 2>&1 &
  pids+=($!)
done
for pid in ${pids[@]+"${pids[@]}"}; do   # a failed one stops here, not later in the grid
  wait "$pid" || { echo "training a source network failed: see $SOURCES/${NAME}_*.log" >&2; exit 1; }
done
networks=$(for arch in ${ARCHS//,/ }; do printf '%s=%s/%s_%s.pt,' "$arch" "$SOURCES" "$NAME" "$arch"; done)
echo "${networks%,}"
