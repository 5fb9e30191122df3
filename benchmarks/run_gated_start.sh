#!/bin/bash
# A ResNet-20 φ of this project's own whose noise generator grows as the authors' did: meta-training's own initial φ
# (of seed SEED, default 0) with the authors' positive-activity gate set in its scale network
# (benchmarks/results/phi_escape/README.md, "What the noise generator needs beside it"): the fourth statistics filter
# K₄ = +0.245 on every tap, weights −0.075 on that filter's batch mean and −0.30 on its batch variance in w.
# GAIN=0.03 starts the noise generator structured instead (benchmarks/structured_phi.py: γ₁ = λ₂ = γ₂ = GAIN on every
# tap), which grows faster and overshoots.
#   Then STEPS (default 750, the authors' protocol) meta-training steps with seed SEED and the transfer to TARGETS
#   (default omniglot,cub), 3 seeds, into benchmarks/results/gated_1500.jsonl; the φ is copied to
#   benchmarks/results/phi_gated/ (benchmarks/run_from_start.sh). Seed 0's φ is released as
#   hub_cards/metaperturb-tin-full-resnet20-gated and its runs merged into grid_1500.jsonl (run_gated_grid.sh).
#   bash benchmarks/run_gated_start.sh         # the run lives in OUT (default runs/gated); SEEDS=0, TARGETS=omniglot
#                                              # narrow the transfer
#   SEED=1 bash benchmarks/run_gated_start.sh  # a second meta-training seed (initial φ, tasks, batches, noise):
#                                              # runs/gated-seed1, phi_gated_seed1, tin-full-resnet20-gated-seed1
#   SEED=1 STRENGTH=0.5 TARGETS=cub,cifar10,omniglot bash benchmarks/run_gated_start.sh  # ... transferred as released
set -euo pipefail
cd "$(dirname "$0")/.."
export SEED=${SEED:-0}
suffix=$([[ "$SEED" == 0 ]] || echo "-seed$SEED")
export OUT=${OUT:-runs/gated$suffix}
if [[ ! -f "$OUT/start/model.safetensors" ]]; then
  if [[ -n "${GAIN:-}" ]]; then
    python benchmarks/structured_phi.py --gain "$GAIN" --output "$OUT/initial"
  else
    python -c "import sys; from metaperturb_hf.meta_training import MetaTrainingConfig, initial_phi
initial_phi(MetaTrainingConfig(seed=int(sys.argv[2]))).save_pretrained(sys.argv[1])" "$OUT/initial" "$SEED"
  fi
  python benchmarks/graft_phi.py --scale-from "$OUT/initial" --noise-from "$OUT/initial" \
    --set "stat_kernels[3]=0.245" --set "scale_weight[3]=-0.075" --set "scale_weight[7]=-0.30" --output "$OUT/start"
fi
START="$OUT/start" STEPS=${STEPS:-750} PHI=benchmarks/results/phi_gated${suffix//-/_} NAME=gated_1500 \
  LABEL=tin-full-resnet20-gated$suffix \
  bash benchmarks/run_from_start.sh
