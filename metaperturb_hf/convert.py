"""Convert the authors' released MetaPerturb checkpoint (`.pth`) into a `MetaPerturbModel`, and the authors'
classifiers' state dicts into this package's reference networks.

    python -m metaperturb_hf.convert official_tin_resnet20_perturb_750.pth ./metaperturb-tin-resnet20

The checkpoint is read with `torch.load(..., weights_only=True)`, so no pickled code is ever executed.
"""

import argparse
import math
import os
import pickle
import re
from collections.abc import Mapping

import torch
from torch import nn

from .checkpointing import load_error_reason
from .configuration_metaperturb import MetaPerturbConfig
from .modeling_metaperturb import MetaPerturbModel

# Authors' key -> (our parameter, rows of it); shapes are checked against ours.
OFFICIAL_KEYS = {
    "phi_1.w_identity": ("identity_kernels", 0),
    "phi_2.w_identity": ("identity_kernels", 1),
    "phi_1.w_all": ("mean_kernels", 0),
    "phi_2.w_all": ("mean_kernels", 1),
    "kernel": ("stat_kernels", None),
    "fc.weight": ("scale_weight", None),
}


def load_official_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the authors' checkpoint safely and check that it holds exactly their six tensors."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"No checkpoint at {path}.") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(
            f"{path} is not a plain tensor checkpoint that can be read safely with weights_only=True "
            f"({load_error_reason(error)}); load it with weights_only=False only if you trust where it came from."
        ) from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (got {type(state).__name__}).")
    missing = sorted(set(OFFICIAL_KEYS) - set(state))
    unexpected = sorted(set(state) - set(OFFICIAL_KEYS))
    if missing or unexpected:
        raise ValueError(
            f"{path} is not an authors' MetaPerturb checkpoint: missing keys {missing}, unexpected keys {unexpected}."
        )
    return state


def official_shapes(config: MetaPerturbConfig) -> dict[str, tuple[int, ...]]:
    """The exact shape of each of the authors' tensors for a config (their Conv2d/Linear layouts)."""
    k, filters = config.kernel_size, config.num_stat_filters
    shapes = {key: (1, 1, k, k) for key in ("phi_1.w_identity", "phi_2.w_identity", "phi_1.w_all", "phi_2.w_all")}
    return {**shapes, "kernel": (filters, 1, k, k), "fc.weight": (1, 2 * filters + 2)}


def convert_official_checkpoint(path: str | os.PathLike, config: MetaPerturbConfig | None = None) -> MetaPerturbModel:
    """Build a `MetaPerturbModel` holding the weights of the authors' checkpoint at `path`.

    Every tensor is checked (exact shape, floating point, finite) before the model is built, so a bad checkpoint
    raises and leaves nothing behind.
    """
    config = config or MetaPerturbConfig()
    state = load_official_state_dict(path)
    for official_key, shape in official_shapes(config).items():
        source = state[official_key]
        if tuple(source.shape) != shape:
            name = OFFICIAL_KEYS[official_key][0]
            raise ValueError(
                f"{path}: '{official_key}' has shape {tuple(source.shape)}, expected {shape} for '{name}' "
                f"(kernel_size={config.kernel_size}, num_stat_filters={config.num_stat_filters}); the checkpoint "
                "and the config disagree."
            )
        if not source.is_floating_point() or not torch.isfinite(source).all():
            problem = f"dtype {source.dtype}" if not source.is_floating_point() else "NaN or Inf values"
            raise ValueError(f"{path}: '{official_key}' holds {problem}; it is not a trained perturbation function.")
    model = MetaPerturbModel(config)
    with torch.no_grad():
        for official_key, (name, row) in OFFICIAL_KEYS.items():
            target = getattr(model, name)
            if row is not None:
                target = target[row : row + 1]
            target.copy_(state[official_key].reshape(target.shape))
    return model


# The authors' classifier keys -> ours (architectures.py); their φ is shared by every block and appears under each.
_RESNET_KEYS = ((r"conv1\.", "stem.0."), (r"bn1\.", "stem.1."), (r"(layer\d\.\d+\.)", r"\1"), (r"fc\.", "fc."))
_CONV_NET_KEYS = ((r"conv_layers\.(\d+)\.conv\.", r"features.\1.0."), (r"conv_layers\.(\d+)\.bn\.", r"features.\1.1."),
                  (r"fc\.", "classifier."))
_OFFICIAL_CLASSIFIERS = {"resnet20": _RESNET_KEYS, "resnet32": _RESNET_KEYS, "resnet44": _RESNET_KEYS,
                         "resnet56": _RESNET_KEYS, "conv4": _CONV_NET_KEYS, "conv6": _CONV_NET_KEYS}


def _our_key(key: str, rules) -> str | None:
    for pattern, replacement in rules:
        match = re.match(pattern, key)
        if match:
            return match.expand(replacement) + key[match.end():]
    return None


def convert_official_classifier(state_dict: Mapping[str, torch.Tensor], arch: str, num_classes: int) -> nn.Module:
    """Build this package's `arch` network holding the weights of an authors' classifier `state_dict`.

    `arch` is the authors' name (`resnet20`..`resnet56`, `conv4_32`, `conv6_64`, ...) or ours. ResNets get the
    authors' option-A shortcut, conv nets their convolution bias; the width, the input channels and (for conv nets)
    the image size are read off the weights. Their perturbation's entries (`perturb.*`) are left out: convert φ
    with `convert_official_checkpoint`. Loading is strict, so a key or shape that does not fit raises.
    """
    from .architectures import create_model  # not at import: `import metaperturb_hf` stays light

    name = re.sub(r"_\d+$", "", arch)
    if name not in _OFFICIAL_CLASSIFIERS:
        raise ValueError(f"No converter for the authors' {arch!r}; convertible: {', '.join(_OFFICIAL_CLASSIFIERS)}.")
    rules = _OFFICIAL_CLASSIFIERS[name]
    ours, unknown = {}, []
    for key, value in state_dict.items():
        if "perturb." in key:
            continue
        target = _our_key(key, rules)
        if target is None:
            unknown.append(key)
        else:
            ours[target] = value
    if unknown:
        raise ValueError(f"These keys are not part of the authors' {arch}: {sorted(unknown)[:8]}.")
    first_conv = ours.get("stem.0.weight", ours.get("features.0.0.weight"))
    head = ours.get("fc.weight", ours.get("classifier.weight"))
    if first_conv is None or head is None:
        raise ValueError(f"The state dict lacks the first convolution or the head of the authors' {arch}.")
    if head.shape[0] != num_classes:
        raise ValueError(f"The head has {head.shape[0]} outputs, not num_classes={num_classes}.")
    kwargs, image_size = {}, 32
    if name.startswith("conv"):
        width = first_conv.shape[0]
        final_size = math.isqrt(head.shape[1] // width)
        kwargs, image_size = {"width": width, "conv_bias": True}, final_size * 2**4
    model = create_model(name, num_classes, image_size=image_size, in_channels=first_conv.shape[1], **kwargs)
    model.load_state_dict(ours, strict=True)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="the authors' checkpoint (.pth)")
    parser.add_argument("output_dir", help="folder to write with save_pretrained")
    args = parser.parse_args(argv)
    try:
        model = convert_official_checkpoint(args.source)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(1, f"metaperturb-convert: error: {error}\nNothing was written to {args.output_dir}.\n")
    model.save_pretrained(args.output_dir)
    print(f"Wrote {sum(p.numel() for p in model.parameters())} parameters to {args.output_dir}")


if __name__ == "__main__":
    main()
