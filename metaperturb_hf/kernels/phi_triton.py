"""φ's fused forward and backward as Triton kernels: CUDA tensors, or CPU tensors under Triton's interpreter.

The structure of `phi_cpu.cpp` for a GPU, where a network of this size is bound by launches and memory passes: each
kernel is one pass over a site's map in tiles of pixels × every channel (the equivariant layers' channel means need
all channels of a pixel), and the backward recomputes what it needs from the input, which is all the op saves. Forward:
the hidden layer (with the statistics filters' pooled responses), the batch statistics and channel scale, the output.
Backward: the hidden layer again (with one bit per statistics filter where it is active), the gradient through z, the
scale's, the hidden layer's, the input's; kernel gradients are per-tile partial sums, added up in float64. The noise is
`tl.randn` keyed by the call's seed, a tensor on the device (so a CUDA-graph replay draws anew), and each element's
index ((b·H + i)·W + j)·C + c, so the backward regenerates it. Nothing here waits for the device.
"""

import contextlib
import functools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

_TILE = 1024  # elements in a (pixels × channels) tile
_NOISE_BLOCK = 4096  # elements per program of the noise kernel
_STAT_BLOCK = 1024  # elements in a (batch × channels) block of the statistics kernels, times four filters
_FILTERS = 4
_FEATURES = 2 * _FILTERS + 2  # mean × 4, var × 4, channel and size descriptors
_PARTIALS = 8 * 9  # kernel-gradient partial sums per tile: λ₁, λ₂, γ₁, γ₂, K₁..K₄, 9 taps each


@triton.jit
def _tile(H, W, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's image b, tile row, pixels p = (i, j) and channels c, with their masks."""
    b = tl.program_id(1).to(tl.int64)
    row = b * tl.num_programs(0) + tl.program_id(0)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_C)
    return b, row, p, p // W, p % W, c, p < H * W, c < C


@triton.jit
def _at(ptr, sb, sc, sh, sw, b, i, j, c, pm, cm, H, W):
    """The tile at pixels (i, j) of image b, zero outside the image (the stencils' padding)."""
    inside = pm & (i >= 0) & (i < H) & (j >= 0) & (j < W)
    offsets = b * sb + i.to(tl.int64) * sh + j.to(tl.int64) * sw
    return tl.load(ptr + offsets[:, None] + c[None, :].to(tl.int64) * sc, mask=inside[:, None] & cm[None, :], other=0)


@triton.jit
def _put(ptr, sb, sc, sh, sw, b, i, j, c, pm, cm, value):
    offsets = b * sb + i.to(tl.int64) * sh + j.to(tl.int64) * sw
    tl.store(ptr + offsets[:, None] + c[None, :].to(tl.int64) * sc, value, mask=pm[:, None] & cm[None, :])


