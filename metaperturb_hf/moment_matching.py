"""Single-pass statistics that match the moments of the noise-averaged features (docs/method.md, Evaluation modes).

MC prediction averages over noise; the single pass runs once with the expected noise. At every norm layer the
stochastic model normalises its noisy input x with the statistics from training (m, v), which hold the variance the
noise added; the quantity MC averages is therefore, per image, E_noise[(x − m) / √v]. Its mean and spread over the
data are what the layers after the norm were trained to see, once the noise is averaged out. The single pass feeds
the norm another input x_sp (the expected noise, propagated through non-linear layers, is not the expected
feature), so neither the statistics from training (right only if x_sp were E_noise[x]) nor statistics re-estimated
under the single pass (which give unit spread, more than the noise-averaged features have) suit it in general.

`match_single_pass_statistics` chooses, per norm layer and channel, the statistics (m', v') with which the single
pass's normalised features have the mean and variance over the data of the noise-averaged ones:

    (x_sp − m') / √(v' + ε) = r · (x_sp − μ_sp) / √(σ²_sp + ε) + d,
    r = σ̄ / √(v + ε),   d = (μ̄ − m) / √(v + ε),

where μ̄, σ̄² are the mean and variance over the data of E_noise[x] (K draws per image, the variance debiased by
the spread between draws / K) and μ_sp, σ²_sp those of x_sp. Layers are matched in one pass, in forward order, as
`torch.optim.swa_utils.update_bn` estimates statistics: each norm normalises its batch, maps it to the target
moments, and the layers after it see what they will see at test time. If the single pass were exact
(x_sp = E_noise[x]), the result would be the statistics from training.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn

from .classifier_io import eval_mode, model_inputs
from .single_pass_statistics import SinglePassStatistics, running_norms
from .sites import unique_keys

# The debiased variance of the noise-averaged features is kept at least this fraction of their raw variance, so
# that a channel whose spread is mostly noise gets a small, positive target rather than a negative one.
MIN_VARIANCE_FRACTION = 1e-3
# r is kept at least this: a channel that is constant over the data (a dead filter) gets a finite, very wide v'
# that maps the single pass onto the constant, not an infinite one.
MIN_SPREAD = 1e-6


def _channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sum and sum of squares over every dimension but the channels (dim 1), and the count they cover."""
    dims = [d for d in range(x.dim()) if d != 1]
    return x.sum(dims), (x * x).sum(dims), x.numel() // x.shape[1]


