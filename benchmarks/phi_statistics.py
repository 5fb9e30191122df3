"""How strong is each φ? The multiplier s·z it applies at every site of a fresh network, on real images.

For each perturbation function and network it runs one training-mode forward pass (κ = 1, batch statistics) over
128 training images of a target and records, per site, the mean channel scale s, the mean noise z, and the mean and
standard deviation of the multiplier s·z (output / input); and, once per φ, the mean |value| of each of its
parameter tensors (a noise generator still near its N(0, 0.01) start gives μ ≈ 0: noise independent of the input).
A multiplier far below 1 with a large spread is strong
regularization, which a short transfer schedule may not absorb. Appends one JSON line per φ and per (φ, network, site) to
benchmarks/results/phi_statistics.jsonl.

    python benchmarks/phi_statistics.py [--target ../shared/data/cifar10_32] [--archs conv4,resnet20]
        [--perturbations NAME=PATH,...]     # default: every φ in hub_cards/ and the authors'
"""

import argparse
import json
from pathlib import Path

import torch

from metaperturb_hf import load_perturbation
from metaperturb_hf.data import load_image_dataset, normalize, to_tensors
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=str(ROOT.parent / "shared" / "data" / "cifar10_32"))
    parser.add_argument("--archs", default="conv4,resnet20")
    parser.add_argument("--perturbations", help="NAME=PATH,... (default: every φ in hub_cards/ and the authors')")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "phi_statistics.jsonl"))
    args = parser.parse_args()
    chosen = dict(item.split("=", 1) for item in args.perturbations.split(",")) if args.perturbations else PERTURBATIONS
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
                torch.manual_seed(0)
                for record in site_multipliers(model, images):
                    line = {"phi": name, "arch": arch, "target": Path(args.target).name, **record}
                    out.write(json.dumps(line) + "\n")
                    print(json.dumps(line))


if __name__ == "__main__":
    main()
