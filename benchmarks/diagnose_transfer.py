"""Why does a perturbed model test worse than the plain one? Separate training-time from test-time effects.

Trains Conv4 with MetaPerturb on the quick start's digits (one seed), then evaluates the SAME trained model with
test-time noise as the authors do (MC over 5 and 10 draws), with the single-pass mean noise before and after
`calibrate_single_pass` (BatchNorm statistics re-estimated under the single pass on unaugmented training images, or
on augmented ones as in training), MC again after that calibration (it must not change), and with the perturbation
switched off (κ = 0); then with the classifier's own BatchNorm statistics overwritten by ones re-estimated with the
noise off and under sampled noise. Also prints the mean channel scale s and noise z that φ produces on the test
images. Appends one JSON line to benchmarks/results/diagnose_transfer.jsonl.

    python benchmarks/diagnose_transfer.py [--perturbation hub_cards/metaperturb-tin-conv4] [--steps 200]
"""

import argparse
import importlib.util
import json
from pathlib import Path

import torch

from metaperturb_hf.data import BatchSampler, normalize
from metaperturb_hf.evaluation import evaluate, normalized_batches
from metaperturb_hf.methods import apply_method, build_classifier, load_perturbation
from metaperturb_hf.transfer import TransferConfig, train_classifier

ROOT = Path(__file__).resolve().parents[1]


def quickstart_digits():
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.digits


@torch.no_grad()
def recalibrate_batchnorm(model, images, passes: int = 20, batch: int = 128):
    """Overwrite the classifier's own BatchNorm statistics with ones re-estimated under the current noise mode."""
    norms = [m for m in model.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
        norm.train()
    for i in range(passes):
        model(normalize(images[(i * batch) % len(images):][:batch]))
    for norm in norms:
        norm.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--perturbation", default=str(ROOT / "hub_cards" / "metaperturb-tin-conv4"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-class", type=int, default=20)
    args = parser.parse_args()
    train, test = quickstart_digits()(args.train_per_class, args.seed)
    phi = load_perturbation(args.perturbation)
    model = apply_method(build_classifier("conv4", 10, 32, args.seed), "metaperturb", 32, phi)
    train_classifier(model, train, TransferConfig(steps=args.steps, batch_size=64, seed=args.seed), progress=False)

    phi.monitor = []
    model.eval()
    model(normalize(test.images[:256]))
    scale, noise = (torch.stack(v).mean().item() for v in zip(*phi.monitor))
    phi.monitor = None

    record = {"perturbation": args.perturbation, "steps": args.steps, "seed": args.seed, "mean_s": scale, "mean_z": noise}
    record["mc5"] = evaluate(model, test, num_samples=5)["accuracy"]
    torch.manual_seed(args.seed)
    record["mc10"] = evaluate(model, test, num_samples=10)["accuracy"]
    model.set_noise_mode("mean")
    record["single_pass"] = evaluate(model, test)["accuracy"]
    augmented = BatchSampler(train, seed=args.seed)
    model.calibrate_single_pass(augmented.next_batch(64)[0] for _ in range(-(-len(train) // 64)))
    record["single_pass_calibrated_augmented"] = evaluate(model, test)["accuracy"]
    record["calibration_batches"] = model.calibrate_single_pass(normalized_batches(train, 64))
    record["single_pass_calibrated"] = evaluate(model, test)["accuracy"]
    model.set_noise_mode("sample")
    torch.manual_seed(args.seed)
    record["mc10_after_calibration"] = evaluate(model, test, num_samples=10)["accuracy"]
    model.single_pass_statistics = None  # what follows overwrites the classifier's own statistics
    model.set_noise_mode("mean")
    model.set_noise_coeff(0.0)
    record["noise_off"] = evaluate(model, test)["accuracy"]
    recalibrate_batchnorm(model, train.images)
    record["noise_off_bn_recalibrated"] = evaluate(model, test)["accuracy"]
    model.set_noise_coeff(1.0)
    model.set_noise_mode("sample")
    recalibrate_batchnorm(model, train.images)
    record["mc5_bn_recalibrated"] = evaluate(model, test, num_samples=5)["accuracy"]
    print(json.dumps(record))
    with (ROOT / "benchmarks" / "results" / "diagnose_transfer.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
