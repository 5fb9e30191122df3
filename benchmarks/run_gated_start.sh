#!/bin/bash
# A ResNet-20 φ of this project's own whose noise generator grows as the authors' did: the structured noise generator
# of benchmarks/structured_phi.py (γ₁ = λ₂ = γ₂ = GAIN, default 0.03, on every tap) beside a scale network that
# starts with the authors' positive-activity gate (benchmarks/results/phi_escape/README.md, "What the noise generator
# needs beside it"): its fourth statistics filter K₄ = +0.245 on every tap, with weights −0.075 on that filter's batch
# mean and −0.30 on its batch variance in w; everything else drawn as meta-training draws it (seed 0).
#   Then STEPS (default 750, the authors' protocol) meta-training steps and the transfer to TARGETS (default
#   omniglot,cub), 3 seeds, into benchmarks/results/gated_1500.jsonl; the φ is copied to benchmarks/results/phi_gated/
#   (benchmarks/run_from_start.sh).
#   bash benchmarks/run_gated_start.sh   # the run lives in OUT (default runs/gated); SEEDS=0, TARGETS=omniglot narrow it
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-runs/gated}
if [[ ! -f "$OUT/start/model.safetensors" ]]; then
  python benchmarks/structured_phi.py --gain "${GAIN:-0.03}" --output "$OUT/structured-mu"
  python benchmarks/graft_phi.py --scale-from "$OUT/structured-mu" --noise-from "$OUT/structured-mu" \
    --set "stat_kernels[3]=0.245" --set "scale_weight[3]=-0.075" --set "scale_weight[7]=-0.30" --output "$OUT/start"
fi
START="$OUT/start" STEPS=${STEPS:-750} PHI=benchmarks/results/phi_gated NAME=gated_1500 LABEL=tin-full-resnet20-gated \
  bash benchmarks/run_from_start.sh
