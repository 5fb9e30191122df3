"""The MetaPerturb perturbation function g_φ as a `transformers` model.

This file imports only torch, transformers and its own configuration, so that a saved folder or a hub repo that
carries it can be loaded with `trust_remote_code=True` where `metaperturb_hf` is not installed.
"""

from contextlib import contextmanager
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from .configuration_metaperturb import MetaPerturbConfig

# The start of the message φ's eager code and its compiled kernels give when the features reaching a site are broken.
NON_FINITE_FEATURES = "hidden_states contains NaN or Inf; the features reaching this site are already broken"


class NonFiniteFeaturesError(ValueError):
    """The features reaching a perturbation site, or the probabilities made from them, hold NaN or Inf. Its own type
    so that a caller trying several settings (the single pass's candidate statistics) can tell a setting that breaks
    the network from a bad call."""


@lru_cache(maxsize=4)
def _gauss_hermite_standard_normal(num_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights with `sum(w * f(x)) ≈ E[f(ε)]` for ε ~ N(0, 1) (Golub–Welsch, float64)."""
    off_diagonal = torch.arange(1, num_nodes, dtype=torch.float64).sqrt()
    jacobi = torch.diag(off_diagonal, 1) + torch.diag(off_diagonal, -1)
    nodes, vectors = torch.linalg.eigh(jacobi)
    return nodes, vectors[0] ** 2


class _Settings(NamedTuple):
    """Everything about one call that is not a tensor."""

    noise_coeff: float
    clip_value: float | None
    descriptors: tuple[float, float]  # (C / C_norm, H / H_norm)
    expected_noise: bool
    expected_noise_nodes: int
    training: bool
    stat_momentum: float
    monitor: bool  # also return the mean noise
    recompute: bool  # activation checkpointing: save only the input (and the noise's seed), recompute the rest


def _depthwise_input(features: torch.Tensor) -> torch.Tensor:
    """`features` as the input of a depthwise convolution.

    A single-channel map (a channel mean) becomes one image with the batch as its channels: oneDNN's single-channel
    convolution is 4× slower on CPU than a depthwise one over the batch.
    """
    if features.shape[1] == 1:
        return features.reshape(1, features.shape[0], *features.shape[2:])
    return features


def _kernel_per_channel(kernel: torch.Tensor, channels: int, dtype: torch.dtype) -> torch.Tensor:
    return kernel.to(dtype).reshape(1, 1, *kernel.shape[-2:]).expand(channels, 1, -1, -1).contiguous()


def _stencil(features: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """One 3×3 kernel applied to every channel alone: a depthwise convolution (fast in channels-last on CPU)."""
    inputs = _depthwise_input(features)
    channels = inputs.shape[1]
    weight = _kernel_per_channel(kernel, channels, inputs.dtype)
    return F.conv2d(inputs, weight, padding=kernel.shape[-1] // 2, groups=channels).view(features.shape)


def _stencil_transposed(grad: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The input gradient of `_stencil`: the same stencil with the kernel flipped (a forward pass, no conv
    backward)."""
    return _stencil(grad, kernel.flip(-2, -1))


def _stencil_kernel_grad(grad: torch.Tensor, features: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The gradient of a kernel shared by all channels: the per-channel weight gradients, summed."""
    inputs, grad = _depthwise_input(features), _depthwise_input(grad)
    channels = inputs.shape[1]
    weight = _kernel_per_channel(kernel, channels, inputs.dtype)
    pad = kernel.shape[-1] // 2
    per_channel = torch.ops.aten.convolution_backward(
        grad, inputs, weight, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], channels, [False, True, False]
    )[1]
    return per_channel.sum(0, dtype=kernel.dtype).view(kernel.shape)


def _channel_mean_conv(features: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """γ ⋆ (mean over channels), shape (B, 1, H, W), broadcast over channels by the caller."""
    return _stencil(features.mean(dim=1, keepdim=True), kernel)


def _hidden_layer(x: torch.Tensor, channel_mean: torch.Tensor, identity_kernels, mean_kernels) -> torch.Tensor:
    """ReLU(λ₁ ⋆ h + γ₁ ⋆ mean_c(h)), the first channel-equivariant layer of the noise generator."""
    return _stencil(x, identity_kernels[0]).add_(_stencil(channel_mean, mean_kernels[0])).relu_()


def _noise_generator(x: torch.Tensor, channel_mean: torch.Tensor, identity_kernels, mean_kernels):
    """The hidden layer and μ = λ₂ ⋆ hidden + γ₂ ⋆ mean_c(hidden)."""
    hidden = _hidden_layer(x, channel_mean, identity_kernels, mean_kernels)
    return hidden, _stencil(hidden, identity_kernels[1]).add_(_channel_mean_conv(hidden, mean_kernels[1]))


def _noise_argument(mu: torch.Tensor, noise: torch.Tensor | None, seed: int | None, settings: _Settings):
    """What the noise z is a function of: μ + ε (written into μ), or μ itself in the expected-noise mode."""
    if settings.expected_noise:
        return mu
    return mu.add_(noise.to(mu.dtype) if noise is not None else _sample_noise(mu, seed))


def _noise_and_slope(argument: torch.Tensor, settings: _Settings, with_slope: bool):
    """z = softplus(μ + ε), or E_ε[softplus(μ + ε)] in the expected-noise mode, and its derivative in μ."""
    if settings.expected_noise:
        return _expected_noise_and_slope(argument, settings.expected_noise_nodes, with_slope)
    return F.softplus(argument), torch.sigmoid(argument) if with_slope else None


def _noise_seed() -> int:
    """The seed of one noise draw, from the default generator: `torch.manual_seed` fixes the draw, and a backward
    that recomputes the noise draws it again from the same seed."""
    return int(torch.randint(2**62, (), dtype=torch.int64))


def _sample_noise(mu: torch.Tensor, seed: int) -> torch.Tensor:
    """ε ~ N(0, 1) shaped and laid out like `mu`, drawn from `seed`.

    Drawn as a contiguous block and viewed in `mu`'s layout: `randn_like` on a channels-last tensor takes a slow
    strided path on CPU (6× slower).
    """
    generator = torch.Generator(mu.device).manual_seed(seed)
    if mu.is_contiguous():
        return torch.empty_like(mu).normal_(generator=generator)
    batch, channels, height, width = mu.shape
    noise = torch.empty(batch, height, width, channels, dtype=mu.dtype, device=mu.device).normal_(generator=generator)
    return noise.permute(0, 3, 1, 2)


def _expected_noise_and_slope(mu: torch.Tensor, num_nodes: int, with_slope: bool):
    """E_ε[softplus(μ + ε)] and its derivative in μ, E_ε[sigmoid(μ + ε)], by Gauss–Hermite quadrature."""
    nodes, weights = _gauss_hermite_standard_normal(num_nodes)
    z = torch.zeros_like(mu)
    slope = torch.zeros_like(mu) if with_slope else None
    for node, weight in zip(nodes.tolist(), weights.tolist()):
        shifted = mu + node
        z.add_(F.softplus(shifted), alpha=weight)
        if with_slope:
            slope.add_(torch.sigmoid(shifted), alpha=weight)
    return z, slope


def _pooled_responses(x: torch.Tensor, stat_kernels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """u = mean_HW ReLU(K ⋆ h) for each statistics filter, shape (B, C, num_stat_filters), in φ's precision."""
    return torch.stack([_stencil(x, kernel).relu_().mean(dim=(2, 3), dtype=dtype) for kernel in stat_kernels], dim=-1)


def _batch_statistics(pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance over the batch (a variance of 0 for a batch of one)."""
    mean = pooled.mean(dim=0)
    return mean, pooled.var(dim=0) if pooled.shape[0] > 1 else torch.zeros_like(mean)


def _channel_scale(features: torch.Tensor, scale_weight: torch.Tensor) -> torch.Tensor:
    """s = sigmoid(features · w); not a matmul, so that autocast leaves it in φ's precision."""
    return torch.sigmoid((features * scale_weight).sum(dim=1))


def _differentiable_output(h, identity_kernels, mean_kernels, stat_kernels, scale_weight, features, noise, seed,
                           settings: _Settings, clipped: bool) -> torch.Tensor:
    """φ's output again as plain autograd operations (the same noise; running statistics left alone), for a backward
    that is itself differentiated."""
    x = h.contiguous(memory_format=torch.channels_last)
    channels, num_filters = x.shape[1], stat_kernels.shape[0]
    _, mu = _noise_generator(x, x.mean(dim=1, keepdim=True), identity_kernels, mean_kernels)
    z, _ = _noise_and_slope(_noise_argument(mu, noise, seed, settings), settings, with_slope=False)
    if settings.training:
        statistics = torch.cat(_batch_statistics(_pooled_responses(x, stat_kernels, scale_weight.dtype)), dim=1)
        features = torch.cat([statistics, features[:, 2 * num_filters:]], dim=1)
    coeff = settings.noise_coeff
    scale = _channel_scale(features, scale_weight).to(x.dtype).view(1, channels, 1, 1)
    output = h * (z * scale * coeff + (1.0 - coeff))
    return output.clamp(max=settings.clip_value) if clipped else output


class _PerturbFunction(torch.autograd.Function):
    """g_φ with a hand-written backward.

    Autograd through the plain expression saves a dozen full-size tensors and runs depthwise-convolution backward
    kernels that are far slower than forward ones on CPU. Here the forward saves the input, where the hidden layer is
    active (one byte per element) and the noise's argument μ + ε; the backward recomputes the rest and writes every
    input gradient as a forward stencil with the flipped kernel. Kernel gradients (and the hidden layer they need)
    are computed only when φ is trained. With activation checkpointing the forward saves only the input and the
    noise's seed, and the backward recomputes the hidden layer, μ and z as well.
    """

    @staticmethod
    def forward(ctx, h, identity_kernels, mean_kernels, stat_kernels, scale_weight, running_mean, running_var,
                noise, settings: _Settings):
        x = h.contiguous(memory_format=torch.channels_last)
        batch, channels, height, width = x.shape
        channel_mean = x.mean(dim=1, keepdim=True)
        if not torch.isfinite(channel_mean).all():
            raise NonFiniteFeaturesError(f"{NON_FINITE_FEATURES} (check the input data and the layers before it).")
        hidden, mu = _noise_generator(x, channel_mean, identity_kernels, mean_kernels)
        ctx.seed = _noise_seed() if noise is None and not settings.expected_noise else None
        noise_argument = _noise_argument(mu, noise, ctx.seed, settings)
        z, _ = _noise_and_slope(noise_argument, settings, with_slope=False)

        pooled = _pooled_responses(x, stat_kernels, scale_weight.dtype)  # φ's precision, also under mixed precision
        if settings.training:
            mean, var = _batch_statistics(pooled)
            running_mean.lerp_(mean.to(running_mean.dtype), settings.stat_momentum)
            running_var.lerp_(var.to(running_var.dtype), settings.stat_momentum)
        else:
            mean, var = running_mean.to(pooled.dtype), running_var.to(pooled.dtype)
        descriptors = pooled.new_tensor(settings.descriptors).expand(channels, 2)
        features = torch.cat([mean, var, descriptors], dim=1)  # (C, 2·num_stat_filters + 2)
        scale = _channel_scale(features, scale_weight)

        coeff = settings.noise_coeff
        multiplier = torch.addcmul(x.new_tensor(1.0 - coeff), z, (scale * coeff).to(x.dtype).view(1, channels, 1, 1))
        output = torch.mul(h, multiplier, out=torch.empty_like(h))
        # The clip is rarely reached: one read of the output spares a clamp and a gradient mask. On GPU the check
        # would synchronise, so there the clamp always runs.
        ctx.clipped = settings.clip_value is not None and (output.is_cuda or bool(output.max() > settings.clip_value))
        if ctx.clipped:
            output.clamp_(max=settings.clip_value)
        ctx.settings = settings
        noise_mean = z.mean() if settings.monitor else z.new_zeros(())
        ctx.mark_non_differentiable(scale, noise_mean)
        recompute = settings.recompute
        # The input itself (not its channels-last copy), so that a differentiated backward stays connected to it.
        ctx.save_for_backward(h, None if recompute else hidden > 0, None if recompute else noise_argument, noise,
                              pooled, features, scale, identity_kernels, mean_kernels, stat_kernels, scale_weight)
        return output, scale, noise_mean

    @staticmethod
    def backward(ctx, grad_output, grad_scale_unused, grad_noise_mean_unused):
        settings = ctx.settings
        (h, hidden_active, noise_argument, noise, pooled, features, scale, identity_kernels, mean_kernels,
         stat_kernels, scale_weight) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: this backward is differentiated again (lookahead meta-training)
            differentiable = [h, identity_kernels, mean_kernels, stat_kernels, scale_weight]
            output = _differentiable_output(*differentiable, features, noise, ctx.seed, settings, ctx.clipped)
            wanted = [tensor for tensor, needed in zip(differentiable, ctx.needs_input_grad) if needed]
            grads = iter(torch.autograd.grad(output, wanted, grad_output, create_graph=True, allow_unused=True))
            return (*(next(grads) if needed else None for needed in ctx.needs_input_grad[:5]), None, None, None, None)
        x = h.contiguous(memory_format=torch.channels_last)
        batch, channels, height, width = x.shape
        needs_input, *needs_params = ctx.needs_input_grad[:5]
        train_phi = any(needs_params)
        coeff = settings.noise_coeff
        channel_mean = hidden = None
        if settings.recompute:
            channel_mean = x.mean(dim=1, keepdim=True)
            hidden, mu = _noise_generator(x, channel_mean, identity_kernels, mean_kernels)
            noise_argument = _noise_argument(mu, noise, ctx.seed, settings)
            hidden_active = hidden > 0

        z, slope = _noise_and_slope(noise_argument, settings, with_slope=True)
        scale_coeff = (scale * coeff).to(x.dtype).view(1, channels, 1, 1)
        multiplier = torch.addcmul(x.new_tensor(1.0 - coeff), z, scale_coeff)
        grad = grad_output.contiguous(memory_format=torch.channels_last)
        if ctx.clipped:
            grad = grad * (x * multiplier <= settings.clip_value)
        grad_multiplier = grad * x
        grad_scale = (grad_multiplier * z).sum(dim=(0, 2, 3), dtype=scale.dtype) * coeff  # (C,)
        grad_mu = grad_multiplier.mul_(slope.mul_(scale_coeff))

        # μ = λ₂ ⋆ hidden + γ₂ ⋆ mean_c(hidden)
        grad_mu_channel_sum = grad_mu.sum(dim=1, keepdim=True)
        grad_hidden = _stencil_transposed(grad_mu, identity_kernels[1])
        grad_hidden.add_(_stencil_transposed(grad_mu_channel_sum, mean_kernels[1]), alpha=1.0 / channels)
        grad_hidden.mul_(hidden_active)
        # hidden = ReLU(λ₁ ⋆ h + γ₁ ⋆ mean_c(h))
        grad_hidden_channel_sum = grad_hidden.sum(dim=1, keepdim=True)
        grad_input = _stencil_transposed(grad_hidden, identity_kernels[0]).addcmul_(grad, multiplier)  # + through h
        grad_input.add_(_stencil_transposed(grad_hidden_channel_sum, mean_kernels[0]), alpha=1.0 / channels)

        # s = sigmoid(features · w); features = [batch mean, batch var, descriptors] of the pooled responses
        grad_logit = grad_scale * scale * (1 - scale)
        grad_scale_weight = features.t() @ grad_logit if train_phi else None
        grad_stat_kernels = torch.zeros_like(stat_kernels) if train_phi and settings.training else None
        if settings.training:
            num_filters = stat_kernels.shape[0]
            grad_features = grad_logit[:, None] * scale_weight[None, :]
            grad_pooled = grad_features[None, :, :num_filters] / batch
            if batch > 1:
                centered = pooled - pooled.mean(dim=0)
                grad_pooled = (grad_pooled
                               + grad_features[None, :, num_filters:2 * num_filters] * 2 * centered / (batch - 1))
            grad_pooled = (grad_pooled / (height * width)).to(x.dtype).expand(batch, channels, num_filters)
            for k, kernel in enumerate(stat_kernels):
                active = _stencil(x, kernel).gt_(0)  # where ReLU(K ⋆ h) passes gradient; in place keeps the layout
                grad_response_scale = grad_pooled[:, :, k, None, None]  # one value per (b, c) map ...
                # ... so it commutes with the per-map stencil: one multiply-add instead of a multiply and an add
                grad_input.addcmul_(_stencil_transposed(active, kernel), grad_response_scale)
                if train_phi:
                    # not in place: under create_graph (lookahead) the transposed stencil saved `active`
                    grad_stat_kernels[k] = _stencil_kernel_grad(active * grad_response_scale, x, kernel)

        grad_identity = grad_mean = None
        if train_phi:
            if hidden is None:
                channel_mean = x.mean(dim=1, keepdim=True)
                hidden = _hidden_layer(x, channel_mean, identity_kernels, mean_kernels)
            grad_identity = torch.stack([
                _stencil_kernel_grad(grad_hidden, x, identity_kernels[0]),
                _stencil_kernel_grad(grad_mu, hidden, identity_kernels[1]),
            ])
            grad_mean = torch.stack([
                _stencil_kernel_grad(grad_hidden_channel_sum, channel_mean, mean_kernels[0]),
                _stencil_kernel_grad(grad_mu_channel_sum, hidden.mean(dim=1, keepdim=True), mean_kernels[1]),
            ])
        if needs_input:
            grad_input = grad_input.contiguous(memory_format=_memory_format_of(grad_output))
        return (grad_input if needs_input else None, grad_identity, grad_mean, grad_stat_kernels, grad_scale_weight,
                None, None, None, None)


def _fused_phi(choice: str | None, h, parameters, running_mean, running_var, noise, settings: _Settings):
    """The fused kernel of `metaperturb_hf.kernels` for this call, or None for the eager path: when asked for
    ("eager"), when the package is absent (a hub copy of this file), or when the kernel did not load, failed its
    self-check or does not implement the call (it says which, once)."""
    if choice is None:
        import os

        choice = os.environ.get("METAPERTURB_KERNEL", "auto")
    if choice not in ("auto", "eager", "cpu", "triton"):
        raise ValueError(
            f"the φ kernel must be 'auto', 'eager', 'cpu' or 'triton' (METAPERTURB_KERNEL), got {choice!r}.")
    if choice == "eager":
        return None
    try:
        from metaperturb_hf.kernels import select
    except ImportError:
        if choice != "auto":
            raise
        return None
    return select(choice, h, parameters, running_mean, running_var, noise, settings)


def _memory_format_of(tensor: torch.Tensor) -> torch.memory_format:
    if tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class MetaPerturbModel(PreTrainedModel):
    r"""
    The perturbation function g_φ of MetaPerturb: 82 parameters shared by all channels, all layers and all networks.

    For a feature map h of shape (B, C, H, W) it computes

    - noise `z = softplus(μ + ε)`, `μ = PE₂(ReLU(PE₁(h)))`, where `PE(h)_c = λ ⋆ h_c + γ ⋆ mean_c'(h_c')`
      is a channel-equivariant 3×3 convolution;
    - a channel scale `s_c = sigmoid(w · [m_c, v_c, C / C_norm, H / H_norm])` from the batch mean m and variance v of
      `u = mean_HW ReLU(K ⋆ h_c)` (four 3×3 filters K), or from running statistics in evaluation;
    - the output `h ⊙ ((s ⊙ z − 1)·κ + 1)`, clamped at `clip_value` when one is given.

    Parameters (all N(0, `initializer_range`)): `identity_kernels` (λ₁, λ₂), `mean_kernels` (γ₁, γ₂),
    `stat_kernels` (K₁..K₄) and `scale_weight` (w, ordered [mean × 4, var × 4, channel, size]).
    """

    config: MetaPerturbConfig
    config_class = MetaPerturbConfig
    base_model_prefix = "metaperturb"
    main_input_name = "hidden_states"
    # The expected-noise mode evaluates softplus at this many Gauss-Hermite nodes per element.
    expected_noise_nodes = 8
    # `activation_checkpointing_enable()` (or the older `gradient_checkpointing_enable()`) makes φ save only its input
    # for backward and recompute the rest: about a float and a quarter per element less, for a slower backward.
    supports_gradient_checkpointing = True

    def __init__(self, config: MetaPerturbConfig):
        super().__init__(config)
        k = config.kernel_size
        self.identity_kernels = nn.Parameter(torch.empty(2, 1, k, k))
        self.mean_kernels = nn.Parameter(torch.empty(2, 1, k, k))
        self.stat_kernels = nn.Parameter(torch.empty(config.num_stat_filters, 1, k, k))
        self.scale_weight = nn.Parameter(torch.empty(2 * config.num_stat_filters + 2))
        self._monitor_records: list | None = None  # set inside `monitoring()`
        self.gradient_checkpointing = False
        # "auto", "eager", "cpu" or "triton" (a fused kernel); None defers to METAPERTURB_KERNEL, then "auto".
        self.kernel: str | None = None
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, output_loading_info: bool = False, **kwargs):
        """As `PreTrainedModel.from_pretrained`, but a file whose weights do not match φ exactly is refused.

        transformers would fill a missing or misnamed weight at random and only print a report: a φ that silently
        is not the one saved. A weights file that safetensors cannot read (truncated, damaged) is named in the error;
        safetensors' own message names no file.
        """
        import os

        from safetensors import SafetensorError  # a dependency of transformers: a hub copy of this file has it too

        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except SafetensorError as error:
            folder = os.path.join(str(source), kwargs.get("subfolder") or "")
            weights = os.path.join(folder, "model.safetensors") if os.path.isdir(folder) else (
                f"model.safetensors of the hub repo {source}")
            raise OSError(
                f"Cannot read {weights} ({error}): the file is truncated or damaged, most often by an interrupted "
                "copy, save or download. Write it again with save_pretrained, copy it again, or for a hub repo "
                "download it again with from_pretrained(..., force_download=True)."
            ) from error
        problems = {key: sorted(map(str, info.get(key) or ())) for key in ("missing_keys", "unexpected_keys",
                                                                         "mismatched_keys")}
        if any(problems.values()) or info.get("error_msgs"):
            details = {key: value for key, value in problems.items() if value} or info["error_msgs"]
            raise ValueError(f"{source} does not hold the weights of a MetaPerturb φ: {details}.")
        broken = [name for name, parameter in model.named_parameters() if not torch.isfinite(parameter).all()]
        if broken:
            raise ValueError(f"{source} holds NaN or Inf in {broken}; the file is damaged or comes from a "
                             "diverged run.")
        return (model, info) if output_loading_info else model

    @contextmanager
    def monitoring(self):
        """Collect (mean s, mean z) of every call made inside the block, in call order, e.g. to log meta-training:

        ```python
        with phi.monitoring() as calls:
            model(images)
        scale_of_first_site, noise_of_first_site = calls[0]
        ```
        Outside such a block φ computes no mean of z at all.
        """
        previous, self._monitor_records = self._monitor_records, []
        try:
            yield self._monitor_records
        finally:
            self._monitor_records = previous

    def _init_weights(self, module):
        if module is self:
            for parameter in self.parameters(recurse=False):
                init.normal_(parameter, mean=0.0, std=self.config.initializer_range)

    def forward(
        self,
        hidden_states: torch.Tensor,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        channel_norm: float,
        spatial_norm: float,
        noise_coeff: float = 1.0,
        noise: torch.Tensor | None = None,
        clip_value: float | None = None,
        expected_noise: bool = False,
        kernel: str | None = None,
    ) -> torch.Tensor:
        r"""
        Perturb one site's features.

        Args:
            hidden_states: features of shape (B, C, H, W), or (B, C) for MLP features (treated as (B, C, 1, 1)).
            running_mean, running_var: the site's running statistics, shape (C, num_stat_filters). Updated in place
                in training mode; used instead of the batch statistics in evaluation mode.
            channel_norm, spatial_norm: C_norm and H_norm of the descriptors C / C_norm and H / H_norm (a wrapped
                model's default: the largest channel count / spatial size among its chosen sites).
            noise_coeff: κ in [0, 1]; 0 returns the input unchanged, 1 gives `s ⊙ z ⊙ h`.
            noise: the standard-normal draw ε (same shape as `hidden_states`); sampled when omitted.
            clip_value: upper clamp of the output, or None for no clamp.
            expected_noise: replace z by its expectation over ε (deterministic single pass) instead of sampling.
            kernel: "auto", "eager", "cpu" or "triton" for this call (else `self.kernel`, else METAPERTURB_KERNEL,
                else "auto"): which fused kernel of `metaperturb_hf.kernels` may compute it (CPU or CUDA).

        With a batch of one in training the batch variance of the statistics is taken as 0 (an unbiased variance
        of a single sample is undefined).
        """
        self._check_inputs(hidden_states, running_mean, running_var, noise)
        is_flat = hidden_states.dim() == 2
        h = hidden_states[:, :, None, None] if is_flat else hidden_states
        if noise is not None:
            noise = noise.view(h.shape)
        _, channels, height, width = h.shape
        descriptors = (channels / channel_norm, height / spatial_norm)
        settings = _Settings(float(noise_coeff), clip_value, descriptors, expected_noise, self.expected_noise_nodes,
                             self.training, self.config.stat_momentum, self._monitor_records is not None,
                             self.gradient_checkpointing and torch.is_grad_enabled())
        # φ computes in the features' own precision (its kernels are cast to it), so autocast has nothing to add.
        parameters = (self.identity_kernels, self.mean_kernels, self.stat_kernels, self.scale_weight)
        with torch.autocast(h.device.type, enabled=False):
            fused = _fused_phi(kernel or self.kernel, h, parameters, running_mean, running_var, noise, settings)
            function = fused or _PerturbFunction.apply
            try:
                output, scale, noise_sample_mean = function(h, *parameters, running_mean, running_var, noise, settings)
            except ValueError as error:  # a compiled kernel says it with a plain ValueError
                if isinstance(error, NonFiniteFeaturesError) or NON_FINITE_FEATURES not in str(error):
                    raise
                raise NonFiniteFeaturesError(str(error)) from error
        if self._monitor_records is not None:
            self._monitor_records.append((scale.detach().mean(), noise_sample_mean))
        return output.view(hidden_states.shape) if is_flat else output

    def _check_inputs(self, hidden_states, running_mean, running_var, noise) -> None:
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}.")
        if hidden_states.dim() not in (2, 4):
            raise ValueError(
                f"hidden_states must have shape (B, C, H, W) or (B, C), got {tuple(hidden_states.shape)}; "
                "perturb convolutional feature maps or flat MLP features."
            )
        if not hidden_states.is_floating_point():
            raise TypeError(
                f"hidden_states must be floating point, got {hidden_states.dtype}; cast the input with .float()."
            )
        parameter = self.scale_weight
        if hidden_states.dtype != parameter.dtype and not torch.is_autocast_enabled(hidden_states.device.type):
            raise TypeError(
                f"the features are {hidden_states.dtype} but φ is {parameter.dtype}; cast one to the other "
                f"(perturbed.to({hidden_states.dtype}) for a wrapped model) or run under torch.autocast."
            )
        for name, tensor in (("φ's parameters", parameter), ("running_mean", running_mean),
                             ("running_var", running_var), ("noise", noise)):
            if tensor is not None and tensor.device != hidden_states.device:
                raise ValueError(
                    f"the features are on {hidden_states.device} but {name} on {tensor.device}; move them to one "
                    "device (perturbed.to(device) for a wrapped model, not only the classifier inside it)."
                )
        expected = (hidden_states.shape[1], self.config.num_stat_filters)
        for name, stats in (("running_mean", running_mean), ("running_var", running_var)):
            if tuple(stats.shape) != expected:
                raise ValueError(
                    f"{name} must have shape {expected} for {expected[0]} channels, got {tuple(stats.shape)}; "
                    "each site needs statistics built for its own channel count."
                )
        if noise is not None and noise.shape != hidden_states.shape:
            raise ValueError(
                f"noise must have the shape of hidden_states {tuple(hidden_states.shape)}, got {tuple(noise.shape)}."
            )


__all__ = ["MetaPerturbModel"]
