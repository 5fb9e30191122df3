"""A two-minute tour of the API on data that ships with scikit-learn (no download):

wrap a `transformers` ResNet with a perturbation function, train it briefly on 8×8 digits upscaled to 32×32,
then predict by averaging the softmax over several noise samples.

    python examples/demo.py [--perturbation DIR_OR_AUTHORS_PTH] [--steps 60]
"""

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from transformers import ResNetConfig, ResNetForImageClassification

from metaperturb_hf import MetaPerturbConfig, MetaPerturbModel, add_perturbation, convert_official_checkpoint


def load_perturbation(path: str | None) -> MetaPerturbModel:
    if path is None:
        print("No --perturbation given: using a freshly initialised φ (meta-train one for real gains).")
        return MetaPerturbModel(MetaPerturbConfig())
    if path.endswith(".pth"):
        return convert_official_checkpoint(path)
    return MetaPerturbModel.from_pretrained(path)


def digits_as_images(seed: int):
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # 0..16 -> [-1, 1]
    images = F.interpolate(images, size=32, mode="bilinear").expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    return images[order[:500]], labels[order[:500]], images[order[500:]], labels[order[500:]]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--perturbation", help="a save_pretrained folder, or the authors' .pth checkpoint")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--mc-samples", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    train_x, train_y, test_x, test_y = digits_as_images(args.seed)
    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1], layer_type="basic",
                          num_labels=10)
    model = add_perturbation(ResNetForImageClassification(config), load_perturbation(args.perturbation))
    print(f"{len(model.sites)} sites (C_norm={model.channel_norm:g}, H_norm={model.spatial_norm:g}):")
    for site in model.sites:
        print(f"  {site.name:40s} {site.channels:4d} channels  {site.spatial_size}x{site.spatial_size}")

    optimizer = torch.optim.Adam(model.model.parameters(), lr=1e-3, weight_decay=5e-4)
    model.train()
    for step in range(args.steps):
        model.set_noise_coeff(min(1.0, step / (0.4 * args.steps)))  # κ annealed over the first 40 % of steps
        batch = torch.randint(0, len(train_y), (64,))
        loss = model(pixel_values=train_x[batch], labels=train_y[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  κ {model.noise_coeff:.2f}")

    model.eval()
    probs = model.predict_proba(pixel_values=test_x, num_samples=args.mc_samples)
    accuracy = (probs.argmax(-1) == test_y).float().mean().item()
    print(f"test accuracy with {args.mc_samples} noise samples: {accuracy:.3f} on {len(test_y)} digits")


if __name__ == "__main__":
    main()
