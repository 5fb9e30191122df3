"""Accuracy, calibration and adversarial robustness of (perturbed) image classifiers (docs/protocols.md).

A `PerturbedModel` is stochastic: in "sample" noise mode every forward pass draws fresh noise, so its predictive
distribution is the softmax averaged over K draws (the authors keep the noise on at test time, K = 100 for the
final number) and an attack must average its gradient over draws too (Expectation over Transformation, EoT),
or it attacks one random draw instead of the model. Everything else (plain classifiers, `transformers`
`*ForImageClassification`, a `PerturbedModel` in "mean" mode) is deterministic in eval mode and gets one pass.

In eval mode every layer uses running statistics, so the K draws of one image are independent whether they run
in K passes or side by side in one batch; small batches are therefore repeated along dim 0, at most
`MAX_REPEATED_BATCH` images per forward pass (`classifier_io.repeat_chunks`), larger ones take one pass per draw.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .classifier_io import MAX_REPEATED_BATCH, classifier_logits, eval_mode, input_name_for, repeat_chunks
from .data import ImageTensors, normalize
from .injection import PerturbedModel
from .modeling_metaperturb import NonFiniteFeaturesError

# Rows of `probs` must sum to 1 within this tolerance (float32 softmax of many classes drifts by ~1e-6).
PROBABILITY_SUM_TOLERANCE = 1e-3
# log is clamped here so that a probability of exactly 0 gives a large, finite NLL.
MIN_PROBABILITY = 1e-12


# ---------------------------------------------------------------------------------------------
# Calling a model


def _classifier(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, PerturbedModel) else model


def _logits(model: nn.Module, images: torch.Tensor, input_name: str | None) -> torch.Tensor:
    logits = classifier_logits(model, images, input_name)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise TypeError(
            f"{type(_classifier(model)).__name__} must return logits of shape (batch, classes) or an output with "
            f".logits, got {type(logits).__name__}."
        )
    return logits


def _num_draws(model: nn.Module, num_samples: int) -> int:
    """How many forward passes a prediction needs: `num_samples` for sampled noise, else one."""
    _check_num_samples(num_samples)
    if not isinstance(model, PerturbedModel) or model.noise_coeff == 0.0 or model.noise_mode == "mean":
        return 1
    return num_samples


def _mode_name(model: nn.Module) -> str:
    """What `evaluate` reports: how the prediction was made (see its docstring)."""
    if not isinstance(model, PerturbedModel) or model.noise_coeff == 0.0:
        return "deterministic"
    return "single_pass" if model.noise_mode == "mean" else "mc"


def _repeated_logits(model: nn.Module, images: torch.Tensor, copies: int, input_name: str | None) -> torch.Tensor:
    """Logits of `copies` independent passes over `images`, shape (copies, batch, classes)."""
    stacked = images.repeat(copies, *([1] * (images.dim() - 1))) if copies > 1 else images
    logits = _logits(model, stacked, input_name)
    return logits.reshape(copies, len(images), -1)


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else fallback


# ---------------------------------------------------------------------------------------------
# Predictions


def _predict(model: nn.Module, batches: Iterable[torch.Tensor], num_samples: int, input_name: str | None):
    """Softmax probabilities of every batch, concatenated; a `PerturbedModel` averages them over its noise draws
    (`PerturbedModel.predict_proba`, the one Monte-Carlo path)."""
    draws = _num_draws(model, num_samples)
    input_name = input_name_for(model, input_name)
    outputs = []
    with eval_mode(model), torch.no_grad():
        for batch in batches:
            images = batch.to(_model_device(model, batch.device))
            if isinstance(model, PerturbedModel):
                inputs = ({input_name: images}, ()) if input_name else ({}, (images,))
                probs = model.predict_proba(*inputs[1], num_samples=draws, **inputs[0])
            else:
                probs = _logits(model, images, input_name).float().softmax(-1)
            outputs.append(probs.to(batch.device))
    if not outputs:
        raise ValueError("No images to predict: the input is empty.")
    probs = torch.cat(outputs)
    if not torch.isfinite(probs).all():  # an accuracy from NaN probabilities would be a silent, meaningless number
        raise NonFiniteFeaturesError("The model's probabilities hold NaN or Inf: its features overflowed on the way "
                                     "to the logits (a diverged network, or a perturbation that blows them up).")
    return probs


def predict_proba(
    model: nn.Module,
    images_float: torch.Tensor,
    num_samples: int = 1,
    batch_size: int = 256,
    input_name: str | None = None,
) -> torch.Tensor:
    r"""
    Softmax probabilities `(N, classes)` of normalised images, in eval mode, `batch_size` images at a time.

    A `PerturbedModel` in "sample" noise mode averages the softmax over `num_samples` noise draws (its predictive
    distribution); in "mean" mode, with κ = 0, or for any other model one pass is exact and `num_samples` is
    ignored. `input_name` is the keyword to pass the images under (e.g. "pixel_values"); by default models with a
    `transformers` config get `pixel_values=`, others a positional tensor. The model's train/eval flags are
    restored afterwards.
    """
    _check_images(images_float)
    _check_batch_size(batch_size)
    return _predict(model, images_float.split(batch_size), num_samples, input_name)


# ---------------------------------------------------------------------------------------------
# Metrics


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> float:
    r"""
    Expected calibration error: Σ_b (|b| / N) · |accuracy(b) − confidence(b)|.

    The confidence of a prediction is its largest probability; bins split (0, 1] into `num_bins` equal-width
    intervals (lower, upper], the convention of Guo et al. (2017) and of the MetaPerturb paper.
    """
    _check_probs(probs, labels)
    if num_bins < 1:
        raise ValueError(f"num_bins must be at least 1, got {num_bins}.")
    probs, labels = probs.detach().double().cpu(), labels.detach().cpu()
    confidence, prediction = probs.max(dim=1)
    correct = (prediction == labels).double()
    inner_edges = torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64)[1:-1]
    bins = torch.bucketize(confidence, inner_edges)  # bin i holds edges[i] < confidence <= edges[i + 1]
    counts = torch.bincount(bins, minlength=num_bins).double()
    gap = torch.bincount(bins, weights=correct - confidence, minlength=num_bins)
    return float(gap.abs().sum() / counts.sum())


def negative_log_likelihood(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean −log p(label); the log is clamped at `MIN_PROBABILITY` so a confident mistake stays finite."""
    _check_probs(probs, labels)
    picked = probs.detach().double().cpu().gather(1, labels.detach().cpu().long()[:, None])
    return float(-picked.clamp(min=MIN_PROBABILITY).log().mean())


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose most probable class is the label."""
    _check_labels(labels, len(probs), probs.shape[-1])
    return float((probs.argmax(dim=1).cpu() == labels.cpu()).double().mean())


def normalized_batches(tensors: ImageTensors, batch_size: int, mean=0.5, std=0.5) -> Iterator[torch.Tensor]:
    """Normalise one batch at a time, so float copies of a whole dataset are never held."""
    for images in tensors.images.split(batch_size):
        yield normalize(images, mean, std)


def evaluate(
    model: nn.Module,
    tensors: ImageTensors,
    num_samples: int = 1,
    batch_size: int = 256,
    mean=0.5,
    std=0.5,
    input_name: str | None = None,
) -> dict:
    r"""
    Accuracy, NLL and ECE of `model` on uint8 `tensors`, normalised with `mean`/`std` as in training.

    Returns `{"accuracy", "nll", "ece", "num_samples", "mode", "n"}`: `mode` is "mc" (softmax averaged over
    `num_samples` noise draws), "single_pass" (a `PerturbedModel` in "mean" noise mode) or "deterministic"
    (a model without noise); `num_samples` is the number of passes actually averaged.
    """
    _check_tensors(tensors)
    _check_batch_size(batch_size)
    probs = _predict(model, normalized_batches(tensors, batch_size, mean, std), num_samples, input_name)
    labels = tensors.labels.cpu()
    return {
        "accuracy": accuracy(probs, labels),
        "nll": negative_log_likelihood(probs, labels),
        "ece": expected_calibration_error(probs, labels),
        "num_samples": _num_draws(model, num_samples),
        "mode": _mode_name(model),
        "n": len(labels),
    }


# ---------------------------------------------------------------------------------------------
# Adversarial robustness


def _per_channel(value, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A scalar or per-channel value shaped to broadcast over (N, C, H, W)."""
    return torch.as_tensor(value, dtype=dtype, device=device).view(1, -1, 1, 1)


