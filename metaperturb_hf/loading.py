"""One way to get a φ, wherever it is: a `save_pretrained` folder, a hub repo id, or the authors' `.pth`."""

import os
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .convert import convert_official_checkpoint
from .hub import WEIGHTS_NAME, local_file
from .modeling_metaperturb import MetaPerturbModel

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def load_perturbation(source: str | os.PathLike, *, revision: str | None = None,
                      token: str | None = None) -> MetaPerturbModel:
    """
    φ from a `save_pretrained` folder, a hub repo id (`revision`, `token` as in `from_pretrained`), or converted
    from the authors' `.pth` (`convert_official_checkpoint`, which runs no pickled code).

    Beyond what `MetaPerturbModel.from_pretrained` refuses (a config of another model type, missing, unexpected or
    NaN weights), weights stored as integers are refused too: transformers would convert them silently.
    """
    if str(source).endswith(".pth"):
        return convert_official_checkpoint(source)
    local_file(source, "config.json", revision=revision, token=token)  # a repo's files land in one snapshot folder
    weights = local_file(source, WEIGHTS_NAME, revision=revision, token=token)
    _refuse_integer_weights(weights)
    return MetaPerturbModel.from_pretrained(weights.parent)


def _refuse_integer_weights(weights: Path) -> None:
    try:
        with safe_open(weights, framework="pt") as file:
            stored = {name: file.get_slice(name).get_dtype() for name in file.keys()}
    except SafetensorError:
        return  # unreadable: from_pretrained reads it the same way and says which file and what to do
    if not_float := {name: dtype for name, dtype in stored.items() if dtype not in FLOAT_DTYPES}:
        raise ValueError(f"{weights} stores {not_float}; the weights of a perturbation function are floats.")


__all__ = ["load_perturbation"]
