"""What the one-step lookahead costs against the first-order meta-gradient (the rebuttal's "6× the time").

Two `MetaTrainer`s over the same tasks, one first order (the authors' step, the default) and one with
`lookahead=True` (φ's gradient through θ' = θ − α∇θ), take their meta-steps in turn (interleaved A/B, so
machine load hits both alike) after `--warmup` steps each. Prints and appends one JSON line per network to
benchmarks/results/lookahead_cost.jsonl: the median seconds per step of each and their ratio.

    python benchmarks/lookahead_cost.py [--archs conv4,resnet20] [--num-groups 1] [--rounds 3]
"""

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from metaperturb_hf.meta_training import MetaTrainer, MetaTrainingConfig
from metaperturb_hf.tasks import load_tasks

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "lookahead_cost.jsonl"


def timed_step(trainer: MetaTrainer) -> float:
    started = time.perf_counter()
    trainer._meta_step(record=False)
    return time.perf_counter() - started


def measure(arch: str, tasks, rounds: int, warmup: int) -> dict:
    seconds = {"first_order": [], "lookahead": []}
    with tempfile.TemporaryDirectory() as scratch:
        trainers = {
            name: MetaTrainer(MetaTrainingConfig(architectures=[arch], steps=warmup + rounds, lookahead=lookahead,
                                                 checkpoint_every=0, log_every=10**6, output_dir=f"{scratch}/{name}"),
                              tasks)
            for name, lookahead in (("first_order", False), ("lookahead", True))
        }
        for trainer in trainers.values():
            for _ in range(warmup):
                trainer._meta_step(record=False)
        for _ in range(rounds):
            for name, trainer in trainers.items():
                seconds[name].append(timed_step(trainer))
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return {"benchmark": "lookahead_cost", "arch": arch, "tasks": len(tasks), "rounds": rounds,
            "seconds_per_step": {name: round(value, 3) for name, value in medians.items()},
            "lookahead_over_first_order": round(medians["lookahead"] / medians["first_order"], 2),
            "device": f"{platform.machine()} CPU, {torch.get_num_threads()} threads", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "tiny_imagenet_32"))
    parser.add_argument("--archs", default="conv4,resnet20")
    parser.add_argument("--num-groups", type=int, default=1, help="2 tasks per group")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = load_tasks(args.dataset, num_groups=args.num_groups)
    for arch in args.archs.split(","):
        record = measure(arch, tasks, args.rounds, args.warmup)
        print(json.dumps(record), flush=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
