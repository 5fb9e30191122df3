"""Meta-training throughput on 1 and on 2 processes (gloo on CPU), same tasks, same steps.

Runs examples/meta_train.py on the source dataset, alternating 1 and 2 processes `--repeats` times, and appends one
JSON line per run to benchmarks/results/meta_training_throughput.jsonl: wall time of the training loop (data loading
excluded), steps, tasks and task-steps per second. Then it prints the 2-vs-1 ratio of medians.

    python benchmarks/meta_training_throughput.py --dataset ../shared/data/tiny_imagenet_32 --arch conv4 --steps 5
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "meta_training_throughput.jsonl"


def run(processes: int, args, output_dir: Path) -> dict:
    script = [str(ROOT / "examples" / "meta_train.py"), "--dataset", args.dataset, "--arch", args.arch,
              "--steps", str(args.steps), "--checkpoint-every", "0", "--log-every", str(args.steps),
              "--output-dir", str(output_dir)]
    if processes == 1:
        command, env = [sys.executable, *script], dict(os.environ)
    else:
        command = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(processes),
                   "--main_process_port", "29677", *script]
        env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    subprocess.run(command, env=env, check=True, capture_output=True)
    record = json.loads((output_dir / "meta_training.json").read_text())
    wall = record["wall_seconds_this_run"]
    return {
        "benchmark": "meta_training_throughput",
        "source": args.dataset,
        "arch": args.arch,
        "processes": processes,
        "tasks": record["num_tasks"],
        "steps": record["steps"],
        "batch_size": record["batch_size"],
        "wall_seconds": wall,
        "seconds_per_step": round(wall / record["steps"], 3),
        "task_steps_per_second": round(record["steps"] * record["num_tasks"] / wall, 3),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "date": time.strftime("%Y-%m-%d"),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "tiny_imagenet_32"))
    parser.add_argument("--arch", default="conv4")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    by_processes = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for processes in (1, 2):
                record = run(processes, args, Path(scratch) / f"run-{repeat}-{processes}")
                by_processes[processes].append(record["task_steps_per_second"])
                print(json.dumps(record), flush=True)
                with RESULTS.open("a") as f:
                    f.write(json.dumps(record) + "\n")
    ratio = statistics.median(by_processes[2]) / statistics.median(by_processes[1])
    print(json.dumps({"benchmark": "meta_training_throughput", "arch": args.arch,
                      "median_task_steps_per_second": {str(k): statistics.median(v) for k, v in by_processes.items()},
                      "speedup_2_vs_1": round(ratio, 3)}))


if __name__ == "__main__":
    main()
