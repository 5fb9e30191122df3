"""Quick start: does a meta-learned φ help a small network on little data? Base vs MetaPerturb, a few minutes on CPU.

Data: scikit-learn's handwritten digits (ships with the package; no download), upscaled to 32×32 RGB, with
`--train-per-class` training images per class and every other image as the test set. Network: Conv4. φ: the best
this project has released, meta-trained on all of Tiny ImageNet with ResNet-20
(hub_cards/metaperturb-tin-full-resnet20-gated), at the strength it is released at (κ annealed to 0.5, its config's
noise_strength). 1000 steps of batch 64 give the 200 training images 320 epochs: the method is for many epochs on
little data.
Prints a table of test accuracy (mean ± std over seeds), writes the records and a bar chart to quickstart-output/,
and the last perturbed model (classifier, φ, statistics) with `save_pretrained` to quickstart-output/perturbed-conv4.

The whole API is in `train_and_test`: `create_model` → `add_perturbation` → a training loop that anneals the noise
with `set_noise_coeff` → `predict_proba` over noise samples → a calibrated single pass → `save_pretrained`.

    python examples/quickstart.py             # 3 seeds, about 4 minutes on 2 CPU cores (+1 to build the kernel)
    python examples/quickstart.py --quick     # 1 seed, a few steps: a smoke test
"""

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from metaperturb_hf import MetaPerturbModel, add_perturbation, load_perturbation
from metaperturb_hf.architectures import create_model
from metaperturb_hf.data import BatchSampler, ImageTensors, normalize
from metaperturb_hf.hub import source_name, variant_source
from metaperturb_hf.methods import choice_batches
from metaperturb_hf.transfer import learning_rate_factor, noise_coeff_at

DEFAULT_PERTURBATION = Path(__file__).resolve().parents[1] / "hub_cards" / "metaperturb-tin-full-resnet20-gated"


def digits(train_per_class: int, seed: int) -> tuple[ImageTensors, ImageTensors]:
    """Digits as uint8 RGB 32×32 images, split into a small class-balanced training set and a test set."""
    data = load_digits()
    pixels = torch.tensor(data.images, dtype=torch.float32)[:, None] * (255 / 16)
    images = (F.interpolate(pixels, size=32, mode="bilinear").round().clamp(0, 255).to(torch.uint8)
              .expand(-1, 3, -1, -1))
    labels = torch.tensor(data.target)
    generator = torch.Generator().manual_seed(seed)
    train_rows = torch.cat([
        torch.nonzero(labels == c).flatten()[
            torch.randperm(int((labels == c).sum()), generator=generator)[:train_per_class]]
        for c in range(10)
    ])
    test_mask = torch.ones(len(labels), dtype=torch.bool)
    test_mask[train_rows] = False
    names = [str(c) for c in range(10)]
    return (ImageTensors(images[train_rows].contiguous(), labels[train_rows], names),
            ImageTensors(images[test_mask].contiguous(), labels[test_mask], names))


def train_and_test(train: ImageTensors, test: ImageTensors, phi: MetaPerturbModel | None, args, seed: int,
                   save_to: Path | None = None) -> dict[str, float]:
    """Train Conv4 on `train` (with φ's noise when `phi` is given) and return its test accuracies."""
    torch.manual_seed(seed)
    model = create_model("conv4", num_classes=10, image_size=32)
    if phi is not None:
        model = add_perturbation(model, phi)  # φ frozen, one site per block; the classifier's keys untouched
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, args.steps))
    batches = BatchSampler(train, seed=seed)  # padded random crops and flips, normalised
    model.train()
    for step in range(args.steps):
        if phi is not None:
            # κ: 0 → φ's released strength (its config's noise_strength, 1 for most) over the first 40 % of the
            # steps
            model.set_noise_coeff(noise_coeff_at(step, args.steps, noise_strength=phi.config.noise_strength))
        images, labels = batches.next_batch(args.batch_size)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()

    model.eval()
    with torch.no_grad():
        if phi is None:
            return {"none": accuracy(model, test)}
        results = {"metaperturb": accuracy(lambda x: model.predict_proba(x, num_samples=args.mc_samples), test)}
        # One deterministic pass instead of MC, with BatchNorm statistics of its own: blends of those re-estimated on
        # training images with those from training, or those matched to the noise-averaged features, whichever single
        # pass agrees most with MC on augmented training batches drawn apart from training's, as the transfer path
        # chooses (on the plain images, which the network has memorised, every good candidate agrees with MC).
        model.calibrate_single_pass(normalize(chunk) for chunk in train.images.split(args.batch_size))
        model.choose_single_pass_statistics(choice_batches(train, args.batch_size, seed))
        model.set_noise_mode("mean")
        results["metaperturb_single_pass"] = accuracy(model, test)
    if save_to is not None:
        model.save_pretrained(save_to)  # back with PerturbedModel.from_pretrained(save_to)
    return results


