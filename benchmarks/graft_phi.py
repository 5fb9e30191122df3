"""Which half of φ carries a transfer result? Build a φ from the channel scale s of one and the noise generator μ of
another (or none: μ = 0, noise that ignores the input), then transfer it like any other φ.

φ has two parts (docs/method.md): the scale network (`stat_kernels` K and `scale_weight` w) sets s, the noise
generator (`identity_kernels` λ and `mean_kernels` γ) sets μ in z = softplus(μ + ε). The graft keeps the config of
`--scale-from` and takes λ and γ from `--noise-from`, or zeros them with `--noise-from zero`.

    python benchmarks/graft_phi.py --scale-from ../shared/reference/official_tin_resnet20_perturb_750.pth \
        --noise-from zero --output benchmarks/results/phi_graft/authors-s_mu0

`benchmarks/run_graft_1500.sh` builds the two grafts of the docs and transfers them.
"""

import argparse

import torch

from metaperturb_hf import load_perturbation

NOISE_GENERATOR = ("identity_kernels", "mean_kernels")


def graft(scale_from, noise_from):
    """A copy of `scale_from` whose noise generator is `noise_from`'s, or zero where `noise_from` is None."""
    phi = load_perturbation(scale_from)
    donor = None if noise_from is None else load_perturbation(noise_from)
    with torch.no_grad():
        for name in NOISE_GENERATOR:
            parameter = getattr(phi, name)
            if donor is None:
                parameter.zero_()
            else:
                parameter.copy_(getattr(donor, name))
    return phi


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale-from", required=True, help="φ whose scale network (K, w) the graft keeps")
    parser.add_argument("--noise-from", required=True,
                        help="φ whose noise generator (λ, γ) the graft takes, or 'zero' for μ = 0")
    parser.add_argument("--output", required=True, help="folder for the grafted φ (save_pretrained)")
    args = parser.parse_args(argv)
    phi = graft(args.scale_from, None if args.noise_from == "zero" else args.noise_from)
    phi.save_pretrained(args.output)
    print(f"φ with the scale network of {args.scale_from} and noise generator {args.noise_from}: {args.output}")


if __name__ == "__main__":
    main()
