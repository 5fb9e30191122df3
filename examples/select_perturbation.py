r"""Meta-train φ with several seeds and keep the best, scored on source classes held out of meta-training.

The paper keeps the best of 5 meta-training runs on held-out data. Here every candidate is scored by a short
transfer, with source data only: `--holdout-classes` classes never enter meta-training; a fresh classifier is
trained with the candidate φ on `--score-train-per-class` of their training images and tested on their test split.
Each candidate's score (and the unperturbed baseline's) goes into its meta_training.json under "selection"; the
winner is copied to OUTPUT_DIR/best. Finished candidates are kept, interrupted ones resume from their checkpoints.

    python examples/select_perturbation.py --dataset ../shared/data/tiny_imagenet_32_full --architectures resnet20 \
        --seeds 0,1,2,3,4 --holdout_classes 40 --num_groups 4 --output_dir phi-selection

Every MetaTrainingConfig field is a flag (`--steps`, `--phi_weight_decay`, ...); `--output_dir` holds the candidates
and `--seeds` replaces `--seed`; `--dataset` is MetaTrainingConfig's `source`.
"""

import argparse
import json
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from transformers import HfArgumentParser

from metaperturb_hf import load_perturbation
from metaperturb_hf.data import load_image_dataset, split_classes, subsample_per_class, to_tensors
from metaperturb_hf.meta_training import MetaTrainer, MetaTrainingConfig
from metaperturb_hf.meta_training_record import META_TRAINING_FILE
from metaperturb_hf.methods import run_transfer
from metaperturb_hf.tasks import build_tasks
from metaperturb_hf.transfer import TransferConfig


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the option list, the module docstring as written."""


@dataclass
class SelectionArguments:
    """What is selected over and how a candidate is scored."""

    seeds: str = "0,1,2,3,4"
    num_groups: int = 4
    holdout_classes: int = 40
    split_seed: int = 0
    train_split: str = "train"
    test_split: str = "test"
    score_arch: str | None = None  # default: the first meta-training architecture
    score_steps: int = 500
    score_train_per_class: int = 50
    score_mc_samples: int = 10


def load_split(source: str, split: str, image_size: int):
    return to_tensors(load_image_dataset(source, split), image_size=image_size)


def meta_train(config: MetaTrainingConfig, tasks) -> Path:
    """One candidate: reuse it when finished, resume it when a checkpoint exists, else train it."""
    folder = Path(config.output_dir)
    if (folder / META_TRAINING_FILE).is_file():
        print(f"{folder}: finished earlier, kept")
        return folder
    trainer = MetaTrainer(config, tasks)
    trainer.resume()
    trainer.train()
    if trainer.interrupted:
        sys.exit(130)
    return folder


def score(folder: Path | None, arch: str, train, test, args: SelectionArguments, batch_size: int) -> float:
    """MC accuracy of a short transfer to the held-out classes with φ from `folder` (None: no perturbation)."""
    config = TransferConfig(steps=args.score_steps, batch_size=batch_size, seed=0)
    method = "none" if folder is None else "metaperturb"
    phi = None if folder is None else load_perturbation(folder)
    records = run_transfer(method, arch, train, test, config, phi, mc_samples=args.score_mc_samples)
    return records[0]["accuracy"]


def main(argv=None):
    parser = HfArgumentParser((MetaTrainingConfig, SelectionArguments), description=__doc__,
                              formatter_class=_HelpFormatter)
    base, args = parser.parse_args_into_dataclasses(argv)
    if not base.source:
        parser.error("--dataset is required: the source dataset (hub id, Parquet folder/glob/file, imagefolder)")
    dataset, root = base.source, Path(base.output_dir)
    source_train = load_split(dataset, args.train_split, base.image_size)
    source_test = load_split(dataset, args.test_split, base.image_size)
    meta_classes, held_out_train, held_out = split_classes(source_train, args.holdout_classes, args.split_seed)
    _, held_out_test, _ = split_classes(source_test, args.holdout_classes, args.split_seed)
    if held_out_test.class_names != held_out_train.class_names:
        raise ValueError(f"The {args.train_split} and {args.test_split} splits of {dataset} hold different classes.")
    score_train = subsample_per_class(held_out_train, args.score_train_per_class, args.split_seed)
    arch = args.score_arch or base.architectures[0]

    scores = {}
    for seed in (int(seed) for seed in args.seeds.split(",")):
        tasks = build_tasks(meta_classes, args.num_groups, seed=seed, min_batch_size=base.batch_size)
        config = replace(base, seed=seed, output_dir=str(root / f"seed-{seed}"),
                         source=f"{dataset} ({args.train_split}, {len(held_out)} classes held out)")
        folder = meta_train(config, tasks)
        scores[folder.name] = score(folder, arch, score_train, held_out_test, args, base.batch_size)
        print(f"{folder.name}: held-out transfer accuracy {100 * scores[folder.name]:.2f} %", flush=True)
    baseline = score(None, arch, score_train, held_out_test, args, base.batch_size)
    winner = max(scores, key=scores.get)
    selection = {
        "protocol": f"transfer with {arch}, {args.score_steps} steps, {args.score_train_per_class} images per class "
                    f"of {len(held_out)} source classes held out of meta-training, MC-{args.score_mc_samples} "
                    f"accuracy on their {args.test_split} split",
        "held_out_classes": held_out,
        "scores": scores,
        "no_perturbation": baseline,
        "winner": winner,
    }
    for name in scores:
        record_path = root / name / META_TRAINING_FILE
        record = json.loads(record_path.read_text())
        record["selection"] = {**selection, "selected": name == winner}
        record_path.write_text(json.dumps(record, indent=2))
    best = root / "best"
    shutil.rmtree(best, ignore_errors=True)
    shutil.copytree(root / winner, best, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    print(f"Best of {len(scores)}: {winner} ({100 * scores[winner]:.2f} % vs {100 * baseline:.2f} % without φ); "
          f"copied to {best}")


if __name__ == "__main__":
    main()
