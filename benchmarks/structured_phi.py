"""A φ to start meta-training from whose noise generator already has the shape of the authors' ResNet-20 φ, not its
values: μ grows with the local channel mean of h.

The authors' φ has uniform positive mean kernels (γ₁ ≈ 0.1, γ₂ ≈ 0.05 on every tap) and a positive second
identity kernel (λ₂ 0.02–0.26), so μ = PE₂(ReLU(PE₁(h))) is a smoothed ReLU of the channel mean of h. Started
from a shrunk copy of it (`graft_phi.py --noise-scale 0.3`), this project's meta-training grows the noise generator
back; started from N(0, 0.01) it loses it (benchmarks/results/phi_escape/README.md). This φ asks whether that shape
alone is enough: γ₁, λ₂ and γ₂ set to `--gain` on every tap, λ₁ and the scale network (K, w) drawn as
meta-training draws them.

    python benchmarks/structured_phi.py --gain 0.02 --output phi-init
    python examples/meta_train.py --dataset ../shared/data/tiny_imagenet_32_full --arch resnet20
        --phi-init-from phi-init
"""

import argparse

import torch

from metaperturb_hf.meta_training import MetaTrainingConfig, initial_phi


def structured_phi(gain: float, seed: int = 0):
    """meta-training's own initial φ for `seed`, with γ₁, λ₂ and γ₂ set to `gain` on every tap."""
    phi = initial_phi(MetaTrainingConfig(seed=seed))
    with torch.no_grad():
        phi.mean_kernels.fill_(gain)
        phi.identity_kernels[1].fill_(gain)
    return phi


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gain", type=float, default=0.02, help="value of every tap of γ₁, λ₂ and γ₂")
    parser.add_argument("--seed", type=int, default=0, help="seed of λ₁ and the scale network, as meta-training's")
    parser.add_argument("--output", required=True, help="folder for the φ (save_pretrained)")
    args = parser.parse_args(argv)
    if not args.gain > 0:
        parser.error(f"--gain must be positive, got {args.gain}")
    structured_phi(args.gain, args.seed).save_pretrained(args.output)
    print(f"φ with γ₁ = λ₂ = γ₂ = {args.gain:g} on every tap: {args.output}")


if __name__ == "__main__":
    main()
