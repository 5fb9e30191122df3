"""Why does a perturbed model test worse than the plain one? Separate training-time from test-time effects.

Trains a network with MetaPerturb on a target (default: Conv4 on the quick start's digits, one seed), then evaluates
the SAME trained model with test-time noise as the authors do (MC-10), with the single-pass mean noise before and
after `calibrate_single_pass` (BatchNorm statistics of its own, re-estimated under the single pass on unaugmented
training images, or on augmented ones as in training), MC-10 again after that calibration (it must not change), and
with the perturbation switched off (κ = 0) before and after a calibration at κ = 0 (the classifier alone with
statistics re-estimated without noise: a plain forward's cost). Also prints the mean channel scale s and noise z that
φ produces on the test images. Appends one JSON line to benchmarks/results/diagnose_transfer.jsonl.

    python benchmarks/diagnose_transfer.py [--perturbation hub_cards/metaperturb-tin-conv4] [--steps 200]
    python benchmarks/diagnose_transfer.py --dataset ../shared/data/cub200_2011_first50_32 --batch-size 128 --steps 300
"""

import argparse
import importlib.util
import json
from pathlib import Path

import torch

from metaperturb_hf import load_perturbation
from metaperturb_hf.data import BatchSampler, load_image_dataset, normalize, subsample_per_class, to_tensors
from metaperturb_hf.evaluation import evaluate, normalized_batches
from metaperturb_hf.methods import apply_method, build_classifier
from metaperturb_hf.transfer import TransferConfig, train_classifier

ROOT = Path(__file__).resolve().parents[1]


def quickstart_digits():
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.digits


def target_data(args):
    """(train, test) of `--dataset`, or of the quick start's digits with `--train-per-class` images per class."""
    if args.dataset == "digits":
        return quickstart_digits()(args.train_per_class or 20, args.seed)
    train, test = (to_tensors(load_image_dataset(args.dataset, split)) for split in ("train", "test"))
    return (subsample_per_class(train, args.train_per_class, args.seed) if args.train_per_class else train), test


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", help="'digits' or a Parquet folder with train/test splits")
    parser.add_argument("--arch", default="conv4")
    parser.add_argument("--perturbation", default=str(ROOT / "hub_cards" / "metaperturb-tin-conv4"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-class", type=int, help="default: 20 for digits, all images otherwise")
    args = parser.parse_args()
    train, test = target_data(args)
    image_size = train.images.shape[-1]
    phi = load_perturbation(args.perturbation)
    model = apply_method(build_classifier(args.arch, len(train.class_names), image_size, args.seed), "metaperturb",
                         image_size, phi)
    config = TransferConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    train_classifier(model, train, config, progress=False)

    model.eval()
    with phi.monitoring() as calls:
        model(normalize(test.images[:256]))
    scale, noise = (torch.stack(v).mean().item() for v in zip(*calls))

    record = {"dataset": args.dataset, "arch": args.arch, "perturbation": args.perturbation, "steps": args.steps,
              "seed": args.seed, "train_images": len(train), "mean_s": scale, "mean_z": noise}
    torch.manual_seed(args.seed)
    record["mc10"] = evaluate(model, test, num_samples=10)["accuracy"]
    model.set_noise_mode("mean")
    record["single_pass"] = evaluate(model, test)["accuracy"]
    augmented = BatchSampler(train, seed=args.seed)
    epoch = -(-len(train) // args.batch_size)
    model.calibrate_single_pass(augmented.next_batch(args.batch_size)[0] for _ in range(epoch))
    record["single_pass_calibrated_augmented"] = evaluate(model, test)["accuracy"]
    record["calibration_batches"] = model.calibrate_single_pass(normalized_batches(train, args.batch_size))
    record["single_pass_calibrated"] = evaluate(model, test)["accuracy"]
    model.set_noise_mode("sample")
    torch.manual_seed(args.seed)
    record["mc10_after_calibration"] = evaluate(model, test, num_samples=10)["accuracy"]
    model.set_noise_mode("mean")
    model.set_noise_coeff(0.0)
    record["noise_off"] = evaluate(model, test)["accuracy"]
    model.calibrate_single_pass(normalized_batches(train, args.batch_size))
    record["noise_off_calibrated"] = evaluate(model, test)["accuracy"]
    print(json.dumps(record))
    with (ROOT / "benchmarks" / "results" / "diagnose_transfer.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")

if __name__ == "__main__":
    main()
