r"""Which half of φ carries a transfer result? Build a φ from the channel scale s of one and the noise generator μ of
another (or none: μ = 0, noise that ignores the input), then transfer it like any other φ.

φ has two parts (docs/method.md): the scale network (`stat_kernels` K and `scale_weight` w) sets s, the noise
generator (`identity_kernels` λ and `mean_kernels` γ) sets μ in z = softplus(μ + ε). The graft keeps the config of
`--scale-from` and takes λ and γ from `--noise-from`, or zeros them with `--noise-from zero`; `--noise-scale`
multiplies both layers of the noise generator taken (μ scales with its square), e.g. to start meta-training from a
shrunk copy of a φ and see whether it grows back (`examples/meta_train.py --phi-init-from`); `--flatten-noise` keeps
each kernel's sum but not its spatial profile, to tell which of the two such a start needs; `--set` edits single
filters or weights after the graft (e.g. which of the scale network's statistics a start needs).

    python benchmarks/graft_phi.py --scale-from ../shared/reference/official_tin_resnet20_perturb_750.pth \
        --noise-from zero --output benchmarks/results/phi_graft/authors-s_mu0

`benchmarks/run_graft_1500.sh` builds the two grafts of the docs and transfers them.
"""

import argparse
import re

import torch

from metaperturb_hf import load_perturbation

NOISE_GENERATOR = ("identity_kernels", "mean_kernels")
SETTING = re.compile(r"^(?P<name>\w+)\[(?P<index>\d+)\]=(?P<value>\S+)$")


def graft(scale_from, noise_from, noise_scale=1.0, flatten_noise=False):
    """A copy of `scale_from` whose noise generator is `noise_scale` times `noise_from`'s, or zero where `noise_from`
    is None; `flatten_noise` sets every tap of each 3×3 kernel taken to that kernel's mean (its sum kept, its spatial
    profile dropped)."""
    phi = load_perturbation(scale_from)
    donor = None if noise_from is None else load_perturbation(noise_from)
    with torch.no_grad():
        for name in NOISE_GENERATOR:
            parameter = getattr(phi, name)
            if donor is None:
                parameter.zero_()
            else:
                kernels = noise_scale * getattr(donor, name)
                if flatten_noise:
                    kernels = kernels.mean(dim=(-2, -1), keepdim=True).expand_as(kernels)
                parameter.copy_(kernels)
    return phi


def parse_setting(text: str, phi) -> tuple[str, int, float]:
    """`scale_weight[7]=0` -> ("scale_weight", 7, 0.0), checked against φ's parameters."""
    match = SETTING.match(text)
    parameters = dict(phi.named_parameters())
    names = ", ".join(parameters)
    if match is None:
        raise ValueError(f"--set takes NAME[INDEX]=VALUE, e.g. scale_weight[7]=0 (NAME one of {names}), got '{text}'")
    name, index = match["name"], int(match["index"])
    parameter = parameters.get(name)
    if parameter is None:
        raise ValueError(f"--set names a parameter of φ ({names}), got '{name}' in '{text}'")
    if index >= parameter.shape[0]:
        raise ValueError(f"--set: {name} has {parameter.shape[0]} entries along its first axis, got index {index}")
    try:
        value = float(match["value"])
    except ValueError:
        raise ValueError(f"--set: '{match['value']}' in '{text}' is not a number") from None
    return name, index, value


def apply_settings(phi, settings: list[str]) -> None:
    """Set entry INDEX along the first axis of each named parameter (every tap of a kernel) to VALUE."""
    with torch.no_grad():
        for name, index, value in [parse_setting(text, phi) for text in settings]:
            getattr(phi, name)[index] = value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale-from", required=True, help="φ whose scale network (K, w) the graft keeps")
    parser.add_argument("--noise-from", required=True,
                        help="φ whose noise generator (λ, γ) the graft takes, or 'zero' for μ = 0")
    parser.add_argument("--noise-scale", type=float, default=1.0,
                        help="factor on both noise-generator layers taken from --noise-from")
    parser.add_argument("--flatten-noise", action="store_true",
                        help="set every tap of each noise-generator kernel taken to the kernel's mean (which matters: "
                             "the values or their spatial profile?)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME[INDEX]=VALUE",
                        help="after the graft, set entry INDEX along the first axis of φ's parameter NAME (all taps "
                             "of a kernel) to VALUE; repeatable, e.g. --set stat_kernels[3]=0.24 "
                             "--set scale_weight[7]=0")
    parser.add_argument("--output", required=True, help="folder for the grafted φ (save_pretrained)")
    args = parser.parse_args(argv)
    if args.noise_scale <= 0:
        parser.error(f"--noise-scale must be positive, got {args.noise_scale}")
    if args.flatten_noise and args.noise_from == "zero":
        parser.error("--flatten-noise needs a φ in --noise-from, not 'zero'")
    phi = graft(args.scale_from, None if args.noise_from == "zero" else args.noise_from, args.noise_scale,
                args.flatten_noise)
    try:
        apply_settings(phi, args.set)
    except ValueError as error:
        parser.error(str(error))
    phi.save_pretrained(args.output)
    scaled = f" × {args.noise_scale:g}" if args.noise_scale != 1 else ""
    scaled += ", each kernel flattened to its mean" if args.flatten_noise else ""
    scaled += "".join(f", {setting}" for setting in args.set)
    print(f"φ with the scale network of {args.scale_from} and noise generator "
          f"{args.noise_from}{scaled}: {args.output}")


if __name__ == "__main__":
    main()
