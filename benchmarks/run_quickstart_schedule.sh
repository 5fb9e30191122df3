#!/bin/bash
# The quick start at its default (1000 steps, the records the README and the model cards quote) and at shorter and
# longer schedules with everything else fixed, to show how MetaPerturb's cost on digits changes with the epochs:
# records and charts in benchmarks/results/quickstart/ and benchmarks/results/quickstart_schedule/steps_<N>/
# (about 13 minutes on 2 cores, the runs one after another).
set -euo pipefail
cd "$(dirname "$0")/.."
python examples/quickstart.py --output-dir benchmarks/results/quickstart
for steps in ${STEPS:-200 600 1500}; do
  python examples/quickstart.py --steps "$steps" --output-dir "benchmarks/results/quickstart_schedule/steps_$steps"
done
