"""Optional fused kernels for φ, reached lazily by the modeling code, which falls back to eager without them.

The CPU kernel (`phi_cpu.cpp`) computes one site's forward and backward in one pass per direction over the feature
map (plus a pass for the batch statistics in each), image by image in cache, instead of the ~57 full-size kernel
launches of the eager path; it saves only the input and recomputes the rest in the backward. It is a C++ extension built on first use with `torch.utils.cpp_extension.load` (cached
under `$TORCH_EXTENSIONS_DIR` or `~/.cache/metaperturb_hf`), and registered as the custom ops
`metaperturb::phi_forward` / `metaperturb::phi_backward`, so `torch.compile` traces through φ.

Which path runs: `METAPERTURB_KERNEL=auto|eager|cpu` (or `phi.kernel` / `phi(..., kernel=...)`). `auto` uses the
kernel where it built and passed a one-time self-check against eager, else eager with one log line saying why;
`cpu` insists (an error if it cannot be built or fails the check). Either way the kernel only takes what it
implements: float32/float64 CPU features with φ in the same precision, 3×3 kernels and four statistics filters, drawn
or explicit noise. The expected-noise mode, other devices and dtypes, and a backward that is itself differentiated
(create_graph, lookahead meta-training: it reruns φ's eager math on the same noise) use the eager code.
"""

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("phi_cpu.cpp")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]
_lock = threading.Lock()
_state: dict = {}  # "extension" or "error"; "checked": True or the self-check's failure


def _build_directory(name: str) -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "metaperturb_hf"
    return Path(root) / name


def _extension():
    """The compiled module, built on the first call (and cached on disk, keyed by source, flags, torch and CPU)."""
    with _lock:
        if "extension" in _state or "error" in _state:
            return _state.get("extension")
        from torch.utils.cpp_extension import load

        # -march=native: the key carries the CPU's model so that a shared cache never serves another CPU's build.
        key = hashlib.sha256(b"".join([_SOURCE.read_bytes(), " ".join(_FLAGS).encode(), torch.__version__.encode(),
                                      _cpu_model().encode()])).hexdigest()[:16]
        name = f"metaperturb_phi_cpu_{key}"
        directory = _build_directory(name)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            _state["extension"] = load(name=name, sources=[str(_SOURCE)], extra_cflags=_FLAGS,
                                       extra_ldflags=["-fopenmp"], build_directory=str(directory), verbose=False)
        except Exception as error:  # no compiler, no ninja, a failed build: all mean "use eager"
            _state["error"] = _summary(error)
        return _state.get("extension")


def _summary(error: Exception) -> str:
    """The line of a build failure that says what failed (the compiler's first error, else the last line)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "")
    return f"{type(error).__name__}: {reason}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


@torch.library.custom_op("metaperturb::phi_forward", mutates_args=())
def phi_forward(h: Tensor, identity_kernels: Tensor, mean_kernels: Tensor, stat_kernels: Tensor, scale_weight: Tensor,
                running_mean: Tensor, running_var: Tensor, noise: Optional[Tensor], seed: Optional[Tensor],
                noise_coeff: float, clip_value: Optional[float], channel_descriptor: float, spatial_descriptor: float,
                training: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """φ's fused forward: (output, s, mean z, pooled responses, features)."""
    return tuple(_extension().forward(h, identity_kernels, mean_kernels, stat_kernels, scale_weight, running_mean,
                                      running_var, noise, seed, noise_coeff, clip_value, channel_descriptor,
                                      spatial_descriptor, training))


@phi_forward.register_fake
def _(h, identity_kernels, mean_kernels, stat_kernels, scale_weight, running_mean, running_var, noise, seed,
      noise_coeff, clip_value, channel_descriptor, spatial_descriptor, training):
    batch, channels = h.shape[:2]
    filters = stat_kernels.shape[0]
    return (torch.empty_like(h), h.new_empty(channels), h.new_empty(()),
            h.new_empty(batch, channels, filters) if training else h.new_empty(0),
            h.new_empty(channels, 2 * filters + 2))


