"""Calling any image classifier the same way: plain modules take images positionally and return logits,
`transformers` ones take `pixel_values=` and return an output with `.logits`."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

# Most images in one forward pass when a batch is repeated for its noise draws. Stacking saves the per-pass overhead
# of small batches, but on CPU a pass of more images than this is slower than separate ones: MC-5 over a batch of 128
# cost 4.5× MC-1 as five passes, 5.5× stacked two by two and 8.5× stacked five-fold (ResNet-20 and Conv4, fused φ).
MAX_REPEATED_BATCH = 128


def logits_of(output) -> torch.Tensor:
    """Logits from a plain classifier (a tensor) or a `transformers` one (an output with `.logits`)."""
    return output.logits if hasattr(output, "logits") else output


def input_name_for(model: nn.Module, input_name: str | None = None) -> str | None:
    """`pixel_values` for `transformers` classifiers, also inside our wrappers (`.model`); positional otherwise."""
    if input_name is not None:
        return input_name
    config = getattr(model, "config", None) or getattr(getattr(model, "model", None), "config", None)
    return "pixel_values" if hasattr(config, "num_labels") else None


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then every submodule's own train/eval flag back: they may differ (a BatchNorm
    kept in eval mode while the rest trains), and `model.train(mode)` would set them all alike."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def repeat_chunks(batch_size: int, draws: int) -> Iterator[int]:
    """How many copies of a batch to stack in each forward pass so that `draws` copies run in all.

    In eval mode every layer uses running statistics, so copies side by side in one batch are independent draws;
    small batches are stacked up to `MAX_REPEATED_BATCH` images per pass, larger ones run one pass per draw.
    """
    per_pass = max(1, min(draws, MAX_REPEATED_BATCH // max(batch_size, 1)))
    remaining = draws
    while remaining > 0:
        copies = min(per_pass, remaining)
        yield copies
        remaining -= copies


def classifier_logits(model: nn.Module, images: torch.Tensor, input_name: str | None = None) -> torch.Tensor:
    """Run `model` on a batch of images and return its logits."""
    input_name = input_name_for(model, input_name)
    return logits_of(model(**{input_name: images}) if input_name else model(images))


def model_inputs(batch, device) -> tuple[tuple, dict]:
    """Positional and keyword inputs for one calibration batch, on `device`."""
    if isinstance(batch, dict):
        return (), {k: _to(v, device) for k, v in batch.items() if k not in ("labels", "label")}
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("A calibration batch is an empty tuple or list; expected (images, labels, ...).")
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(
            f"A calibration batch must be an image tensor, an (images, labels, ...) tuple or a dict of model inputs, "
            f"got {type(batch).__name__}."
        )
    return (_to(batch, device),), {}


def _to(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value
