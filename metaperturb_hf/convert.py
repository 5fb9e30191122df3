"""Convert the authors' released MetaPerturb checkpoint (`.pth`) into a `MetaPerturbModel`.

    python -m metaperturb_hf.convert official_tin_resnet20_perturb_750.pth ./metaperturb-tin-resnet20

The checkpoint is read with `torch.load(..., weights_only=True)`, so no pickled code is ever executed.
"""

import argparse
import os
import pickle

import torch

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
