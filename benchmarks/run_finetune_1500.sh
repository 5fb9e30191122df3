#!/bin/bash
# The fine-tuning baseline of the 1500-step grid: each network is first trained on the source (all of Tiny ImageNet,
# the data φ was meta-trained on) for the same 1500 steps, then fine-tuned from it on every target, 3 seeds; two
# resumable shards. Records join benchmarks/results/grid_1500.jsonl (method finetune); the source networks' own
# test accuracy on Tiny ImageNet is in benchmarks/results/source_tin_full_1500_ARCH.json (the networks themselves
# stay in benchmarks/source_networks/, not committed).
#   bash benchmarks/run_finetune_1500.sh     # ARCHS=conv4 or SEEDS=0 narrow it
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
ARCHS=${ARCHS:-conv4,resnet20}
networks=$(ARCHS=$ARCHS bash benchmarks/train_source_networks.sh "$DATA/tiny_imagenet_32_full" 1500 tin_full_1500 \
  benchmarks/results/source_tin_full_1500)
for shard in 0 1; do
  OMP_NUM_THREADS=1 python benchmarks/transfer_grid.py --name grid_1500 \
    --targets "cub=$DATA/cub200_2011_first50_32,cifar10=$DATA/cifar10_32:50,omniglot=$DATA/omniglot_bg_small_32" \
    --archs "$ARCHS" --methods finetune --source-networks "$networks" --seeds "${SEEDS:-0,1,2}" --steps 1500 \
    --mc-samples 10 --threads 1 --shard "$shard/2" > "benchmarks/results/finetune_1500.shard$shard.log" 2>&1 &
done
wait
python benchmarks/transfer_grid.py --name grid_1500 --report
