"""Calling any image classifier the same way: plain modules take images positionally and return logits,
`transformers` ones take `pixel_values=` and return an output with `.logits`."""

import torch
from torch import nn


def logits_of(output) -> torch.Tensor:
    """Logits from a plain classifier (a tensor) or a `transformers` one (an output with `.logits`)."""
    return output.logits if hasattr(output, "logits") else output


def input_name_for(model: nn.Module, input_name: str | None = None) -> str | None:
    """`pixel_values` for `transformers` classifiers, also inside our wrappers (`.model`); positional otherwise."""
    if input_name is not None:
        return input_name
    config = getattr(model, "config", None) or getattr(getattr(model, "model", None), "config", None)
    return "pixel_values" if hasattr(config, "num_labels") else None


def classifier_logits(model: nn.Module, images: torch.Tensor, input_name: str | None = None) -> torch.Tensor:
    """Run `model` on a batch of images and return its logits."""
    input_name = input_name_for(model, input_name)
    return logits_of(model(**{input_name: images}) if input_name else model(images))