@triton.jit
def _equivariant(ptr, sb, sc, sh, sw, lam_ptr, gam_ptr, b, i, j, c, pm, cm, H, W, C, center, partial_ptr,
                 SIGN: tl.constexpr, PARTIALS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Σ_t λ_t v(p + SIGN·d_t) + Σ_t γ_t Σ_c v(p + SIGN·d_t) / C: with SIGN 1 the layer
    λ ⋆ v + γ ⋆ mean_c(v), with SIGN -1 its input gradient for an upstream gradient v. PARTIALS: also λ's and
    γ's gradients over this tile, given the layer's input at the centre, into partial_ptr[t] and
    partial_ptr[18 + t]."""
    acc = tl.zeros((BLOCK_P, BLOCK_C), ptr.dtype.element_ty)
    shared = tl.zeros((BLOCK_P,), ptr.dtype.element_ty)
    if PARTIALS:
        center_mean = tl.sum(center, axis=1) / C
    for t in tl.static_range(9):
        v = _at(ptr, sb, sc, sh, sw, b, i + SIGN * (t // 3 - 1), j + SIGN * (t % 3 - 1), c, pm, cm, H, W)
        channel_sum = tl.sum(v, axis=1)
        acc += tl.load(lam_ptr + t) * v
        shared += tl.load(gam_ptr + t) * channel_sum
        if PARTIALS:
            tl.store(partial_ptr + t, tl.sum(v * center))
            tl.store(partial_ptr + 18 + t, tl.sum(channel_sum * center_mean))
    return acc + shared[:, None] / C


@triton.jit
def _responses(x_ptr, sb, sc, sh, sw, stat_ptr, b, i, j, c, pm, cm, H, W,
               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """K_k ⋆ x for the four statistics filters, as a (pixels, channels, filters) block."""
    k = tl.arange(0, 4)
    responses = tl.zeros((BLOCK_P, BLOCK_C, 4), x_ptr.dtype.element_ty)
    for t in tl.static_range(9):
        v = _at(x_ptr, sb, sc, sh, sw, b, i + (t // 3 - 1), j + (t % 3 - 1), c, pm, cm, H, W)
        responses += v[:, :, None] * tl.load(stat_ptr + 9 * k + t)[None, None, :]
    return responses


@triton.jit
def _softplus(x):
    """F.softplus (threshold 20), its log1p as log(w)·e / (w − 1) with w = 1 + e (exact where 1 + e rounds)."""
    e = tl.exp(tl.where(x > 20, 0.0, x))
    w = 1 + e
    return tl.where(x > 20, x, tl.where(w == 1, e, tl.log(w) * (e / (w - 1))))


@triton.jit
def _noise(argument, quadrature_ptr, EXPECTED: tl.constexpr, NODES: tl.constexpr):
    """z and dz/dμ: softplus(μ + ε) and its sigmoid, or in the expected-noise mode E_ε[softplus(μ + ε)] and
    E_ε[sigmoid(μ + ε)] by the Gauss–Hermite rule at `quadrature_ptr` (NODES nodes, then NODES weights)."""
    if EXPECTED:
        z = tl.zeros_like(argument)
        slope = tl.zeros_like(argument)
        for k in tl.static_range(NODES):
            shifted = argument + tl.load(quadrature_ptr + k).to(argument.dtype)
            weight = tl.load(quadrature_ptr + NODES + k).to(argument.dtype)
            z += weight * _softplus(shifted)
            slope += weight * tl.sigmoid(shifted)
        return z, slope
    return _softplus(argument), tl.sigmoid(argument)


@triton.jit
def _noise_argument(hidden_ptr, lam_ptr, gam_ptr, noise_ptr, nb, nc, nh, nw, seed_ptr, b, p, i, j, c, pm, cm, H, W, C,
                    DRAWN: tl.constexpr, EXPECTED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """μ + ε on the tile: μ = λ₂ ⋆ hidden + γ₂ ⋆ mean_c(hidden), ε drawn from the seed or read from the
    noise; μ alone in the expected-noise mode."""
    mu = _equivariant(hidden_ptr, H * W * C, 1, W * C, C, lam_ptr, gam_ptr, b, i, j, c, pm, cm, H, W, C, 0.0,
                      hidden_ptr, 1, False, BLOCK_P, BLOCK_C)
    if EXPECTED:
        return mu
    if DRAWN:
        index = (b * H * W + p.to(tl.int64))[:, None] * C + c[None, :]
        noise = tl.randn(tl.load(seed_ptr), index).to(mu.dtype)
    else:
        noise = _at(noise_ptr, nb, nc, nh, nw, b, i, j, c, pm, cm, H, W)
    return mu + noise


@triton.jit
def _hidden_kernel(x_ptr, xb, xc, xh, xw, lam_ptr, gam_ptr, stat_ptr, hidden_ptr, pooled_ptr, active_ptr, H, W, C,
                   STATS: tl.constexpr, ACTIVE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """hidden = ReLU(λ₁ ⋆ x + γ₁ ⋆ mean_c(x)); STATS: this tile's share of mean_HW ReLU(K_k ⋆ x) (forward,
    training); ACTIVE: bit k where K_k ⋆ x > 0 (backward, training)."""
    b, row, p, i, j, c, pm, cm = _tile(H, W, C, BLOCK_P, BLOCK_C)
    pre = _equivariant(x_ptr, xb, xc, xh, xw, lam_ptr, gam_ptr, b, i, j, c, pm, cm, H, W, C, 0.0, hidden_ptr, 1, False,
                       BLOCK_P, BLOCK_C)
    _put(hidden_ptr, H * W * C, 1, W * C, C, b, i, j, c, pm, cm, tl.maximum(pre, 0))
    k = tl.arange(0, 4)
    if STATS:
        responses = _responses(x_ptr, xb, xc, xh, xw, stat_ptr, b, i, j, c, pm, cm, H, W, BLOCK_P, BLOCK_C)
        tl.store(pooled_ptr + (row * C + c)[:, None] * 4 + k[None, :],
                 tl.sum(tl.maximum(responses, 0), axis=0) / (H * W), mask=cm[:, None])
    if ACTIVE:
        responses = _responses(x_ptr, xb, xc, xh, xw, stat_ptr, b, i, j, c, pm, cm, H, W, BLOCK_P, BLOCK_C)
        bits = tl.sum((responses > 0).to(tl.int32) << k[None, None, :], axis=2)  # distinct bits: the sum is an or
        _put(active_ptr, H * W * C, 1, W * C, C, b, i, j, c, pm, cm, bits.to(tl.uint8))


@triton.jit
def _batch_block(start, c, cm, B, C, BLOCK_B: tl.constexpr):
    """Offsets and mask of the (images start.., channels c, filters) block of a (B, C, 4) tensor."""
    b = start + tl.arange(0, BLOCK_B)
    offsets = (b[:, None, None] * C + c[None, :, None]) * 4 + tl.arange(0, 4)[None, None, :]
    return offsets, (b < B)[:, None, None] & cm[None, :, None]


@triton.jit
def _scale_kernel(pooled_ptr, mean_ptr, var_ptr, weight_ptr, features_ptr, scale_ptr, B, C, var_factor: tl.float64,
                  channel_descriptor: tl.float64, spatial_descriptor: tl.float64, TRAINING: tl.constexpr,
                  BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """features = [mean, var of u over the batch (or the running statistics), descriptors];
    s = sigmoid(features·w)."""
    dtype = weight_ptr.dtype.element_ty
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    k = tl.arange(0, 4)
    if TRAINING:
        total = tl.zeros((BLOCK_C, 4), dtype)
        for start in range(0, B, BLOCK_B):
            at, inside = _batch_block(start, c, cm, B, C, BLOCK_B)
            total += tl.sum(tl.load(pooled_ptr + at, mask=inside, other=0), 0)
        mean = total / B
        squares = tl.zeros((BLOCK_C, 4), dtype)
        for start in range(0, B, BLOCK_B):
            at, inside = _batch_block(start, c, cm, B, C, BLOCK_B)
            deviation = tl.where(inside, tl.load(pooled_ptr + at, mask=inside, other=0) - mean[None, :, :], 0)
            squares += tl.sum(deviation * deviation, 0)
        var = squares * tl.full((), var_factor, dtype)
    else:
        mean = tl.load(mean_ptr + c[:, None] * 4 + k[None, :], mask=cm[:, None], other=0)
        var = tl.load(var_ptr + c[:, None] * 4 + k[None, :], mask=cm[:, None], other=0)
    cd = tl.full((), channel_descriptor, dtype)
    sd = tl.full((), spatial_descriptor, dtype)
    logit = (tl.sum(mean * tl.load(weight_ptr + k)[None, :], 1) + tl.sum(var * tl.load(weight_ptr + 4 + k)[None, :], 1)
             + cd * tl.load(weight_ptr + 8) + sd * tl.load(weight_ptr + 9))
    row = features_ptr + c * 10
    tl.store(row[:, None] + k[None, :], mean, mask=cm[:, None])
    tl.store(row[:, None] + 4 + k[None, :], var, mask=cm[:, None])
    tl.store(row + 8, tl.zeros((BLOCK_C,), dtype) + cd, mask=cm)
    tl.store(row + 9, tl.zeros((BLOCK_C,), dtype) + sd, mask=cm)
    tl.store(scale_ptr + c, tl.sigmoid(logit), mask=cm)


@triton.jit
def _output_kernel(x_ptr, xb, xc, xh, xw, hidden_ptr, lam_ptr, gam_ptr, noise_ptr, nb, nc, nh, nw, seed_ptr,
                   quadrature_ptr, scale_ptr, out_ptr, ob, oc, oh, ow, z_ptr, kappa: tl.float64, limit: tl.float64,
                   z_norm: tl.float64, H, W, C, DRAWN: tl.constexpr, EXPECTED: tl.constexpr, NODES: tl.constexpr,
                   CLIP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """output = min(x · ((1 − κ) + κ s z), clip) with z = softplus(μ + ε) (or its expectation); this tile's
    share of mean z."""
    b, row, p, i, j, c, pm, cm = _tile(H, W, C, BLOCK_P, BLOCK_C)
    argument = _noise_argument(hidden_ptr, lam_ptr, gam_ptr, noise_ptr, nb, nc, nh, nw, seed_ptr, b, p, i, j, c, pm,
                               cm, H, W, C, DRAWN, EXPECTED, BLOCK_P, BLOCK_C)
    z, _ = _noise(argument, quadrature_ptr, EXPECTED, NODES)
    x = _at(x_ptr, xb, xc, xh, xw, b, i, j, c, pm, cm, H, W)
    k = tl.full((), kappa, x.dtype)
    out = x * ((1 - k) + k * tl.load(scale_ptr + c, mask=cm, other=0)[None, :] * z)
    if CLIP:
        bound = tl.full((), limit, x.dtype)
        out = tl.where(out > bound, bound, out)
    _put(out_ptr, ob, oc, oh, ow, b, i, j, c, pm, cm, out)
    tl.store(z_ptr + row, tl.sum(tl.where(pm[:, None] & cm[None, :], z, 0)) * tl.full((), z_norm, x.dtype))


@triton.jit
def _through_noise_kernel(x_ptr, xb, xc, xh, xw, go_ptr, gb, gc, gh, gw, hidden_ptr, lam_ptr, gam_ptr, noise_ptr, nb,
                          nc, nh, nw, seed_ptr, quadrature_ptr, scale_ptr, grad_mu_ptr, grad_x_ptr, rb, rc, rh, rw,
                          grad_scale_ptr, kappa: tl.float64, limit: tl.float64, H, W, C, DRAWN: tl.constexpr,
                          EXPECTED: tl.constexpr, NODES: tl.constexpr, CLIP: tl.constexpr, NEEDS_INPUT: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The gradient through the direct path (into grad_x, h's layout), through z (grad_mu) and this tile's share of
    s's gradient, where g is masked to 0 where the output was clamped."""
    b, row, p, i, j, c, pm, cm = _tile(H, W, C, BLOCK_P, BLOCK_C)
    argument = _noise_argument(hidden_ptr, lam_ptr, gam_ptr, noise_ptr, nb, nc, nh, nw, seed_ptr, b, p, i, j, c, pm,
                               cm, H, W, C, DRAWN, EXPECTED, BLOCK_P, BLOCK_C)
    z, slope = _noise(argument, quadrature_ptr, EXPECTED, NODES)
    x = _at(x_ptr, xb, xc, xh, xw, b, i, j, c, pm, cm, H, W)
    g = _at(go_ptr, gb, gc, gh, gw, b, i, j, c, pm, cm, H, W)
    k = tl.full((), kappa, x.dtype)
    ks = k * tl.load(scale_ptr + c, mask=cm, other=0)[None, :]
    multiplier = (1 - k) + ks * z
    if CLIP:
        g = tl.where(x * multiplier <= tl.full((), limit, x.dtype), g, 0)
    if NEEDS_INPUT:
        _put(grad_x_ptr, rb, rc, rh, rw, b, i, j, c, pm, cm, g * multiplier)
    gx = g * x
    tl.store(grad_scale_ptr + row * C + c, tl.sum(gx * z, axis=0), mask=cm)
    _put(grad_mu_ptr, H * W * C, 1, W * C, C, b, i, j, c, pm, cm, gx * ks * slope)


