"""Where one meta-training step spends its time: data, φ forward/backward, the rest of the networks, optimizers.

Builds the meta-training tasks from the source data (the train split of Tiny ImageNet by default), runs `--warmup`
steps of `MetaTrainer`, then profiles `--steps` more and prints one JSON line: wall seconds per step, the share of
each part (from torch.profiler's inclusive CPU time of its region). The step against two plain training steps is
the `meta_train_step_vs_two_plain` ratio of benchmarks/overhead.py. With one process there is no all-reduce; its cost
on two gloo processes is in benchmarks/results/meta_training_throughput.jsonl.

    python benchmarks/profile_meta_step.py [--arch conv4] [--num-groups 2] [--steps 3]
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from metaperturb_hf.data import BatchSampler
from metaperturb_hf.meta_training import MetaTrainer, MetaTrainingConfig
from metaperturb_hf.tasks import load_tasks

ROOT = Path(__file__).resolve().parents[1]


def labelled(function, name: str):
    """`function` inside a profiler region called `name`."""
    def wrapper(*args, **kwargs):
        with record_function(name):
            return function(*args, **kwargs)
    return wrapper


def region_seconds(prof, steps: int) -> dict:
    """Inclusive CPU seconds per step of the regions we label and of the ones autograd and the optimizer name."""
    totals = {"data": 0.0, "phi_forward": 0.0, "phi_backward": 0.0, "optimizers": 0.0}
    for event in prof.key_averages():
        if event.key == "data":
            totals["data"] += event.cpu_time_total
        elif event.key == "_PerturbFunction":
            totals["phi_forward"] += event.cpu_time_total
        elif event.key == "_PerturbFunctionBackward":
            totals["phi_backward"] += event.cpu_time_total
        elif event.key.startswith("Optimizer.step#"):
            totals["optimizers"] += event.cpu_time_total
    return {name: value / 1e6 / steps for name, value in totals.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "tiny_imagenet_32"))
    parser.add_argument("--arch", default="conv4")
    parser.add_argument("--num-groups", type=int, default=2, help="2 tasks per group")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output", help="append the JSON line to this file too")
    args = parser.parse_args()
    tasks = load_tasks(args.dataset, num_groups=args.num_groups)
    BatchSampler.next_batch = labelled(BatchSampler.next_batch, "data")
    with tempfile.TemporaryDirectory() as scratch:
        config = MetaTrainingConfig(architectures=[args.arch], steps=args.warmup + args.steps, checkpoint_every=0,
                                    log_every=10**6, output_dir=scratch)
        trainer = MetaTrainer(config, tasks)
        for _ in range(args.warmup):
            trainer._meta_step(record=False)
        started = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                trainer._meta_step(record=False)
        wall = (time.perf_counter() - started) / args.steps
    parts = region_seconds(prof, args.steps)
    parts["networks_and_rest"] = wall - sum(parts.values())
    record = {"benchmark": "profile_meta_step", "arch": args.arch, "tasks": len(tasks), "seconds_per_step": wall,
              "share": {name: round(seconds / wall, 3) for name, seconds in parts.items()},
              "seconds": {name: round(seconds, 4) for name, seconds in parts.items()},
              "device": f"{platform.machine()} CPU, {torch.get_num_threads()} threads", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d")}
    line = json.dumps(record)
    print(line)
    if args.output:
        with open(args.output, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
