#!/bin/bash
# The quick start's network and data with this project's Conv4 φ (hub_cards/metaperturb-tin-full-conv4, at full
# strength) at shorter and longer schedules with everything else fixed, to show how MetaPerturb's cost on digits
# changes with the epochs: records and charts in benchmarks/results/quickstart_schedule/steps_<N>/ (about 17 minutes
# on 2 cores, the runs one after another). The quick start's own records (benchmarks/results/quickstart/, its
# default φ) come from `python examples/quickstart.py --output-dir benchmarks/results/quickstart`.
set -euo pipefail
cd "$(dirname "$0")/.."
for steps in ${STEPS:-200 600 1000 1500}; do
  python examples/quickstart.py --perturbation hub_cards/metaperturb-tin-full-conv4 --steps "$steps" \
    --output-dir "benchmarks/results/quickstart_schedule/steps_$steps"
done
