"""Which of φ's groups does Adam still move? Per meta-training checkpoint, the step of each group (λ, γ per layer,
K, w) as a fraction of the learning rate, beside the group's mean |value|.

A group whose gradient keeps its sign moves at about the learning rate (≈ 1); one whose gradient flips sign, with
spikes that Adam's second moment remembers for about a thousand steps, stands still (≈ 0) however large the gradient.
Meta-training logs the same numbers as `phi/adam_step_*` since this script exists; it reads them back from the
checkpoints (`trainer_state.pt` and `perturbation/`) of runs logged before that.

    python benchmarks/phi_adam_steps.py OUTPUT_DIR/checkpoints/checkpoint-* [--output FILE.jsonl]
"""

import argparse
import json
from pathlib import Path

from metaperturb_hf import checkpointing, load_perturbation
from metaperturb_hf.meta_checkpoint import PERTURBATION, TRAINER_STATE
from metaperturb_hf.meta_training import phi_adam_steps, phi_statistics


def checkpoint_line(checkpoint: Path) -> dict:
    if not (checkpoint / TRAINER_STATE).is_file():
        raise SystemExit(f"{checkpoint} has no {TRAINER_STATE}: pass checkpoint-<step> folders of a meta-training run")
    state = checkpointing.load_trusted(checkpoint / TRAINER_STATE)
    phi = load_perturbation(checkpoint / PERTURBATION)
    return {"step": int(state["step"]), **phi_adam_steps(state["phi_optimizer"], phi), **phi_statistics(phi)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint-<step> folders of one run")
    parser.add_argument("--output", type=Path, help="write the lines here too (JSONL)")
    args = parser.parse_args(argv)
    lines = sorted((checkpoint_line(path) for path in args.checkpoints), key=lambda line: line["step"])
    text = "".join(json.dumps(line) + "\n" for line in lines)
    print(text, end="")
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
