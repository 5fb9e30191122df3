#!/bin/bash
# A ResNet-20 φ whose noise generator learns: meta-train the noise generator on top of a scale network that already
# learned (benchmarks/results/phi_escape/README.md, "Where meta-training starts"), then transfer it.
#   1. the start: tin-full-resnet20's scale network (750 steps, seed 0; its own noise generator is at the origin) with
#      the structured noise generator of benchmarks/structured_phi.py (γ₁ = λ₂ = γ₂ = GAIN, default 0.05, on every tap);
#   2. STAGE2_STEPS (default 250) meta-training steps from there and the transfer to TARGETS (default omniglot,cub),
#      3 seeds, into benchmarks/results/two_stage_1500.jsonl; the φ is copied to benchmarks/results/phi_two_stage/
#      (benchmarks/run_from_start.sh).
#   bash benchmarks/run_two_stage.sh   # the run lives in OUT (default runs/two-stage); SEEDS=0, TARGETS=omniglot narrow it
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-runs/two-stage}
if [[ ! -f "$OUT/start/model.safetensors" ]]; then
  python benchmarks/structured_phi.py --gain "${GAIN:-0.05}" --output "$OUT/structured-mu"
  python benchmarks/graft_phi.py --scale-from hub_cards/metaperturb-tin-full-resnet20 --noise-from "$OUT/structured-mu" \
    --output "$OUT/start"
fi
START="$OUT/start" STEPS=${STAGE2_STEPS:-250} PHI=benchmarks/results/phi_two_stage NAME=two_stage_1500 \
  LABEL=tin-full-resnet20-two-stage bash benchmarks/run_from_start.sh
