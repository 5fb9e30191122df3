"""Meta-train a MetaPerturb perturbation function on a source image dataset split into class-disjoint tasks.

One process:
    python examples/meta_train.py --dataset ../shared/data/tiny_imagenet_32 --arch resnet20 --output-dir phi-tin

Several processes (tasks are spread over them; only φ's 82 gradients cross process boundaries):
    accelerate launch --num_processes 2 examples/meta_train.py --dataset ... (GPUs)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/meta_train.py --dataset ... (CPU)

`--dataset` takes a hub dataset id, a local folder of Parquet files (train*.parquet), a Parquet glob or file, or an
imagefolder directory. A killed or interrupted (Ctrl-C) run continues with `--resume`.
"""

import argparse
import sys
from pathlib import Path

from metaperturb_hf.meta_training import MetaTrainer, MetaTrainingConfig, create_accelerator
from metaperturb_hf.tasks import load_tasks


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, help="hub id, Parquet folder/glob/file, or imagefolder directory")
    data.add_argument("--split", default="train", help="split to build tasks from (default: train)")
    data.add_argument("--image-column", default="image")
    data.add_argument("--label-column", default="label")
    data.add_argument("--num-groups", type=int, default=5, help="class-disjoint groups; 2 tasks each (default: 5)")
    data.add_argument("--no-swap", action="store_true", help="one task per group (train A / validate B) instead of two")
    data.add_argument("--image-size", type=int, default=32, help="images are resized to this size (default: 32)")
    training = parser.add_argument_group("training")
    training.add_argument("--arch", default="resnet20", help="architecture, or a comma-separated list cycled over tasks")
    training.add_argument("--steps", type=int, default=750)
    training.add_argument("--batch-size", type=int, default=128)
    training.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of θ and φ")
    training.add_argument("--weight-decay", type=float, default=5e-4)
    phi = parser.add_argument_group("φ's optimisation (defaults: the authors' protocol)")
    phi.add_argument("--phi-weight-decay", type=float, default=None, help="φ's weight decay (default: --weight-decay)")
    phi.add_argument("--phi-weight-decay-mode", choices=["l2", "decoupled"], default="l2",
                     help="Adam's L2 term, as the authors (default), or decoupled as in AdamW")
    phi.add_argument("--phi-weight-decay-start", type=int, default=0,
                     help="first step at which φ's weight decay applies (default: 0, from the start)")
    phi.add_argument("--phi-init-std", type=float, default=None, help="std of φ's initial N(0, std) (default: 0.01)")
    phi.add_argument("--phi-init-average", type=int, default=1,
                     help="average φ's initial value over this many draws (the authors' 10 processes: 10; default 1)")
    training.add_argument("--lookahead", action="store_true", help="φ-gradient through a one-step lookahead of θ (slower)")
    training.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    training.add_argument("--seed", type=int, default=0)
    training.add_argument("--collective-timeout", type=float, default=1800.0,
                          help="seconds a process waits for the others before it stops with a message (default: 1800)")
    output = parser.add_argument_group("output")
    output.add_argument("--output-dir", default="metaperturb-output")
    output.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (0: never)")
    output.add_argument("--log-every", type=int, default=10)
    output.add_argument("--resume", nargs="?", const="latest", help="continue from the latest checkpoint (or a path)")
    output.add_argument("--push-to-hub", metavar="REPO", help="publish the final φ and its card to this hub repo")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    config = MetaTrainingConfig(
        architectures=args.arch,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        image_size=args.image_size,
        seed=args.seed,
        lookahead=args.lookahead,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        output_dir=args.output_dir,
        mixed_precision=args.mixed_precision,
        collective_timeout=args.collective_timeout,
        source=str(args.dataset),
        phi_weight_decay=args.phi_weight_decay,
        phi_weight_decay_mode=args.phi_weight_decay_mode,
        phi_weight_decay_start=args.phi_weight_decay_start,
        phi_init_std=args.phi_init_std,
        phi_init_average=args.phi_init_average,
    )
    accelerator = create_accelerator(config)
    with accelerator.main_process_first():
        tasks = load_tasks(
            args.dataset,
            args.num_groups,
            split=args.split,
            image_column=args.image_column,
            label_column=args.label_column,
            image_size=args.image_size,
            seed=args.seed,
            swap=not args.no_swap,
            min_batch_size=args.batch_size,
        )
    accelerator.print(f"{len(tasks)} tasks of {[len(t.classes) for t in tasks]} classes from {args.dataset}")
    trainer = MetaTrainer(config, tasks, accelerator=accelerator)
    if args.resume:
        trainer.resume(None if args.resume == "latest" else args.resume)
    trainer.train()
    if trainer.interrupted:
        sys.exit(130)
    if args.push_to_hub and accelerator.is_main_process:
        from metaperturb_hf.hub import HubError, push_perturbation_folder

        try:
            url = push_perturbation_folder(Path(args.output_dir), args.push_to_hub)
        except HubError as error:
            sys.exit(f"{error}\nφ is still in {args.output_dir}; publish it later with "
                     f"metaperturb_hf.hub.push_perturbation_folder({str(args.output_dir)!r}, {args.push_to_hub!r}).")
        accelerator.print(f"Published φ with its model card to {url}")
    accelerator.print(f"φ written to {args.output_dir} (save_pretrained + meta_training.json)")


if __name__ == "__main__":
    main()
