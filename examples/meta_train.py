"""Meta-train a MetaPerturb perturbation function on a source image dataset split into class-disjoint tasks.

One process:
    python examples/meta_train.py --dataset ../shared/data/tiny_imagenet_32 --arch resnet20 --output-dir phi-tin

Several processes (tasks are spread over them; only φ's 82 gradients cross process boundaries):
    accelerate launch --num_processes 2 examples/meta_train.py --dataset ... (GPUs)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/meta_train.py --dataset ... (CPU)

`--dataset` takes a hub dataset id, a local folder of Parquet files (train*.parquet), a Parquet glob or file, or an
imagefolder directory. Every field of `MetaTrainingConfig` is a flag (underscores or dashes); the defaults are the
authors' protocol. A killed or interrupted (Ctrl-C) run continues with `--resume`.
"""

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from metaperturb_hf.meta_training import MetaTrainer, MetaTrainingConfig, create_accelerator
from metaperturb_hf.tasks import load_tasks


@dataclass
class TaskArguments:
    """How the source dataset becomes tasks."""

    split: str = field(default="train", metadata={"help": "split to build tasks from"})
    image_column: str = field(default="image", metadata={"help": "column holding the images"})
    label_column: str = field(default="label", metadata={"help": "column holding the integer class labels"})
    num_groups: int = field(default=5, metadata={"help": "class-disjoint groups; 2 tasks each"})
    swap: bool = field(default=True, metadata={"help": (
        "two tasks per group (A→B and B→A); --no-swap keeps one (train on A, validate on B)")})


@dataclass
class RunArguments:
    resume: str | None = field(default=None, metadata={"nargs": "?", "const": "latest", "help": (
        "continue from the latest checkpoint (or from the checkpoint folder given)")})
    push_to_hub: str | None = field(default=None, metadata={"metavar": "REPO", "help": (
        "publish the final φ and its card to this hub repo")})


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the option list, the module docstring as written."""


def parse_args(argv=None) -> tuple[MetaTrainingConfig, TaskArguments, RunArguments]:
    parser = HfArgumentParser((MetaTrainingConfig, TaskArguments, RunArguments), description=__doc__,
                              formatter_class=_HelpFormatter)
    config, tasks, run = parser.parse_args_into_dataclasses(args=argv)
    if not config.source:
        parser.error("--dataset is required: a hub dataset id, a Parquet folder/glob/file, or an imagefolder "
                     "directory")
    return config, tasks, run


def push(output_dir: str, repo: str, accelerator) -> None:
    from metaperturb_hf.hub import HubError, push_perturbation_folder

    try:
        url = push_perturbation_folder(Path(output_dir), repo)
    except HubError as error:
        sys.exit(f"{error}\nφ is still in {output_dir}; publish it later with "
                 f"metaperturb_hf.hub.push_perturbation_folder({output_dir!r}, {repo!r}).")
    accelerator.print(f"Published φ with its model card to {url}")


def main(argv=None):
    config, task_args, run = parse_args(argv)
    accelerator = create_accelerator(config)
    with accelerator.main_process_first():
        tasks = load_tasks(config.source, task_args.num_groups, split=task_args.split,
                           image_column=task_args.image_column, label_column=task_args.label_column,
                           image_size=config.image_size, seed=config.seed, swap=task_args.swap,
                           min_batch_size=config.batch_size)
    accelerator.print(f"{len(tasks)} tasks of {[len(t.classes) for t in tasks]} classes from {config.source}")
    trainer = MetaTrainer(config, tasks, accelerator=accelerator)
    if run.resume:
        trainer.resume(None if run.resume == "latest" else run.resume)
    trainer.train()
    if trainer.interrupted:
        sys.exit(130)
    if run.push_to_hub and accelerator.is_main_process:
        push(config.output_dir, run.push_to_hub, accelerator)
    accelerator.print(f"φ written to {config.output_dir} (save_pretrained + meta_training.json)")


if __name__ == "__main__":
    main()
