"""Saving the classifier inside a perturbed model, and building it again, whatever kind of module it is.

- a `transformers` model: through its own `save_pretrained` (`config.json` + `model.safetensors`), back through
  `AutoModelForImageClassification` (which refuses remote code unless told otherwise);
- a reference network (`architectures.create_model`): its weights plus the `create_model` arguments it was built
  with, so it is rebuilt without help;
- any other `nn.Module`: its weights and its class name; loading needs the module, built by the caller, to load
  them into (as `PeftModel.from_pretrained` needs the base model).

Given a module, loading fills it with the saved weights whatever kind it is; they must fit exactly.
"""

import json
from pathlib import Path

from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoModelForImageClassification, PreTrainedModel

CLASSIFIER_CONFIG_NAME = "classifier.json"
WEIGHTS_NAME = "model.safetensors"
TRANSFORMERS_CONFIG_NAME = "config.json"


def save_classifier(model: nn.Module, directory: Path) -> None:
    """Write `model` into `directory` so that `load_classifier` can build it again."""
    record_file = directory / CLASSIFIER_CONFIG_NAME
    if isinstance(model, PreTrainedModel):
        model.save_pretrained(directory)
        record_file.unlink(missing_ok=True)  # an earlier save of a plain module into the same folder
        return
    recipe = getattr(model, "create_model_args", None)  # set by create_model: the arguments that build it again
    record = ({"kind": "create_model", "create_model": recipe} if recipe is not None
              else {"kind": "module", "class": f"{type(model).__module__}.{type(model).__qualname__}"})
    try:
        text = json.dumps(record, indent=2)
    except TypeError as error:
        raise TypeError(f"The create_model arguments of this {type(model).__name__} are not JSON ({error}): "
                        f"{recipe!r}.") from error
    save_model(model, str(directory / WEIGHTS_NAME))
    record_file.write_text(text + "\n")


def load_classifier(directory: Path, model: nn.Module | None = None) -> nn.Module:
    """The classifier `save_classifier` wrote: built from what was saved, or `model` filled with the saved weights."""
    record_file = directory / CLASSIFIER_CONFIG_NAME
    if record_file.is_file():
        try:
            record = json.loads(record_file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{record_file} is not valid JSON ({error}).") from error
        if model is None:
            model = _rebuild(record, directory)
    elif not (directory / TRANSFORMERS_CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{directory} holds no saved classifier ({CLASSIFIER_CONFIG_NAME} or "
                                f"{TRANSFORMERS_CONFIG_NAME}).")
    elif model is None:
        return AutoModelForImageClassification.from_pretrained(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found (a sharded classifier loads only with model=None).")
    try:
        load_model(model, str(weights), strict=True)
    except RuntimeError as error:
        raise ValueError(f"The classifier saved in {directory} does not fit the given {type(model).__name__}: "
                         f"{error}") from error
    return model


def _rebuild(record: dict, directory: Path) -> nn.Module:
    if record.get("kind") == "create_model":
        from .architectures import create_model  # not at import: `import metaperturb_hf` stays light

        return create_model(**record["create_model"])
    if record.get("kind") == "module":
        raise TypeError(
            f"The classifier in {directory} is a {record['class']}, which cannot be rebuilt from the folder alone: "
            "build it as it was built before saving and pass it, from_pretrained(path, model=classifier); the "
            "saved weights are loaded into it."
        )
    raise ValueError(f"{directory / CLASSIFIER_CONFIG_NAME} has an unknown kind {record.get('kind')!r}.")
