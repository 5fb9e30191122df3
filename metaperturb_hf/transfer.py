"""Training a target classifier with a frozen φ: our own loop, and a `transformers.Trainer` callback.

Protocol (docs/protocols.md): Adam (lr 1e-3, weight decay 5e-4), learning rate × 0.3 at 40 %, 70 % and 90 % of the
steps, noise coefficient κ growing linearly from 0 to 1 over the first 40 % of the steps (to `noise_strength` when
that is below 1: a weaker perturbation for networks it over-regularizes; by default the one φ's config records),
augmentation as in meta-training.
The same loop trains the baselines: anything with a `training_loss(images, labels)` (the regularizers) or a plain
classifier (cross-entropy on its logits).
"""

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import TrainerCallback

from .classifier_io import classifier_logits
from .configuration_metaperturb import check_noise_strength
from .data import BatchSampler, ImageTensors


@dataclass
class TransferConfig:
    """The authors' transfer schedule; `steps` is the one number to size per experiment."""

    steps: int = 1500
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 5e-4
    decay_at: tuple[float, ...] = (0.4, 0.7, 0.9)
    decay_factor: float = 0.3
    anneal_fraction: float = 0.4
    # The κ reached after annealing; below 1 mixes the identity into the perturbation. None: φ's own (its config's).
    noise_strength: float | None = None
    seed: int = 0
    augment: bool = True
    log_every: int = 50
    input_name: str | None = None  # detected: "pixel_values" for transformers classifiers

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be at least 1, got {self.steps} and {self.batch_size}.")
        if not 0.0 < self.anneal_fraction <= 1.0:
            raise ValueError(f"anneal_fraction must lie in (0, 1], got {self.anneal_fraction}.")
        check_noise_strength(self.noise_strength)


def resolve_noise_strength(model: nn.Module, noise_strength: float | None) -> float:
    """The κ to anneal `model`'s perturbation to: the one asked for, else the one its φ was released with."""
    if noise_strength is not None:
        return noise_strength
    perturbation = getattr(model, "perturbation", None)
    return perturbation.config.noise_strength if perturbation is not None else 1.0


def noise_coeff_at(step: int, total_steps: int, anneal_fraction: float = 0.4, noise_strength: float = 1.0) -> float:
    """κ at `step`: linear from 0 to `noise_strength` over the first `anneal_fraction` of the steps, then that."""
    return noise_strength * min(1.0, step / max(1.0, anneal_fraction * total_steps))


def learning_rate_factor(step: int, total_steps: int, decay_at=(0.4, 0.7, 0.9), factor: float = 0.3) -> float:
    """The step schedule: × `factor` at each fraction in `decay_at`."""
    return factor ** sum(step >= point * total_steps for point in decay_at)


def training_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, input_name: str | None = None):
    """The regularizer's own loss when it has one, else cross-entropy of the logits."""
    if hasattr(model, "training_loss"):
        return model.training_loss(images, labels)
    return F.cross_entropy(classifier_logits(model, images, input_name), labels)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Everything that learns; φ is frozen (requires_grad False) and so left out."""
    return [p for p in model.parameters() if p.requires_grad]


def train_classifier(model: nn.Module, train: ImageTensors, config: TransferConfig, device=None,
                     progress: bool = True) -> dict:
    """Train `model` (plain, perturbed or regularized) on `train` with the transfer schedule; return a history."""
    device = torch.device(device or next(model.parameters()).device)
    model.to(device)
    num_classes = len(train.class_names)
    if int(train.labels.max()) >= num_classes:
        raise ValueError(f"Labels go up to {int(train.labels.max())} but the data names {num_classes} classes.")
    torch.manual_seed(config.seed)
    batches = BatchSampler(train.to(device), seed=config.seed)
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=config.learning_rate,
                                 weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, config.steps, config.decay_at, config.decay_factor)
    )
    noise_strength = resolve_noise_strength(model, config.noise_strength)
    history, started = [], time.time()
    model.train()
    bar = tqdm(range(config.steps), disable=not progress, desc="transfer", leave=False)
    for step in bar:
        if hasattr(model, "set_noise_coeff"):
            model.set_noise_coeff(noise_coeff_at(step, config.steps, config.anneal_fraction, noise_strength))
        images, labels = batches.next_batch(config.batch_size, augment=config.augment)
        loss = training_loss(model, images, labels, config.input_name)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"The training loss became {loss.item()} at step {step}; "
                                     "lower the learning rate.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            history.append({"step": step + 1, "loss": loss.item(), "lr": schedule.get_last_lr()[0]})
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return {"history": history, "train_seconds": time.time() - started, "noise_strength": noise_strength}


class MetaPerturbCallback(TrainerCallback):
    r"""
    Anneals κ of a `PerturbedModel` trained with `transformers.Trainer`: linear from 0 to `noise_strength` (1: the
    full perturbation; None: the one φ's config records) over the first `anneal_fraction` of `max_steps`.

    ```python
    model = add_perturbation(ResNetForImageClassification(config), phi)
    trainer = Trainer(model=model, args=TrainingArguments(..., remove_unused_columns=False),
                      train_dataset=train, callbacks=[MetaPerturbCallback()])
    ```
    """

    def __init__(self, anneal_fraction: float = 0.4, noise_strength: float | None = None):
        check_noise_strength(noise_strength)
        self.anneal_fraction = anneal_fraction
        self.noise_strength = noise_strength

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        target = _find_perturbed(model)
        if target is None:
            raise ValueError(
                "MetaPerturbCallback found no perturbed model in the Trainer; wrap it with add_perturbation first."
            )
        strength = resolve_noise_strength(target, self.noise_strength)
        target.set_noise_coeff(noise_coeff_at(state.global_step, state.max_steps, self.anneal_fraction, strength))


def _find_perturbed(model: nn.Module | None):
    """The PerturbedModel itself, or one inside a wrapper (DDP, accelerate) that the Trainer hands over."""
    if model is None:
        return None
    return next((module for module in model.modules() if hasattr(module, "set_noise_coeff")), None)
