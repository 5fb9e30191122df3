#!/bin/bash
# The transfer grid of the README (issue 4): source networks for `finetune`, then two resumable shards side by side.
#   bash benchmarks/run_transfer_grid.sh            # logs in benchmarks/source_networks/ and the shards' *.log
# Rerunning skips what is done: finished source networks and every run already in benchmarks/results/tin_transfer.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
STEPS=${STEPS:-100}
ARCHS=${ARCHS:-conv4,resnet20}
networks=$(ARCHS=$ARCHS bash benchmarks/train_source_networks.sh "$DATA/tiny_imagenet_32" 500 tin)
for shard in 0 1; do
  OMP_NUM_THREADS=1 python benchmarks/transfer_grid.py --name tin_transfer \
    --targets "cifar10=$DATA/cifar10_32:50,cub=$DATA/cub200_2011_first50_32,omniglot=$DATA/omniglot_bg_small_32" \
    --archs "$ARCHS" --methods none,metaperturb,dropout,dropblock,manifold_mixup,info_dropout,finetune \
    --perturbations tin-conv4=hub_cards/metaperturb-tin-conv4,tin-resnet20=hub_cards/metaperturb-tin-resnet20 \
    --source-networks "$networks" --seeds 0,1,2 --steps "$STEPS" --threads 1 --shard "$shard/2" \
    > "benchmarks/results/tin_transfer.shard$shard.log" 2>&1 &
done
wait
python benchmarks/transfer_grid.py --name tin_transfer --report
