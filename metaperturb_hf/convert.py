"""Convert the authors' released MetaPerturb checkpoint (`.pth`) into a `MetaPerturbModel`.

    python -m metaperturb_hf.convert official_tin_resnet20_perturb_750.pth ./metaperturb-tin-resnet20

The checkpoint is read with `torch.load(..., weights_only=True)`, so no pickled code is ever executed.
"""

import argparse
import os
import pickle

import torch

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
            f"{path} is not a plain tensor checkpoint that can be read safely (weights_only=True): {error}"
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


def convert_official_checkpoint(path: str | os.PathLike, config: MetaPerturbConfig | None = None) -> MetaPerturbModel:
    """Build a `MetaPerturbModel` holding the weights of the authors' checkpoint at `path`."""
    state = load_official_state_dict(path)
    model = MetaPerturbModel(config or MetaPerturbConfig())
    with torch.no_grad():
        for official_key, (name, row) in OFFICIAL_KEYS.items():
            target = getattr(model, name)
            if row is not None:
                target = target[row : row + 1]
            source = state[official_key]
            if source.numel() != target.numel():
                raise ValueError(
                    f"{path}: '{official_key}' has shape {tuple(source.shape)}, which does not fit '{name}' "
                    f"of shape {tuple(target.shape)}; the checkpoint and the config disagree."
                )
            target.copy_(source.reshape(target.shape))
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="the authors' checkpoint (.pth)")
    parser.add_argument("output_dir", help="folder to write with save_pretrained")
    args = parser.parse_args(argv)
    model = convert_official_checkpoint(args.source)
    model.save_pretrained(args.output_dir)
    print(f"Wrote {sum(p.numel() for p in model.parameters())} parameters to {args.output_dir}")


if __name__ == "__main__":
    main()