@torch.library.custom_op("metaperturb::phi_backward", mutates_args=())
def phi_backward(grad_output: Tensor, h: Tensor, identity_kernels: Tensor, mean_kernels: Tensor, stat_kernels: Tensor,
                 scale_weight: Tensor, pooled: Tensor, features: Tensor, scale: Tensor, noise: Optional[Tensor], seed: Optional[Tensor], noise_coeff: float, clip_value: Optional[float],
                 training: bool, needs_input: bool, needs_params: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """φ's fused backward: gradients of (h, λ, γ, K, w); empty tensors for those not asked for."""
    grads = _extension().backward(grad_output, h, identity_kernels, mean_kernels, stat_kernels, scale_weight, pooled,
                                  features, scale, noise, seed, noise_coeff, clip_value, training,
                                  needs_input, needs_params)
    return tuple(h.new_empty(0) if grad is None else grad for grad in grads)


@phi_backward.register_fake
def _(grad_output, h, identity_kernels, mean_kernels, stat_kernels, scale_weight, pooled, features, scale, noise, seed, noise_coeff, clip_value, training, needs_input, needs_params):
    params = (identity_kernels, mean_kernels, stat_kernels, scale_weight)
    return (torch.empty_like(h) if needs_input else h.new_empty(0),
            *(torch.empty_like(p) if needs_params else h.new_empty(0) for p in params))


def _setup_context(ctx, inputs, output):
    (h, identity_kernels, mean_kernels, stat_kernels, scale_weight, _, _, noise, seed, noise_coeff, clip_value,
     channel_descriptor, spatial_descriptor, training) = inputs
    _, scale, noise_mean, pooled, features = output
    ctx.mark_non_differentiable(scale, noise_mean, pooled, features)
    ctx.save_for_backward(h, identity_kernels, mean_kernels, stat_kernels, scale_weight, pooled, features, scale,
                          noise, seed)
    ctx.options = (noise_coeff, clip_value, (channel_descriptor, spatial_descriptor), training)


def _backward(ctx, grad_output, *unused_grads):
    h, identity_kernels, mean_kernels, stat_kernels, scale_weight, pooled, features, scale, noise, seed = (
        ctx.saved_tensors)
    noise_coeff, clip_value, descriptors, training = ctx.options
    needs_input, needs_params = ctx.needs_input_grad[0], any(ctx.needs_input_grad[1:5])
    nones = (None,) * 10
    if grad_output is None or not (needs_input or needs_params):
        return (None,) * 5 + nones
    if torch.is_grad_enabled():  # create_graph: differentiate φ's eager math on the same noise instead
        return (*_differentiable_backward(ctx, grad_output), *nones)
    grads = phi_backward(grad_output, h, identity_kernels, mean_kernels, stat_kernels, scale_weight, pooled, features,
                         scale, noise, seed, noise_coeff, clip_value, training, needs_input, needs_params)
    grad_input, grad_identity, grad_mean, grad_stat, grad_weight = (
        grad if needed else None for grad, needed in zip(grads, (needs_input, *(needs_params,) * 4)))
    # as eager: in evaluation the statistics filters are not used, so they get no gradient (not a zero one)
    return (grad_input, grad_identity, grad_mean, grad_stat if training else None, grad_weight, *nones)


def _differentiable_backward(ctx, grad_output):
    from ..modeling_metaperturb import _differentiable_output, _Settings

    h, identity_kernels, mean_kernels, stat_kernels, scale_weight, _, features, _, noise, seed = ctx.saved_tensors
    noise_coeff, clip_value, descriptors, training = ctx.options
    if noise is None:
        noise = _extension().normals(h, seed)
    settings = _Settings(noise_coeff, clip_value, descriptors, False, 0, training, 0.0, False, False)
    differentiable = [h, identity_kernels, mean_kernels, stat_kernels, scale_weight]
    output = _differentiable_output(*differentiable, features, noise, None, settings, clip_value is not None)
    wanted = [tensor for tensor, needed in zip(differentiable, ctx.needs_input_grad) if needed]
    grads = iter(torch.autograd.grad(output, wanted, grad_output, create_graph=True, allow_unused=True))
    return [next(grads) if needed else None for needed in ctx.needs_input_grad[:5]]


phi_forward.register_autograd(_backward, setup_context=_setup_context)


def perturb(h, identity_kernels, mean_kernels, stat_kernels, scale_weight, running_mean, running_var, noise, settings):
    """φ through the fused op, with the running-statistics update (outside the op, which stays functional).

    The op saves only the input (and the noise's seed, or the explicit noise) and its backward recomputes the rest,
    so activation checkpointing changes nothing here: it is what the fused path always does.
    """
    seed = None if noise is not None else torch.randint(2**62, (), dtype=torch.int64)
    output, scale, noise_mean, _, features = phi_forward(
        h, identity_kernels, mean_kernels, stat_kernels, scale_weight, running_mean, running_var, noise, seed,
        settings.noise_coeff, settings.clip_value, *settings.descriptors, settings.training)
    if settings.training:
        filters = stat_kernels.shape[0]
        with torch.no_grad():
            running_mean.lerp_(features[:, :filters].to(running_mean.dtype), settings.stat_momentum)
            running_var.lerp_(features[:, filters:2 * filters].to(running_var.dtype), settings.stat_momentum)
    return output, scale, noise_mean


def unsupported(h, parameters, running_mean, running_var, noise, settings) -> Optional[str]:
    """Why the fused kernel does not implement this call, or None when it does."""
    if settings.expected_noise:
        return "the expected-noise mode"
    if h.device.type != "cpu":
        return f"features on {h.device}"
    if h.dtype not in (torch.float32, torch.float64):
        return f"{h.dtype} features"
    tensors = [*parameters, running_mean, running_var] + ([noise] if noise is not None else [])
    if any(t.dtype != h.dtype or t.device != h.device for t in tensors):
        return "φ, its statistics or the noise in another precision than the features"
    identity_kernels, _, stat_kernels, _ = parameters
    if tuple(identity_kernels.shape[-2:]) != (3, 3) or stat_kernels.shape[0] != 4:
        return "kernels other than 3×3 or other than four statistics filters"
    return None


def select(choice: str, h, parameters, running_mean, running_var, noise, settings):
    """`perturb` when `choice` and this call allow the fused kernel, else None (the eager path)."""
    if choice == "eager" or unsupported(h, parameters, running_mean, running_var, noise, settings):
        return None
    if _state.get("checked") is not True and torch._C._functorch.peek_interpreter_stack() is not None:
        return None  # the one-time self-check cannot run inside torch.func: this call goes eager, a later one checks
    problem = availability()
    if problem is None:
        return perturb
    if choice == "cpu":
        raise RuntimeError(f"METAPERTURB_KERNEL=cpu, but φ's fused CPU kernel is not usable: {problem}")
    if not _state.get("logged"):
        _state["logged"] = True
        logger.warning("φ runs on the eager path: the fused CPU kernel %s", problem)
    return None


def availability() -> Optional[str]:
    """None when the kernel built and passed its self-check; otherwise what went wrong."""
    if _state.get("checked") is True:  # the settled answer without the build lock, which torch.compile cannot trace
        return None
    if _extension() is None:
        return f"could not be built ({_state['error']})"
    if "checked" not in _state:
        _state["checked"] = True  # while the check runs, its own calls take the kernel
        try:
            result = _self_check()
        except Exception as error:  # a check that cannot even run is a failed one
            result = f"{type(error).__name__}: {error}"
        _state["checked"] = result
    return None if _state["checked"] is True else f"failed its self-check against eager ({_state['checked']})"


def _self_check():
    """True when output, running statistics and every gradient match the eager path on a small random case."""
    with torch.random.fork_rng(devices=[]), torch.enable_grad():  # the check must not shift the caller's seeds
        return _compare_with_eager()


def _compare_with_eager():
    from ..configuration_metaperturb import MetaPerturbConfig
    from ..modeling_metaperturb import MetaPerturbModel

    generator = torch.Generator().manual_seed(0)
    phi = MetaPerturbModel(MetaPerturbConfig(initializer_range=0.5)).double().train()
    with torch.no_grad():
        for parameter in phi.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * 0.5)
    h = torch.randn(3, 5, 6, 7, generator=generator, dtype=torch.float64)
    noise, upstream = (torch.randn(h.shape, generator=generator, dtype=torch.float64) for _ in range(2))

    def run(kernel):
        phi.zero_grad()
        x = h.clone().requires_grad_()
        mean, var = torch.zeros(5, 4, dtype=torch.float64), torch.ones(5, 4, dtype=torch.float64)
        out = phi(x, mean, var, 16, 8, noise_coeff=0.7, noise=noise, clip_value=0.5, kernel=kernel)  # clamp reached
        out.backward(upstream)
        return [out.detach(), mean, var, x.grad, *(p.grad for p in phi.parameters())]

    fused, eager = run("cpu"), run("eager")
    for name, a, b in zip(["output", "running mean", "running var", "input gradient", "λ", "γ", "K", "w"], fused, eager):
        if not torch.allclose(a, b, rtol=1e-7, atol=1e-9):
            return f"{name} differs by {(a - b).abs().max().item():.3g}"
    return True


__all__ = ["availability", "perturb", "phi_backward", "phi_forward", "select", "unsupported"]