def accuracy(predict, test: ImageTensors, batch_size: int = 256) -> float:
    """Share of test images whose highest score from `predict` (logits or probabilities) is their label."""
    scores = torch.cat([predict(normalize(chunk)) for chunk in test.images.split(batch_size)])
    return float((scores.argmax(-1) == test.labels).float().mean())


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    means = [100 * summary[m]["mean"] for m in methods]
    stds = [100 * summary[m]["std"] for m in methods]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    colors = ["#9e9e9e", "#1f77b4", "#7fb3e0"][: len(methods)]
    ax.bar([m.replace("_", "\n") for m in methods], means, yerr=stds, capsize=4, color=colors)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(max(0, min(means) - 15), min(100, max(means) + 8))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--perturbation", default=str(DEFAULT_PERTURBATION),
                        help="φ folder, hub repo or authors' .pth")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-per-class", type=int, default=20)
    parser.add_argument("--mc-samples", type=int, default=5)
    parser.add_argument("--output-dir", default="quickstart-output")
    parser.add_argument("--quick", action="store_true", help="1 seed and 20 steps, to check that everything runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = "0", 20
    phi = load_perturbation(args.perturbation)
    source = variant_source(source_name(args.perturbation), noise_strength=phi.config.noise_strength)  # as the grid
    output = Path(args.output_dir)
    seeds = [int(s) for s in args.seeds.split(",")]
    records = []
    for seed in seeds:
        train, test = digits(args.train_per_class, seed)
        for perturbation in (None, phi):
            save_to = output / "perturbed-conv4" if perturbation is not None and seed == seeds[-1] else None
            for method, value in train_and_test(train, test, perturbation, args, seed, save_to).items():
                records.append({"target": "digits", "method": method, "arch": "conv4", "seed": seed, "accuracy": value,
                                "steps": args.steps, "train_per_class": args.train_per_class,
                                "source": source if perturbation is not None else "-"})
                print(f"seed {seed}  {method:24s} accuracy {100 * value:.2f}", flush=True)

    summary = {}
    for method in dict.fromkeys(r["method"] for r in records):
        values = [r["accuracy"] for r in records if r["method"] == method]
        summary[method] = {"mean": statistics.mean(values),
                           "std": statistics.stdev(values) if len(values) > 1 else 0.0, "seeds": len(values)}
    title = (f"digits, {args.train_per_class} train images/class, Conv4, {args.steps} steps, "
             f"{summary['none']['seeds']} seed(s)")
    print("\n| method | test accuracy (%) | seeds |\n|---|---|---|")
    for method, stats in summary.items():
        print(f"| {method} | {100 * stats['mean']:.2f} ± {100 * stats['std']:.2f} | {stats['seeds']} |")
    output.mkdir(parents=True, exist_ok=True)
    (output / "quickstart_results.json").write_text(json.dumps({"records": records, "summary": summary}, indent=2))
    plot(summary, output / "quickstart.png", title)
    print(f"\nWrote {output / 'quickstart_results.json'} and {output / 'quickstart.png'}")


if __name__ == "__main__":
    main()
