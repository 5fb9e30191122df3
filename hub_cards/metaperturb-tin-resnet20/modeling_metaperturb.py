"""The MetaPerturb perturbation function g_φ as a `transformers` model.

This file imports only torch, transformers and its own configuration, so that a saved folder or a hub repo that
carries it can be loaded with `trust_remote_code=True` where `metaperturb_hf` is not installed.
"""

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from .configuration_metaperturb import MetaPerturbConfig


@lru_cache(maxsize=4)
def _gauss_hermite_standard_normal(num_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights with `sum(w * f(x)) ≈ E[f(ε)]` for ε ~ N(0, 1) (Golub–Welsch, float64)."""
    off_diagonal = torch.arange(1, num_nodes, dtype=torch.float64).sqrt()
    jacobi = torch.diag(off_diagonal, 1) + torch.diag(off_diagonal, -1)
    nodes, vectors = torch.linalg.eigh(jacobi)
    return nodes, vectors[0] ** 2


class MetaPerturbModel(PreTrainedModel):
    r"""
    The perturbation function g_φ of MetaPerturb: 82 parameters shared by all channels, all layers and all networks.

    For a feature map h of shape (B, C, H, W) it computes

    - noise `z = softplus(μ + ε)`, `μ = PE₂(ReLU(PE₁(h)))`, where `PE(h)_c = λ ⋆ h_c + γ ⋆ mean_c'(h_c')` is a
      channel-equivariant 3×3 convolution;
    - a channel scale `s_c = sigmoid(w · [m_c, v_c, C / C_norm, H / H_norm])` from the batch mean m and variance v of
      `u = mean_HW ReLU(K ⋆ h_c)` (four 3×3 filters K), or from running statistics in evaluation;
    - the output `h ⊙ ((s ⊙ z − 1)·κ + 1)`, clamped at `clip_value` when one is given.

    Parameters (all N(0, `initializer_range`)): `identity_kernels` (λ₁, λ₂), `mean_kernels` (γ₁, γ₂), `stat_kernels`
    (K₁..K₄) and `scale_weight` (w, ordered [mean × 4, var × 4, channel, size]).
    """

    config: MetaPerturbConfig
    config_class = MetaPerturbConfig
    base_model_prefix = "metaperturb"
    main_input_name = "hidden_states"
    # The expected-noise mode evaluates softplus at this many Gauss-Hermite nodes per element.
    expected_noise_nodes = 8

    def __init__(self, config: MetaPerturbConfig):
        super().__init__(config)
        k = config.kernel_size
        self.identity_kernels = nn.Parameter(torch.empty(2, 1, k, k))
        self.mean_kernels = nn.Parameter(torch.empty(2, 1, k, k))
        self.stat_kernels = nn.Parameter(torch.empty(config.num_stat_filters, 1, k, k))
        self.scale_weight = nn.Parameter(torch.empty(2 * config.num_stat_filters + 2))
        # Set to a list to collect (mean s, mean z) of every call, e.g. for logging during meta-training.
        self.monitor: list | None = None
        self.post_init()

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
    ) -> torch.Tensor:
        r"""
        Perturb one site's features.

        Args:
            hidden_states: features of shape (B, C, H, W), or (B, C) for MLP features (treated as (B, C, 1, 1)).
            running_mean, running_var: the site's running statistics, shape (C, num_stat_filters). Updated in place
                in training mode; used instead of the batch statistics in evaluation mode.
            channel_norm, spatial_norm: C_norm and H_norm of the network (largest channel count / spatial size).
            noise_coeff: κ in [0, 1]; 0 returns the input unchanged, 1 gives `s ⊙ z ⊙ h`.
            noise: the standard-normal draw ε (same shape as `hidden_states`); sampled when omitted.
            clip_value: upper clamp of the output, or None for no clamp.
            expected_noise: replace z by its expectation over ε (deterministic single pass) instead of sampling.

        With a batch of one in training the batch variance of the statistics is taken as 0 (an unbiased variance
        of a single sample is undefined).
        """
        self._check_inputs(hidden_states, running_mean, running_var, noise)
        is_flat = hidden_states.dim() == 2
        h = hidden_states[:, :, None, None] if is_flat else hidden_states
        if noise is not None and is_flat:
            noise = noise[:, :, None, None]

        batch, channels, height, width = h.shape
        # Channels-last throughout: the depthwise convolutions below are several times faster in it on CPU.
        h = h.contiguous(memory_format=torch.channels_last)
        hidden = F.relu(self._per_channel_conv(h, self.identity_kernels[:1]) + self._mean_conv(h, 0))
        mu = self._per_channel_conv(hidden, self.identity_kernels[1:]) + self._mean_conv(hidden, 1)
        noise_sample = self._noise(mu, noise, expected_noise)

        stat_responses = self._per_channel_conv(h, self.stat_kernels)  # (B, C·K, H, W), channel-major
        pooled = F.relu(stat_responses).mean(dim=(2, 3)).view(batch, channels, -1)  # (B, C, num_stat_filters)
        mean, var = self._statistics(pooled, running_mean, running_var)
        descriptors = h.new_tensor([channels / channel_norm, height / spatial_norm]).expand(channels, 2)
        scale = torch.sigmoid(torch.cat([mean, var, descriptors], dim=1) @ self.scale_weight)

        if self.monitor is not None:
            self.monitor.append((scale.detach().mean(), noise_sample.detach().mean()))
        multiplier = (scale[None, :, None, None] * noise_sample - 1.0) * noise_coeff + 1.0
        output = h * multiplier
        if clip_value is not None:
            output = output.clamp(max=clip_value)
        return output.view(batch, channels) if is_flat else output

    def _per_channel_conv(self, features: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        """The same K kernels on every channel, as one depthwise convolution: (B, C, H, W) -> (B, C·K, H, W)."""
        weight = kernels.repeat(features.shape[1], 1, 1, 1)
        return F.conv2d(features, weight, padding=self.config.kernel_size // 2, groups=features.shape[1])

    def _mean_conv(self, features: torch.Tensor, layer: int) -> torch.Tensor:
        """γ ⋆ mean over channels, shape (B, 1, H, W), broadcast over channels by the caller."""
        pad = self.config.kernel_size // 2
        return F.conv2d(features.mean(dim=1, keepdim=True), self.mean_kernels[layer : layer + 1], padding=pad)

    def _noise(self, mu: torch.Tensor, noise: torch.Tensor | None, expected_noise: bool) -> torch.Tensor:
        if expected_noise:
            nodes, weights = _gauss_hermite_standard_normal(self.expected_noise_nodes)
            nodes, weights = nodes.to(mu), weights.to(mu)
            return sum(w * F.softplus(mu + x) for x, w in zip(nodes, weights))
        if noise is None:
            noise = torch.randn_like(mu)
        return F.softplus(mu + noise)

    def _statistics(
        self, pooled: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch statistics in training (updating the running ones in place), running statistics in evaluation."""
        if not self.training:
            return running_mean.to(pooled.dtype), running_var.to(pooled.dtype)
        mean = pooled.mean(dim=0)
        var = pooled.var(dim=0) if pooled.shape[0] > 1 else torch.zeros_like(mean)
        with torch.no_grad():
            momentum = self.config.stat_momentum
            running_mean.lerp_(mean.detach().to(running_mean.dtype), momentum)
            running_var.lerp_(var.detach().to(running_var.dtype), momentum)
        return mean, var

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
        if not torch.isfinite(hidden_states).all():
            raise ValueError(
                "hidden_states contains NaN or Inf; the features reaching this site are already broken "
                "(check the input data and the layers before it)."
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