@triton.jit
def _scale_grad_kernel(grad_scale_ptr, scale_ptr, features_ptr, pooled_ptr, weight_ptr, grad_pooled_ptr,
                       grad_weight_ptr, kappa: tl.float64, mean_factor: tl.float64, var_factor: tl.float64, B, C,
                       TRAINING: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """From s = sigmoid(features · w): this channel block's share of w's gradient, and (training) the gradient of the
    pooled responses, (∂mean / B + ∂var · 2 (u − mean) / (B − 1)) / HW, as mean_factor and var_factor."""
    dtype = scale_ptr.dtype.element_ty
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    s = tl.load(scale_ptr + c, mask=cm, other=0)
    grad_logit = tl.load(grad_scale_ptr + c, mask=cm, other=0) * tl.full((), kappa, dtype) * s * (1 - s)
    if tl.program_id(1) == 0:
        f = tl.arange(0, 16)
        features = tl.load(features_ptr + c[:, None] * 10 + f[None, :], mask=cm[:, None] & (f < 10)[None, :], other=0)
        tl.store(grad_weight_ptr + tl.program_id(0) * 10 + f, tl.sum(features * grad_logit[:, None], 0), mask=f < 10)
    if TRAINING:
        k = tl.arange(0, 4)
        at, inside = _batch_block(tl.program_id(1) * BLOCK_B, c, cm, B, C, BLOCK_B)
        u = tl.load(pooled_ptr + at, mask=inside, other=0)
        mean = tl.load(features_ptr + c[:, None] * 10 + k[None, :], mask=cm[:, None], other=0)
        by_mean = tl.load(weight_ptr + k) * tl.full((), mean_factor, dtype)
        by_var = tl.load(weight_ptr + 4 + k) * tl.full((), var_factor, dtype)
        grad = grad_logit[None, :, None] * (by_mean[None, None, :] + by_var[None, None, :] * (u - mean[None, :, :]))
        tl.store(grad_pooled_ptr + at, grad, mask=inside)


@triton.jit
def _hidden_grad_kernel(grad_mu_ptr, hidden_ptr, lam_ptr, gam_ptr, partial_ptr, H, W, C, PARTIALS: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """grad_hidden = (λ₂ᵀ ⋆ grad_mu + γ₂ᵀ ⋆ Σ_c grad_mu / C) · [hidden > 0], written over hidden (each
    tile reads only its own pixels of it); PARTIALS: λ₂'s and γ₂'s gradients over the tile."""
    b, row, p, i, j, c, pm, cm = _tile(H, W, C, BLOCK_P, BLOCK_C)
    hidden = _at(hidden_ptr, H * W * C, 1, W * C, C, b, i, j, c, pm, cm, H, W)
    grad = _equivariant(grad_mu_ptr, H * W * C, 1, W * C, C, lam_ptr, gam_ptr, b, i, j, c, pm, cm, H, W, C, hidden,
                        partial_ptr + row * 72 + 9, -1, PARTIALS, BLOCK_P, BLOCK_C)
    _put(hidden_ptr, H * W * C, 1, W * C, C, b, i, j, c, pm, cm, grad * (hidden > 0).to(grad.dtype))


@triton.jit
def _statistics_grad(active_ptr, grad_pooled_ptr, stat_ptr, center, partial_ptr, b, i, j, c, pm, cm, H, W, C,
                     PARTIALS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Σ_k K_kᵀ ⋆ a_k, a_k = [K_k ⋆ x > 0] · ∂u_k (one value per map); PARTIALS: K_k's gradients over the
    tile."""
    k = tl.arange(0, 4)
    grad_pooled = tl.load(grad_pooled_ptr + (b * C + c)[:, None] * 4 + k[None, :], mask=cm[:, None], other=0)
    acc = tl.zeros((BLOCK_P, BLOCK_C), center.dtype)
    for t in tl.static_range(9):
        bits = _at(active_ptr, H * W * C, 1, W * C, C, b, i - (t // 3 - 1), j - (t % 3 - 1), c, pm, cm, H, W)
        a = ((bits.to(tl.int32)[:, :, None] >> k[None, None, :]) & 1).to(center.dtype) * grad_pooled[None, :, :]
        acc += tl.sum(a * tl.load(stat_ptr + 9 * k + t)[None, None, :], axis=2)
        if PARTIALS:
            tl.store(partial_ptr + 9 * k + t, tl.sum(tl.sum(a * center[:, :, None], axis=0), axis=0))
    return acc


@triton.jit
def _input_grad_kernel(x_ptr, xb, xc, xh, xw, grad_hidden_ptr, active_ptr, grad_pooled_ptr, lam_ptr, gam_ptr, stat_ptr,
                       grad_x_ptr, rb, rc, rh, rw, partial_ptr, H, W, C, TRAINING: tl.constexpr,
                       NEEDS_INPUT: tl.constexpr, PARTIALS: tl.constexpr, BLOCK_P: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """grad_x += λ₁ᵀ ⋆ grad_hidden + γ₁ᵀ ⋆ Σ_c grad_hidden / C (+ the statistics filters' path in
    training); PARTIALS: λ₁'s, γ₁'s and K's gradients over the tile."""
    b, row, p, i, j, c, pm, cm = _tile(H, W, C, BLOCK_P, BLOCK_C)
    x = _at(x_ptr, xb, xc, xh, xw, b, i, j, c, pm, cm, H, W)
    grad = _equivariant(grad_hidden_ptr, H * W * C, 1, W * C, C, lam_ptr, gam_ptr, b, i, j, c, pm, cm, H, W, C, x,
                        partial_ptr + row * 72, -1, PARTIALS, BLOCK_P, BLOCK_C)
    if TRAINING:
        grad += _statistics_grad(active_ptr, grad_pooled_ptr, stat_ptr, x, partial_ptr + row * 72 + 36, b, i, j, c, pm,
                                 cm, H, W, C, PARTIALS, BLOCK_P, BLOCK_C)
    if NEEDS_INPUT:
        grad += _at(grad_x_ptr, rb, rc, rh, rw, b, i, j, c, pm, cm, H, W)
        _put(grad_x_ptr, rb, rc, rh, rw, b, i, j, c, pm, cm, grad)


@triton.jit
def _normals_kernel(out_ptr, seed_ptr, n, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + index, tl.randn(tl.load(seed_ptr), index).to(out_ptr.dtype.element_ty), mask=index < n)


INTERPRETED = isinstance(_hidden_kernel, InterpretedFunction)  # triton.jit decided when this module was imported


class _Layout:
    """Tiles of a (B, C, H, W) map: `block_c` (every channel, a power of two) × `block_p` pixels; one program per
    (tile, image)."""

    def __init__(self, h: torch.Tensor):
        self.batch, self.channels, self.height, self.width = h.shape
        self.block_c = triton.next_power_of_2(self.channels)
        self.block_p = max(1, min(triton.next_power_of_2(self.height * self.width), _TILE // self.block_c))
        self.tiles = triton.cdiv(self.height * self.width, self.block_p)
        self.grid = (self.tiles, self.batch)
        self.blocks = {"BLOCK_P": self.block_p, "BLOCK_C": self.block_c}
        self.sizes = (self.height, self.width, self.channels)
        # the statistics kernels: blocks of channels, and of the batch within them
        self.stat_c = min(self.block_c, 64)
        self.stat_b = max(1, min(triton.next_power_of_2(self.batch), _STAT_BLOCK // self.stat_c))
        self.stat_blocks = {"BLOCK_B": self.stat_b, "BLOCK_C": self.stat_c}
        self.var_factor = 1.0 / (self.batch - 1) if self.batch > 1 else 0.0  # unbiased; 0 for a batch of one


def _on_device(function):
    """Runs `function` with its first tensor's GPU as the current device, which Triton launches on."""

    @functools.wraps(function)
    def run(tensor, *args):
        with torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext():
            return function(tensor, *args)

    return run


def _noise_arguments(h, noise, seed, quadrature):
    """The noise (or a stand-in that is never read) with its strides, the seed and the quadrature (likewise), and the
    kernels' DRAWN, EXPECTED and NODES."""
    expected = quadrature is not None
    modes = dict(DRAWN=noise is None and not expected, EXPECTED=expected,
                 NODES=quadrature.shape[1] if expected else 1)
    if noise is None:
        return (h, *h.stride(), seed if seed is not None else h, quadrature if expected else h), modes
    return (noise, *noise.stride(), h, h), modes


@_on_device
def forward(h, identity_kernels, mean_kernels, stat_kernels, scale_weight, running_mean, running_var, noise, seed,
            quadrature, noise_coeff, clip_value, channel_descriptor, spatial_descriptor, training):
    """(output, s, mean z, pooled responses, features), as `phi_cpu.cpp`'s forward."""
    layout = _Layout(h)
    lam, gam, stat = identity_kernels.contiguous(), mean_kernels.contiguous(), stat_kernels.contiguous()
    hidden = torch.empty_like(h, memory_format=torch.channels_last)
    partial = h.new_empty(layout.batch, layout.tiles, layout.channels, _FILTERS) if training else hidden
    _hidden_kernel[layout.grid](h, *h.stride(), lam[0], gam[0], stat, hidden, partial, hidden, *layout.sizes,
                                STATS=training, ACTIVE=False, **layout.blocks)
    pooled = partial.sum(1) if training else h.new_empty(0)
    features, scale = h.new_empty(layout.channels, _FEATURES), h.new_empty(layout.channels)
    _scale_kernel[(triton.cdiv(layout.channels, layout.stat_c),)](
        pooled if training else scale_weight, running_mean.contiguous(), running_var.contiguous(),
        scale_weight.contiguous(), features, scale, layout.batch, layout.channels, layout.var_factor,
        channel_descriptor, spatial_descriptor, TRAINING=training, **layout.stat_blocks)
    output, z_partial = torch.empty_like(h), h.new_empty(layout.tiles * layout.batch)
    noise_args, modes = _noise_arguments(h, noise, seed, quadrature)
    _output_kernel[layout.grid](h, *h.stride(), hidden, lam[1], gam[1], *noise_args, scale, output, *output.stride(),
                                z_partial, noise_coeff, clip_value or 0.0, 1.0 / h.numel(), *layout.sizes, **modes,
                                CLIP=clip_value is not None, **layout.blocks)
    return output, scale, z_partial.sum(), pooled, features


@_on_device
def backward(grad_output, h, identity_kernels, mean_kernels, stat_kernels, scale_weight, pooled, features, scale,
             noise, seed, quadrature, noise_coeff, clip_value, training, needs_input, needs_params):
    """Gradients of (h, λ, γ, K, w), None for those not asked for, as `phi_cpu.cpp`'s backward."""
    layout = _Layout(h)
    lam, gam, stat = identity_kernels.contiguous(), mean_kernels.contiguous(), stat_kernels.contiguous()
    hidden = torch.empty_like(h, memory_format=torch.channels_last)
    active = torch.empty_like(hidden, dtype=torch.uint8) if training else hidden
    _hidden_kernel[layout.grid](h, *h.stride(), lam[0], gam[0], stat, hidden, hidden, active, *layout.sizes,
                                STATS=False, ACTIVE=training, **layout.blocks)
    grad_mu = torch.empty_like(hidden)
    grad_x = torch.empty_like(h) if needs_input else h
    grad_scale_partial = h.new_empty(layout.batch * layout.tiles, layout.channels)
    noise_args, modes = _noise_arguments(h, noise, seed, quadrature)
    _through_noise_kernel[layout.grid](h, *h.stride(), grad_output, *grad_output.stride(), hidden, lam[1], gam[1],
                                       *noise_args, scale, grad_mu, grad_x, *grad_x.stride(), grad_scale_partial,
                                       noise_coeff, clip_value or 0.0, *layout.sizes, **modes,
                                       CLIP=clip_value is not None, NEEDS_INPUT=needs_input, **layout.blocks)
    channel_blocks = triton.cdiv(layout.channels, layout.stat_c)
    grad_pooled = h.new_empty(layout.batch, layout.channels, _FILTERS) if training else hidden
    grad_weight_partial = h.new_empty(channel_blocks, _FEATURES)
    hw = layout.height * layout.width
    _scale_grad_kernel[(channel_blocks, triton.cdiv(layout.batch, layout.stat_b) if training else 1)](
        grad_scale_partial.sum(0), scale, features, pooled if training else scale, scale_weight.contiguous(),
        grad_pooled, grad_weight_partial, noise_coeff, 1.0 / (layout.batch * hw), 2.0 * layout.var_factor / hw,
        layout.batch, layout.channels, TRAINING=training, **layout.stat_blocks)
    # λ₁ and γ₁ (and K) come from the last kernel, λ₂ and γ₂ from the one before; K has none in evaluation
    partial = (h.new_empty if training else h.new_zeros)(layout.batch * layout.tiles, _PARTIALS) if needs_params else h
    _hidden_grad_kernel[layout.grid](grad_mu, hidden, lam[1], gam[1], partial, *layout.sizes, PARTIALS=needs_params,
                                     **layout.blocks)
    _input_grad_kernel[layout.grid](h, *h.stride(), hidden, active, grad_pooled, lam[0], gam[0], stat, grad_x,
                                    *grad_x.stride(), partial, *layout.sizes, TRAINING=training,
                                    NEEDS_INPUT=needs_input, PARTIALS=needs_params, **layout.blocks)
    if not needs_params:
        return grad_x if needs_input else None, None, None, None, None
    sums = partial.sum(0, dtype=torch.float64).to(h.dtype).view(8, 1, 3, 3)
    grad_lam, grad_gam, grad_stat = (part.clone() for part in sums.split([2, 2, 4]))
    grad_weight = grad_weight_partial.sum(0, dtype=torch.float64).to(h.dtype)
    return grad_x if needs_input else None, grad_lam, grad_gam, grad_stat, grad_weight


@_on_device
def normals(like: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """The standard normals a call with `seed` draws for features shaped like `like`, as a channels-last tensor."""
    out = torch.empty_like(like, memory_format=torch.channels_last)
    _normals_kernel[(triton.cdiv(out.numel(), _NOISE_BLOCK),)](out, seed, out.numel(), BLOCK=_NOISE_BLOCK)
    return out
