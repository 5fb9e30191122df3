"""φ's fused forward and backward as the custom ops `metaperturb::phi_forward` / `metaperturb::phi_backward`.

Custom ops, so that `torch.compile` traces through φ; the autograd formula calls the backward op, or reruns φ's eager
math on the same noise where the backward is itself differentiated (create_graph).
"""

import functools

import torch
from torch import Tensor

from .loading import extension

# the expected-noise mode's Gauss–Hermite nodes, fixed in the kernels (kNodes in phi_cpu.cpp)
EXPECTED_NOISE_NODES = 8


@torch.library.custom_op("metaperturb::phi_forward", mutates_args=())
def phi_forward(h: Tensor, identity_kernels: Tensor, mean_kernels: Tensor, stat_kernels: Tensor, scale_weight: Tensor,
                running_mean: Tensor, running_var: Tensor, noise: Tensor | None, seed: Tensor | None,
                quadrature: Tensor | None, noise_coeff: float, clip_value: float | None, channel_descriptor: float,
                spatial_descriptor: float, training: bool,
                kernel: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """φ's fused forward on `kernel` ("cpu" or "triton"): (output, s, mean z, pooled responses, features).

    `quadrature` (Gauss–Hermite nodes and weights, shape (2, 8)) asks for the expected-noise mode; noise and seed are
    then None."""
    return tuple(extension(kernel).forward(h, identity_kernels, mean_kernels, stat_kernels, scale_weight,
                                            running_mean, running_var, noise, seed, quadrature, noise_coeff,
                                            clip_value, channel_descriptor, spatial_descriptor, training))


@phi_forward.register_fake
def _(h, identity_kernels, mean_kernels, stat_kernels, scale_weight, running_mean, running_var, noise, seed,
      quadrature, noise_coeff, clip_value, channel_descriptor, spatial_descriptor, training, kernel):
    batch, channels = h.shape[:2]
    filters = stat_kernels.shape[0]
    return (torch.empty_like(h), h.new_empty(channels), h.new_empty(()),
            h.new_empty(batch, channels, filters) if training else h.new_empty(0),
            h.new_empty(channels, 2 * filters + 2))


@torch.library.custom_op("metaperturb::phi_backward", mutates_args=())
def phi_backward(grad_output: Tensor, h: Tensor, identity_kernels: Tensor, mean_kernels: Tensor, stat_kernels: Tensor,
                 scale_weight: Tensor, pooled: Tensor, features: Tensor, scale: Tensor, noise: Tensor | None,
                 seed: Tensor | None, quadrature: Tensor | None, noise_coeff: float, clip_value: float | None,
                 training: bool, needs_input: bool, needs_params: bool,
                 kernel: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """φ's fused backward on `kernel`: gradients of (h, λ, γ, K, w); empty tensors for those not asked for."""
    grads = extension(kernel).backward(grad_output, h, identity_kernels, mean_kernels, stat_kernels, scale_weight,
                                        pooled, features, scale, noise, seed, quadrature, noise_coeff, clip_value,
                                        training, needs_input, needs_params)
    return tuple(h.new_empty(0) if grad is None else grad for grad in grads)


@phi_backward.register_fake
def _(grad_output, h, identity_kernels, mean_kernels, stat_kernels, scale_weight, pooled, features, scale, noise, seed,
      quadrature, noise_coeff, clip_value, training, needs_input, needs_params, kernel):
    params = (identity_kernels, mean_kernels, stat_kernels, scale_weight)
    return (torch.empty_like(h) if needs_input else h.new_empty(0),
            *(torch.empty_like(p) if needs_params else h.new_empty(0) for p in params))


def _setup_context(ctx, inputs, output):
    (h, identity_kernels, mean_kernels, stat_kernels, scale_weight, _, _, noise, seed, quadrature, noise_coeff,
     clip_value, channel_descriptor, spatial_descriptor, training, kernel) = inputs
    _, scale, noise_mean, pooled, features = output
    ctx.mark_non_differentiable(scale, noise_mean, pooled, features)
    ctx.save_for_backward(h, identity_kernels, mean_kernels, stat_kernels, scale_weight, pooled, features, scale,
                          noise, seed, quadrature)
    ctx.options = (noise_coeff, clip_value, (channel_descriptor, spatial_descriptor), training, kernel)


def _backward(ctx, grad_output, *unused_grads):
    h, identity_kernels, mean_kernels, stat_kernels, scale_weight, pooled, features, scale, noise, seed, quadrature = (
        ctx.saved_tensors)
    noise_coeff, clip_value, descriptors, training, kernel = ctx.options
    needs_input, needs_params = ctx.needs_input_grad[0], any(ctx.needs_input_grad[1:5])
    nones = (None,) * 11
    if grad_output is None or not (needs_input or needs_params):
        return (None,) * 5 + nones
    if torch.is_grad_enabled():  # create_graph: differentiate φ's eager math on the same noise instead
        return (*_differentiable_backward(ctx, grad_output), *nones)
    grads = phi_backward(grad_output, h, identity_kernels, mean_kernels, stat_kernels, scale_weight, pooled, features,
                         scale, noise, seed, quadrature, noise_coeff, clip_value, training, needs_input, needs_params,
                         kernel)
    grad_input, grad_identity, grad_mean, grad_stat, grad_weight = (
        grad if needed else None for grad, needed in zip(grads, (needs_input, *(needs_params,) * 4)))
    # as eager: in evaluation the statistics filters are not used, so they get no gradient (not a zero one)
    return (grad_input, grad_identity, grad_mean, grad_stat if training else None, grad_weight, *nones)


def _differentiable_backward(ctx, grad_output):
    from ..modeling_metaperturb import _differentiable_output, _Settings

    h, identity_kernels, mean_kernels, stat_kernels, scale_weight, _, features, _, noise, seed, quadrature = (
        ctx.saved_tensors)
    noise_coeff, clip_value, descriptors, training, kernel = ctx.options
    expected = quadrature is not None
    if noise is None and not expected:
        noise = extension(kernel).normals(h, seed)
    settings = _Settings(noise_coeff, clip_value, descriptors, expected, EXPECTED_NOISE_NODES, training, 0.0, False,
                         False)
    differentiable = [h, identity_kernels, mean_kernels, stat_kernels, scale_weight]
    output = _differentiable_output(*differentiable, features, noise, None, settings, clip_value is not None)
    wanted = [tensor for tensor, needed in zip(differentiable, ctx.needs_input_grad) if needed]
    grads = iter(torch.autograd.grad(output, wanted, grad_output, create_graph=True, allow_unused=True))
    return [next(grads) if needed else None for needed in ctx.needs_input_grad[:5]]


phi_forward.register_autograd(_backward, setup_context=_setup_context)


def perturb(h, identity_kernels, mean_kernels, stat_kernels, scale_weight, running_mean, running_var, noise, settings,
            kernel="cpu"):
    """φ through the fused op, with the running-statistics update (outside the op, which stays functional).

    The op saves only the input (and the noise's seed, or the explicit noise) and its backward recomputes the rest,
    so activation checkpointing changes nothing here: it is what the fused path always does. The seed comes from the
    features' device's default generator (`torch.manual_seed` fixes it; on CUDA a graph replay draws a new one).
    """
    quadrature = _quadrature(h.dtype, h.device) if settings.expected_noise else None
    drawn = noise is None and quadrature is None
    seed = torch.randint(2**62, (), dtype=torch.int64, device=h.device) if drawn else None
    output, scale, noise_mean, _, features = phi_forward(
        h, identity_kernels, mean_kernels, stat_kernels, scale_weight, running_mean, running_var, noise, seed,
        quadrature, settings.noise_coeff, settings.clip_value, *settings.descriptors, settings.training, kernel)
    if settings.training:
        filters = stat_kernels.shape[0]
        with torch.no_grad():
            running_mean.lerp_(features[:, :filters].to(running_mean.dtype), settings.stat_momentum)
            running_var.lerp_(features[:, filters:2 * filters].to(running_var.dtype), settings.stat_momentum)
    return output, scale, noise_mean


@functools.lru_cache(maxsize=8)
def _quadrature(dtype: torch.dtype, device: torch.device) -> Tensor:
    """The expected-noise mode's Gauss–Hermite nodes and weights as one (2, 8) tensor, the same rule as eager's."""
    from ..modeling_metaperturb import _gauss_hermite_standard_normal

    return torch.stack(_gauss_hermite_standard_normal(EXPECTED_NOISE_NODES)).to(dtype=dtype, device=device)

