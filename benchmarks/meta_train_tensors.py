"""Meta-train φ from a packed tensor source (see pack_webp.py) within a wall-clock budget, e.g. on a GPU machine.

The GPU machines lent to this project lack the `datasets` package and cap uploads at 64 MiB, so this driver reads
the lossless-WebP Parquet written by pack_webp.py with pyarrow and Pillow and calls the same `build_tasks` and
`MetaTrainer` as examples/meta_train.py. If the pace after warm-up projects past `--time-budget-s`, the step count is
cut to fit and meta_training.json records the steps actually run.

    python benchmarks/meta_train_tensors.py .gpu/tin_train_webp.parquet --arch resnet20 --output-dir phi-resnet20
"""

import argparse
import io
import sys
import time
import types

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

try:
    import datasets  # noqa: F401
except ImportError:  # only metaperturb_hf.data's loaders need it, not build_tasks
    sys.modules["datasets"] = types.ModuleType("datasets")

from metaperturb_hf.data import ImageTensors  # noqa: E402
from metaperturb_hf.meta_training import MetaTrainer, MetaTrainingConfig  # noqa: E402
from metaperturb_hf.tasks import build_tasks  # noqa: E402


def load_packed(path: str) -> ImageTensors:
    table = pq.read_table(path)
    images = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in table.column("webp").to_pylist()])
    labels = torch.tensor(table.column("label").to_numpy())
    return ImageTensors(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels,
                        [str(i) for i in range(int(labels.max()) + 1)])


class BudgetedTrainer(MetaTrainer):
    """Cuts `steps` once, from the pace of steps `warmup`..`warmup + probe` (warm-up excluded), to end in budget."""

    def __init__(self, *args, budget_s: float, warmup: int = 5, probe: int = 10, **kwargs):
        super().__init__(*args, **kwargs)
        self.budget_s, self.warmup, self.probe = budget_s, warmup, probe
        self.started = self.probe_started = None

    def _meta_step(self, record: bool = True):
        now = time.time()
        self.started = self.started or now
        if self.step == self.warmup:
            self.probe_started = now
        if self.step == self.warmup + self.probe:
            per_step = (now - self.probe_started) / self.probe
            affordable = self.step + int((self.budget_s - (now - self.started)) / per_step)
            print(f"{per_step:.3f} s/step after warm-up", flush=True)
            if affordable < self.config.steps:
                print(f"budget {self.budget_s:.0f} s: cutting steps {self.config.steps} -> {affordable}", flush=True)
                self.config.steps = max(affordable, self.step + 1)
        return super()._meta_step(record)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("packed")
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--steps", type=int, default=750)
    parser.add_argument("--num-groups", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget-s", type=float, default=float("inf"))
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--source-name", default="tiny_imagenet_32 (train split)")
    args = parser.parse_args()

    tensors = load_packed(args.packed)
    tasks = build_tasks(tensors, args.num_groups, seed=args.seed, min_batch_size=128)
    config = MetaTrainingConfig(architectures=args.arch, steps=args.steps, seed=args.seed, checkpoint_every=0,
                                log_every=25, output_dir=args.output_dir, source=args.source_name)
    trainer = BudgetedTrainer(config, tasks, budget_s=args.time_budget_s)
    started = time.time()
    trainer.train()
    print(f"{args.arch}: {trainer.step} steps in {time.time() - started:.1f} s on {trainer.accelerator.device}",
          flush=True)


if __name__ == "__main__":
    main()