def _eot_gradient(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, draws: int, input_name: str | None
) -> torch.Tensor:
    """Gradient of the cross-entropy w.r.t. `images`, averaged over `draws` noise draws (EoT)."""
    images = images.detach().requires_grad_(True)
    gradient = torch.zeros_like(images)
    for copies in repeat_chunks(len(images), draws):
        logits = _repeated_logits(model, images, copies, input_name)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.repeat(copies), reduction="sum") / draws
        gradient += torch.autograd.grad(loss, images)[0]
    return gradient


def _attack_batch(model, images, labels, epsilon, step_size, low, high, steps, draws, input_name, generator):
    """L∞ PGD on one batch: random start in the ε-ball, `steps` signed-gradient ascent steps, projected."""
    lower, upper = torch.maximum(images - epsilon, low), torch.minimum(images + epsilon, high)
    noise = torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    adversarial = torch.minimum(torch.maximum(images + (2 * noise - 1) * epsilon, lower), upper)
    for _ in range(steps):
        gradient = _eot_gradient(model, adversarial, labels, draws, input_name)
        adversarial = torch.minimum(torch.maximum(adversarial + step_size * gradient.sign(), lower), upper)
    return adversarial.detach()


def pgd_attack(
    model: nn.Module,
    images_float: torch.Tensor,
    labels: torch.Tensor,
    epsilon: float,
    steps: int = 10,
    step_size: float | None = None,
    eot_samples: int = 1,
    input_name: str | None = None,
    mean=0.5,
    std=0.5,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""
    Untargeted L∞ PGD (Madry et al., 2018) with a random start, on images normalised as `(x − mean) / std`.

    `epsilon` and `step_size` are in pixel units, i.e. fractions of the [0, 1] intensity range (8/255 is the
    usual budget); they are divided by `std` (per channel when `std` is) to act on the normalised inputs, and
    every iterate stays in the valid normalised range [(0 − mean)/std, (1 − mean)/std]. `step_size` defaults to
    2.5·ε/steps. For a stochastic model every step follows the cross-entropy gradient averaged over
    `eot_samples` noise draws (Expectation over Transformation, docs/protocols.md); a deterministic model takes one.
    The model runs in eval mode and its flags are restored; returns the adversarial images, detached, on the
    device of `images_float`. `generator` (on the model's device) seeds the random start.
    """
    _check_images(images_float)
    _check_batch_size(batch_size)
    if len(labels) != len(images_float):
        raise ValueError(f"Got {len(images_float)} images but {len(labels)} labels.")
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0 (pixel units, e.g. 8/255), got {epsilon}.")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    if eot_samples < 1:
        raise ValueError(f"eot_samples must be at least 1, got {eot_samples}.")
    step_size = 2.5 * epsilon / steps if step_size is None else step_size
    draws = _num_draws(model, eot_samples)
    input_name = input_name_for(model, input_name)
    device = _model_device(model, images_float.device)
    std_tensor = _per_channel(std, images_float.dtype, device)
    mean_tensor = _per_channel(mean, images_float.dtype, device)
    low, high = (0 - mean_tensor) / std_tensor, (1 - mean_tensor) / std_tensor
    eps, step = epsilon / std_tensor, step_size / std_tensor

    outputs = []
    with eval_mode(model), torch.enable_grad():
        for images, batch_labels in zip(images_float.split(batch_size), labels.split(batch_size)):
            images, batch_labels = images.to(device), batch_labels.to(device).long()
            _check_labels(batch_labels, len(images), _num_classes(model, images[:1], input_name))
            adversarial = _attack_batch(
                model, images, batch_labels, eps, step, low, high, steps, draws, input_name, generator
            )
            outputs.append(adversarial.to(images_float.device))
    return torch.cat(outputs)


def _num_classes(model: nn.Module, example: torch.Tensor, input_name: str | None) -> int:
    with torch.no_grad():
        return _logits(model, example, input_name).shape[-1]


def robust_accuracy(
    model: nn.Module,
    tensors: ImageTensors,
    epsilon: float,
    steps: int = 10,
    eot_samples: int = 1,
    num_samples: int = 1,
    step_size: float | None = None,
    batch_size: int = 256,
    mean=0.5,
    std=0.5,
    input_name: str | None = None,
    generator: torch.Generator | None = None,
) -> float:
    """Accuracy on PGD examples (`pgd_attack`), predicted as in `evaluate` (MC over `num_samples` draws)."""
    _check_tensors(tensors)
    _check_batch_size(batch_size)
    _check_num_samples(num_samples)
    correct = 0
    for images, labels in zip(tensors.images.split(batch_size), tensors.labels.split(batch_size)):
        adversarial = pgd_attack(
            model, normalize(images, mean, std), labels, epsilon, steps=steps, step_size=step_size,
            eot_samples=eot_samples, input_name=input_name, mean=mean, std=std, generator=generator,
        )
        probs = predict_proba(model, adversarial, num_samples, batch_size, input_name)
        correct += int((probs.argmax(dim=1).cpu() == labels.cpu()).sum())
    return correct / len(tensors)


# ---------------------------------------------------------------------------------------------
# Checks


def _check_num_samples(num_samples: int) -> None:
    if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1 (noise draws to average), got {num_samples}.")


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError(
            "images_float must be a float tensor of normalised images; convert uint8 images with "
            "metaperturb_hf.data.normalize(images, mean, std)."
        )
    if len(images) == 0:
        raise ValueError("No images: the input is empty.")


def _check_tensors(tensors: ImageTensors) -> None:
    if len(tensors) == 0:
        raise ValueError("No images to evaluate: the ImageTensors is empty.")
    if len(tensors.images) != len(tensors.labels):
        raise ValueError(f"ImageTensors has {len(tensors.images)} images but {len(tensors.labels)} labels.")


def _check_labels(labels: torch.Tensor, num_rows: int, num_classes: int) -> None:
    if labels.dim() != 1 or len(labels) != num_rows:
        raise ValueError(f"labels must have shape ({num_rows},), got {tuple(labels.shape)}.")
    if labels.is_floating_point():
        raise TypeError(f"labels must be integer class ids, got {labels.dtype}.")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes - 1}] for a model with {num_classes} outputs, got labels in "
            f"[{low}, {high}]; does the classifier head match the dataset's number of classes?"
        )


def _check_probs(probs: torch.Tensor, labels: torch.Tensor) -> None:
    if probs.dim() != 2 or len(probs) == 0:
        raise ValueError(f"probs must have shape (N, classes) with N >= 1, got {tuple(probs.shape)}.")
    _check_labels(labels, len(probs), probs.shape[1])
    sums = probs.detach().double().sum(dim=1)
    worst = float(sums[(sums - 1).abs().argmax()])
    if abs(worst - 1) > PROBABILITY_SUM_TOLERANCE or float(probs.min()) < 0:
        raise ValueError(
            f"probs must be probabilities (non-negative rows that sum to 1), but a row sums to {worst:.4g} or holds "
            "a negative value; pass softmax outputs (e.g. from predict_proba), not logits."
        )


__all__ = [
    "MAX_REPEATED_BATCH",
    "accuracy",
    "evaluate",
    "expected_calibration_error",
    "negative_log_likelihood",
    "pgd_attack",
    "predict_proba",
    "robust_accuracy",
]
