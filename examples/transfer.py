r"""Train a classifier on a target dataset with a frozen MetaPerturb φ, or with a baseline, over several seeds.

    python examples/transfer.py --dataset ../shared/data/cub200_2011_first50_32 --arch resnet20 \
        --method metaperturb --perturbation hub_cards/metaperturb-tin-resnet20 --steps 1500 --seeds 0,1,2 \
        --output results.json

Methods: none, metaperturb (reported with MC averaging over --mc-samples and as a single pass whose BatchNorm
statistics are chosen by agreement with MC on augmented training images among blends of those re-estimated under it
with those from training, those matched to the noise-averaged features and those fitted to MC's softmax; that record
also holds the accuracy of every candidate and `noise_off_calibrated_accuracy`), dropout, dropblock, manifold_mixup,
info_dropout, finetune (needs --init-from, a source-trained state dict of the same network; a saved MetaPerturb run
also serves).
`--hf-model` trains a `transformers` image classifier (a checkpoint, whose head is resized to the target's classes,
or a config, trained from scratch) instead of a reference network.
`--train-per-class N` keeps N training images per class (the small-data regime). Test accuracy, NLL and ECE come
from the dataset's `--test-split`.
"""

import argparse
import json
import statistics
from pathlib import Path

from metaperturb_hf import load_perturbation
from metaperturb_hf.data import load_image_dataset, subsample_per_class, to_tensors
from metaperturb_hf.methods import METHODS, run_transfer
from metaperturb_hf.transfer import TransferConfig, check_noise_strength


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="hub id, Parquet folder/glob/file, or imagefolder directory")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--arch", default="resnet20", help="reference network (see architectures.list_models())")
    parser.add_argument("--hf-model", metavar="CHECKPOINT_OR_CONFIG",
                        help="a transformers image classifier (hub id or folder) instead of --arch")
    parser.add_argument("--method", choices=METHODS, default="metaperturb")
    parser.add_argument("--perturbation", help="φ: a save_pretrained folder, a hub repo, or the authors' .pth")
    parser.add_argument("--noise-strength", type=float,
                        help="the κ the perturbation anneals to: 1 in full, below 1 weaker (method metaperturb; "
                             "default: the noise_strength in φ's config, 1 unless its release says less)")
    parser.add_argument("--init-from", help="state dict of a source-trained network (method finetune)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, one run each")
    parser.add_argument("--train-per-class", type=int, help="training images kept per class (small-data regime)")
    parser.add_argument("--mc-samples", type=int, default=10, help="noise samples averaged at test time")
    parser.add_argument("--output", help="write all records (and their mean) to this JSON file")
    parser.add_argument("--save-model", metavar="PATH",
                        help="save the trained network's state dict (last seed) here, e.g. a source network for "
                             "finetune; for metaperturb the whole perturbed model, single-pass statistics included")
    args = parser.parse_args(argv)
    if args.hf_model:
        args.arch = f"hf:{args.hf_model}"
    check_noise_strength(args.noise_strength)  # before any data is loaded
    return args


def load_split(args, split: str):
    dataset = load_image_dataset(args.dataset, split, args.image_column, args.label_column)
    return to_tensors(dataset, args.image_column, args.label_column, args.image_size)


def main(argv=None):
    args = parse_args(argv)
    if args.method == "metaperturb" and not args.perturbation:
        raise ValueError("--method metaperturb needs --perturbation PATH_OR_REPO (a meta-trained φ).")
    perturbation = load_perturbation(args.perturbation) if args.method == "metaperturb" else None
    train_full, test = load_split(args, args.train_split), load_split(args, args.test_split)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    records = []
    for seed in seeds:
        train = subsample_per_class(train_full, args.train_per_class, seed) if args.train_per_class else train_full
        config = TransferConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, seed=seed,
                                noise_strength=args.noise_strength)
        for record in run_transfer(args.method, args.arch, train, test, config, perturbation, args.mc_samples,
                                   args.init_from, progress=True, save_model=args.save_model):
            record.update(dataset=str(args.dataset), train_per_class=args.train_per_class)
            records.append(record)
            print(json.dumps(record), flush=True)
    summary = {}
    for method in sorted({r["method"] for r in records}):
        accuracies = [r["accuracy"] for r in records if r["method"] == method]
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        summary[method] = {"accuracy_mean": statistics.mean(accuracies), "accuracy_std": spread,
                           "seeds": len(accuracies)}
        print(f"{method:24s} accuracy {100 * statistics.mean(accuracies):.2f} ± {100 * spread:.2f} "
              f"over {len(accuracies)} seed(s)")
    if args.output:
        Path(args.output).write_text(json.dumps({"records": records, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
