"""Single-pass statistics fitted to the model's own Monte-Carlo prediction (docs/method.md, Noise at evaluation).

The matched statistics (`moment_matching`) give the single pass two moments per channel of what MC averages; MC's
prediction, the softmax averaged over noise draws, depends on more than those. `fit_single_pass_statistics` starts
from given statistics and fits, per norm layer and channel, a shift of the mean and a scale of the spread so that
the single pass's softmax matches MC's on training batches (cross-entropy to the MC-K softmax, Adam), with the
classifier and φ frozen. Where the noise leaves training images uncertain (ResNet-20 on Omniglot) the fit has
something to learn from; images the classifier has memorised give MC and the single pass the same answer and teach
it nothing, so `choose_single_pass_statistics` keeps the fitted statistics only where they agree more often with MC.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import torch

from .classifier_io import eval_mode, logits_of, model_inputs
from .modeling_metaperturb import NonFiniteFeaturesError
from .single_pass_statistics import SinglePassStatistics, running_norms

# Adam steps (one training batch each) and their learning rate: on ResNet-20 with Omniglot about two epochs of its
# 29 batches closed the single pass's gap to MC-10; far more steps fit the training images' noise instead.
FIT_STEPS = 60
FIT_LEARNING_RATE = 0.01


def fit_single_pass_statistics(model, batches: Iterable, start: SinglePassStatistics | None = None,
                               num_samples: int = 10, steps: int = FIT_STEPS,
                               learning_rate: float = FIT_LEARNING_RATE) -> SinglePassStatistics:
    r"""
    Statistics for the single pass of `model` (a `PerturbedModel` at its current κ) fitted to its MC-`num_samples`
    prediction on `batches`, one Adam step per batch, at most `steps` of them.

    Per norm layer and channel the single pass normalises with m = m₀ + δ·√(v₀ + ε) and
    √(v + ε) = √(v₀ + ε)·e^ρ, starting from `start`'s (m₀, v₀) (default: the classifier's own statistics,
    from training) at δ = ρ = 0. The batches take the kinds `calibrate_single_pass` takes; augmented training batches
    give softer targets than the images the classifier has memorised. Nothing of the model changes: the result is a new
    `SinglePassStatistics`.
    `NonFiniteFeaturesError` where the single pass overflows with the statistics it starts from.
    """
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}.")
    norms = running_norms(model.model)
    if not norms:
        raise ValueError(f"{type(model.model).__name__} has no BatchNorm layer with running statistics to fit.")
    # Both a store's entries and the norm layers themselves hold running_mean and running_var.
    sources = list(start.norms.values()) if start is not None else [norm for _, norm in norms]
    means = [source.running_mean.float() for source in sources]
    spreads = [(source.running_var.float() + norm.eps).sqrt()
               for source, (_, norm) in zip(sources, norms, strict=True)]
    shifts = [torch.zeros_like(mean, requires_grad=True) for mean in means]
    log_scales = [torch.zeros_like(mean, requires_grad=True) for mean in means]
    optimizer = torch.optim.Adam(shifts + log_scales, lr=learning_rate)
    device = means[0].device
    mode, used = model.noise_mode, 0
    try:
        with eval_mode(model), torch.enable_grad():  # callers may run under no_grad (choose_single_pass_statistics)
            for batch in batches:
                if used >= steps:
                    break
                args, kwargs = model_inputs(batch, device)
                with torch.no_grad():
                    model.noise_mode = "sample"
                    target = model.predict_proba(*args, num_samples=num_samples, **kwargs)
                model.noise_mode = "mean"
                with _differentiable_statistics(norms, means, spreads, shifts, log_scales):
                    log_probs = logits_of(model(*args, **kwargs)).float().log_softmax(-1)
                loss = -(target * log_probs).sum(-1).mean()
                if not torch.isfinite(loss):
                    raise NonFiniteFeaturesError("The single pass's loss against MC is NaN or Inf: its features "
                                                 "overflow with these statistics, which cannot be fitted.")
                optimizer.zero_grad()
                loss.backward(inputs=shifts + log_scales)
                optimizer.step()
                used += 1
    finally:
        model.noise_mode = mode
    if used == 0:
        raise ValueError("fit_single_pass_statistics got no batches: the data loader or iterable is empty.")
    fitted = SinglePassStatistics(norms, start.kappa if start is not None else model.noise_coeff).to(device)
    with torch.no_grad():
        for (_, norm), own, mean, spread, shift, log_scale in zip(norms, fitted.norms.values(), means, spreads, shifts,
                                                                   log_scales, strict=True):
            own.running_mean.copy_(mean + shift * spread)
            own.running_var.copy_((spread * log_scale.exp()) ** 2 - norm.eps)
            own.num_batches_tracked.fill_(used)
    return fitted


@contextmanager
def _differentiable_statistics(norms, means, spreads, shifts, log_scales):
    """Let every norm layer normalise with m₀ + δ·s₀ and s₀·e^ρ (differentiable in δ and ρ, which running
    statistics in `F.batch_norm` are not) for the duration."""
    def hook_for(mean, spread, shift, log_scale):
        def normalise(norm, inputs, output):
            x = inputs[0]
            shape = (1, -1) + (1,) * (x.dim() - 2)
            centre = (mean + shift * spread).to(x.dtype).view(shape)
            scale = (spread * log_scale.exp()).to(x.dtype).view(shape)
            normalised = (x - centre) / scale
            return normalised * norm.weight.view(shape) + norm.bias.view(shape) if norm.affine else normalised
        return normalise

    handles = [norm.register_forward_hook(hook_for(*parameters))
               for (_, norm), *parameters in zip(norms, means, spreads, shifts, log_scales, strict=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
