"""How strong is each φ? The multiplier s·z it applies at every site of a network, on real images.

For each perturbation function and network (fresh, or trained with φ: `--state-dict`) it runs one training-mode
forward pass (κ = 1, batch statistics) over 128 training images of a target and records, per site, the mean channel
scale s, the mean noise z, and the mean and standard deviation of the multiplier s·z (output / input); and, once per
φ, the mean |value| of each of its parameter tensors (a noise generator still near its N(0, 0.01) start gives
μ ≈ 0: noise independent of the input). A multiplier far below 1 with a large spread is strong regularization, which
a short transfer schedule may not absorb. Appends one JSON line per φ and per (φ, network, site) to
benchmarks/results/phi_statistics.jsonl.

    python benchmarks/phi_statistics.py [--target ../shared/data/cifar10_32] [--archs conv4,resnet20]
        [--perturbations NAME=PATH,...]     # default: every φ in hub_cards/ and the authors'

`--state-dict RUN.pt` measures a network trained with φ instead (`examples/transfer.py --save-model RUN.pt`; one φ
and one network, `--target` the dataset it trained on): φ meets the features the target taught, not those of a fresh
network. Its lines name the run (`"trained"`), and one more line gives its accuracy, MC-10, on the training and test
splits: a regularizer that keeps the network from fitting its training images shows there.
"""

import argparse
import json
from pathlib import Path

import torch

from metaperturb_hf import load_perturbation
from metaperturb_hf.data import load_image_dataset, normalize, to_tensors
from metaperturb_hf.evaluation import evaluate
from metaperturb_hf.hub import source_name
from metaperturb_hf.methods import apply_method, build_classifier

ROOT = Path(__file__).resolve().parents[1]
# Every released φ (named as in the cards' columns) and the authors' checkpoint.
PERTURBATIONS = {
    **{source_name(folder): folder for folder in sorted((ROOT / "hub_cards").iterdir())
       if (folder / "model.safetensors").is_file()},
    "authors-tin-resnet20": ROOT.parent / "shared" / "reference" / "official_tin_resnet20_perturb_750.pth",
}


def site_multipliers(model, images) -> list[dict]:
    """Per site, in call order: mean s, mean z, and the mean and std of output / input."""
    multipliers, perturb = [], model._perturb

    def recording(site, key, hidden_states):
        output = perturb(site, key, hidden_states)
        ratio = (output / hidden_states)[hidden_states.abs() > 1e-6]
        multipliers.append({"site": site.name, "multiplier_mean": ratio.mean().item(),
                            "multiplier_std": ratio.std().item()})
        return output

    model._perturb = recording
    model.train()
    with torch.no_grad(), model.perturbation.monitoring() as calls:
        model(images)
    for record, (scale, noise) in zip(multipliers, calls):
        record.update(mean_s=scale.item(), mean_z=noise.item())
    del model._perturb
    return multipliers


def fit(model, train, test) -> dict:
    """Accuracy (MC-10) on the training and test images: how far φ keeps the trained network from its training set."""
    torch.manual_seed(0)
    return {f"{split}_accuracy": round(evaluate(model, images, num_samples=10)["accuracy"], 4)
            for split, images in (("train", train), ("test", test))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=str(ROOT.parent / "shared" / "data" / "cifar10_32"))
    parser.add_argument("--archs", default="conv4,resnet20")
    parser.add_argument("--perturbations", help="NAME=PATH,... (default: every φ in hub_cards/ and the authors')")
    parser.add_argument("--state-dict", help="a run trained with φ (examples/transfer.py --save-model) to measure")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "phi_statistics.jsonl"))
    args = parser.parse_args(argv)
    chosen = (dict(item.split("=", 1) for item in args.perturbations.split(",")) if args.perturbations
              else PERTURBATIONS)
    if args.state_dict and (len(chosen) != 1 or "," in args.archs):
        parser.error("--state-dict measures one trained run: name its φ (--perturbations NAME=PATH) and its --archs")
    if args.state_dict and not Path(args.state_dict).is_file():
        parser.error(f"--state-dict {args.state_dict} is not a file; save one with examples/transfer.py --save-model")
    train = to_tensors(load_image_dataset(args.target, "train"))
    torch.manual_seed(0)
    images = normalize(train.images[torch.randperm(len(train))[:128]])
    with open(args.output, "a") as out:
        for name, path in chosen.items():
            if not Path(path).exists():
                print(f"skipping {name}: {path} is absent")
                continue
            phi = load_perturbation(path)
            weights = {"phi": name, "mean_abs": {key: round(value.abs().mean().item(), 4)
                                                 for key, value in phi.state_dict().items()}}
            out.write(json.dumps(weights) + "\n")
            print(json.dumps(weights))
            for arch in args.archs.split(","):
                model = apply_method(build_classifier(arch, len(train.class_names), images.shape[-1], seed=0),
                                     "metaperturb", images.shape[-1], load_perturbation(path))
                run = {"phi": name, "arch": arch, "target": Path(args.target).name}
                if args.state_dict:
                    model.load_state_dict(torch.load(args.state_dict, map_location="cpu", weights_only=True))
                    run["trained"] = Path(args.state_dict).name
                    lines = [{**run, **fit(model, train, to_tensors(load_image_dataset(args.target, "test")))}]
                else:
                    lines = []
                torch.manual_seed(0)
                lines += [{**run, **record} for record in site_multipliers(model, images)]
                for line in lines:
                    out.write(json.dumps(line) + "\n")
                    print(json.dumps(line))


if __name__ == "__main__":
    main()