class _DrawAveragedMoments:
    """Per norm layer and channel: the mean and variance over the data of an input averaged over `num_samples`
    passes of the same batch (E_noise[x] for noise draws; x itself for one deterministic pass)."""

    def __init__(self, num_samples: int):
        self.num_samples = num_samples
        self.draws: dict[str, list[torch.Tensor]] = {}  # per layer: Σ x and Σ x² over this batch's passes
        self.totals: dict[str, list] = {}

    def record(self, key: str):
        def hook(module, args):
            x = args[0].detach().double()
            sums = self.draws.get(key)
            self.draws[key] = [x, x * x] if sums is None else [sums[0] + x, sums[1] + x * x]

        return hook

    def finish_batch(self) -> None:
        """Reduce this batch's passes to per-image means and the spread between them."""
        k = self.num_samples
        for key, (total, squares) in self.draws.items():
            mean_over_draws = total / k
            between_draws = ((squares - total * mean_over_draws) / max(k - 1, 1)).clamp(min=0.0)
            parts = [*_channel_moments(mean_over_draws), _channel_moments(between_draws)[0]]
            previous = self.totals.get(key)
            self.totals[key] = parts if previous is None else [a + b for a, b in zip(previous, parts)]
        self.draws.clear()

    def moments(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance over the data; the variance less what the finite number of draws adds to it."""
        total, squares, count, between_draws = self.totals[key]
        mean = total / count
        raw_variance = (squares / count - mean * mean).clamp(min=0.0)
        variance = raw_variance - between_draws / count / self.num_samples
        return mean, torch.maximum(variance, MIN_VARIANCE_FRACTION * raw_variance)


def _target_map(norm: nn.Module, mean: torch.Tensor, variance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """r and d (module docstring): the spread and offset, in units of the training statistics, of the
    noise-averaged normalised features."""
    scale = (norm.running_var.double() + norm.eps).sqrt()
    return (variance.sqrt() / scale).clamp(min=MIN_SPREAD), (mean - norm.running_mean.double()) / scale


def _reshape(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value.to(like.dtype).view(1, -1, *([1] * (like.dim() - 2)))


def _mapped_output(r: torch.Tensor, d: torch.Tensor):
    """Forward hook: batch-normalised output → r · normalised + d, before the norm's affine part."""

    def hook(module, args, output):
        weight = module.weight if module.weight is not None else torch.ones_like(r)
        bias = module.bias if module.bias is not None else torch.zeros_like(r)
        weight, bias = _reshape(weight, output), _reshape(bias, output)
        return _reshape(r, output) * (output - bias) + bias + weight * _reshape(d, output)

    return hook


def _matched_statistics(mean_sp, variance_sp, eps: float, r: torch.Tensor, d: torch.Tensor):
    """(m', v') from the single pass's own moments (μ_sp, σ²_sp) and the target map (r, d)."""
    spread = (variance_sp + eps).sqrt() / r
    return mean_sp - d * spread, (spread * spread - eps).clamp(min=0.0)


def _moments_over(model, norms, keys, batches, device, passes: int, hooks=()) -> _DrawAveragedMoments:
    """Run `passes` forwards per batch (the model as it is set) and gather the norms' input moments."""
    moments = _DrawAveragedMoments(passes)
    handles = [norm.register_forward_pre_hook(moments.record(key)) for key, (_, norm) in zip(keys, norms)]
    handles += [norm.register_forward_hook(hook) for (_, norm), hook in zip(norms, hooks)]
    try:
        for batch in batches:
            args, kwargs = model_inputs(batch, device)
            for _ in range(passes):
                model.model(*args, **kwargs)
            moments.finish_batch()
    finally:
        for handle in handles:
            handle.remove()
    return moments


@torch.no_grad()
def match_single_pass_statistics(model, batches: Iterable, num_samples: int = 10, num_batches: int | None = None):
    """
    Statistics for `model`'s single pass (a calibrated `PerturbedModel`) that match, per norm layer and channel,
    the mean and variance over `batches` of its noise-averaged normalised features (module docstring). Returns a
    `SinglePassStatistics` at the calibration's κ; the model's own statistics and its calibration are unchanged.

    Two passes over the batches (training images, as for `calibrate_single_pass`; at most `num_batches`, held in
    memory): `num_samples` noise draws of each batch, then one single pass.
    """
    if model.single_pass_statistics is None:
        raise ValueError("match_single_pass_statistics needs a calibration: call calibrate_single_pass first.")
    if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2 (noise draws per image), got {num_samples!r}.")
    batches = list(islice(batches, num_batches))
    if not batches:
        raise ValueError("match_single_pass_statistics got no batches: the data loader or iterable is empty.")
    norms = running_norms(model.model)
    keys = unique_keys([name for name, _ in norms])
    device = norms[0][1].running_mean.device
    store = SinglePassStatistics(norms, model.single_pass_statistics.kappa).to(device)
    mode, noise_coeff = model.noise_mode, model.noise_coeff
    try:
        with eval_mode(model):
            model.noise_mode, model.noise_coeff = "sample", store.kappa
            averaged = _moments_over(model, norms, keys, batches, device, int(num_samples))
            maps = [_target_map(norm, *averaged.moments(key)) for key, (_, norm) in zip(keys, norms)]
            # The single pass, each norm normalising its batch and mapping it to the target, so that the layers
            # after it see the features they will see at test time; its buffers are the store's, then overwritten.
            model.noise_mode = "mean"
            with model._norm_statistics(store):
                for _, norm in norms:
                    norm.train()
                hooks = [_mapped_output(*target) for target in maps]
                single = _moments_over(model, norms, keys, batches, device, 1, hooks)
    finally:
        model.noise_mode, model.noise_coeff = mode, noise_coeff
    for key, (_, norm), target in zip(keys, norms, maps):
        mean, variance = _matched_statistics(*single.moments(key), norm.eps, *target)
        statistics = store.norms[key]
        statistics.running_mean.copy_(mean)
        statistics.running_var.copy_(variance)
        statistics.num_batches_tracked.fill_(len(batches))
    return store


__all__ = ["match_single_pass_statistics"]
