"""Optional fused kernels for φ, reached lazily by the modeling code, which falls back to eager without them.

Two implementations of the custom ops `metaperturb::phi_forward` / `metaperturb::phi_backward` (so `torch.compile`
traces through φ), each computing one site's forward and backward in a few passes over the feature map instead of the
~57 full-size kernel launches of the eager path. Both save only the input and recompute the rest in the backward, and
draw the noise from a counter-based generator keyed by a per-call seed and each element's index, so the backward
regenerates it; an explicit `noise=` is honoured.

- `cpu` (`phi_cpu.cpp`): one pass per direction (plus one for the batch statistics), image by image in cache,
  Philox4x32-10. A C++ extension built on first use with `torch.utils.cpp_extension.load` (cached under
  `$TORCH_EXTENSIONS_DIR` or `~/.cache/metaperturb_hf`).
- `triton` (`phi_triton.py`, `pip install metaperturb-hf[triton]`): Triton kernels for CUDA tensors, noise from
  `tl.randn`. The seed is a tensor on the device and nothing waits for the device, so CUDA graphs can capture φ.
  Under Triton's interpreter (`TRITON_INTERPRET=1` before the kernels are first used) it takes CPU tensors instead:
  how it is tested without a GPU.

Which path runs: `METAPERTURB_KERNEL=auto|eager|cpu|triton` (or `phi.kernel` / `phi(..., kernel=...)`). `auto` takes
the kernel of the features' device (`triton` on CUDA, `cpu` elsewhere) where it loads and passed a one-time self-check
against eager, else eager with one log line saying why; `cpu` and `triton` insist (an error if that kernel cannot be
loaded or fails the check). Either way a kernel only takes what it implements: float32/float64 features on its device
with φ in the same precision, 3×3 kernels and four statistics filters, drawn or explicit noise or the expected-noise
mode of the single pass (eager's 8-node Gauss–Hermite rule: the CPU kernel shares one exponential among the nodes), and
for Triton at most 4096 channels (a tile holds every channel of its pixels). Other devices and dtypes, another node
count, and a backward that is itself differentiated (create_graph, lookahead meta-training: it reruns φ's eager math on
the same noise) use the eager code.
"""

import functools
import hashlib
import logging
import os
import platform
import threading
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("phi_cpu.cpp")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]
_MAX_TRITON_CHANNELS = 4096  # a Triton tile holds every channel of its pixels
EXPECTED_NOISE_NODES = 8  # the expected-noise mode's Gauss–Hermite nodes, fixed in the kernels (kNodes in phi_cpu.cpp)
_NAMES = {"cpu": ("CPU kernel", "built"), "triton": ("Triton kernel", "loaded")}  # for messages: what, and its failure
_lock = threading.Lock()
# per kernel: "module" or "error"; "checked": True or the self-check's failure; "logged" once eager was announced
_states: dict = {kernel: {} for kernel in _NAMES}


def _build_directory(name: str) -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "metaperturb_hf"
    return Path(root) / name


def _extension(kernel: str = "cpu"):
    """The kernel's module (`forward`, `backward`, `normals`), loaded on the first call; None where it cannot be."""
    state = _states[kernel]
    with _lock:
        if "module" in state or "error" in state:
            return state.get("module")
        try:
            state["module"] = _build_cpu() if kernel == "cpu" else _import_triton()
        except Exception as error:  # no compiler, no ninja, a failed build, no triton: all mean "use eager"
            state["error"] = _summary(error)
        return state.get("module")


def _build_cpu():
    """The compiled CPU module, cached on disk (keyed by source, flags, torch and CPU)."""
    from torch.utils.cpp_extension import load

    # -march=native: the key carries the CPU's model so that a shared cache never serves another CPU's build.
    key = hashlib.sha256(b"".join([_SOURCE.read_bytes(), " ".join(_FLAGS).encode(), torch.__version__.encode(),
                                  _cpu_model().encode()])).hexdigest()[:16]
    name = f"metaperturb_phi_cpu_{key}"
    directory = _build_directory(name)
    directory.mkdir(parents=True, exist_ok=True)
    return load(name=name, sources=[str(_SOURCE)], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
                build_directory=str(directory), verbose=False)


def _import_triton():
    from . import phi_triton

    return phi_triton


def _triton_devices() -> tuple[str, ...]:
    """Triton runs on CUDA tensors, and on CPU tensors only through its interpreter."""
    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


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
                running_mean: Tensor, running_var: Tensor, noise: Tensor | None, seed: Tensor | None,
                quadrature: Tensor | None, noise_coeff: float, clip_value: float | None, channel_descriptor: float,
                spatial_descriptor: float, training: bool, kernel: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """φ's fused forward on `kernel` ("cpu" or "triton"): (output, s, mean z, pooled responses, features).

    `quadrature` (Gauss–Hermite nodes and weights, shape (2, 8)) asks for the expected-noise mode; noise and seed are
    then None."""
    return tuple(_extension(kernel).forward(h, identity_kernels, mean_kernels, stat_kernels, scale_weight,
                                            running_mean, running_var, noise, seed, quadrature, noise_coeff, clip_value,
                                            channel_descriptor, spatial_descriptor, training))


@phi_forward.register_fake
def _(h, identity_kernels, mean_kernels, stat_kernels, scale_weight, running_mean, running_var, noise, seed, quadrature,
      noise_coeff, clip_value, channel_descriptor, spatial_descriptor, training, kernel):
    batch, channels = h.shape[:2]
    filters = stat_kernels.shape[0]
    return (torch.empty_like(h), h.new_empty(channels), h.new_empty(()),
            h.new_empty(batch, channels, filters) if training else h.new_empty(0),
            h.new_empty(channels, 2 * filters + 2))


@torch.library.custom_op("metaperturb::phi_backward", mutates_args=())
def phi_backward(grad_output: Tensor, h: Tensor, identity_kernels: Tensor, mean_kernels: Tensor, stat_kernels: Tensor,
                 scale_weight: Tensor, pooled: Tensor, features: Tensor, scale: Tensor, noise: Tensor | None,
                 seed: Tensor | None, quadrature: Tensor | None, noise_coeff: float, clip_value: float | None,
                 training: bool, needs_input: bool, needs_params: bool, kernel: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """φ's fused backward on `kernel`: gradients of (h, λ, γ, K, w); empty tensors for those not asked for."""
    grads = _extension(kernel).backward(grad_output, h, identity_kernels, mean_kernels, stat_kernels, scale_weight,
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
        noise = _extension(kernel).normals(h, seed)
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


def unsupported(h, parameters, running_mean, running_var, noise, settings, kernel="cpu") -> str | None:
    """Why the fused `kernel` does not implement this call, or None when it does."""
    if settings.expected_noise and settings.expected_noise_nodes != EXPECTED_NOISE_NODES:
        return (f"the expected-noise mode with {settings.expected_noise_nodes} nodes "
                f"(the kernels have {EXPECTED_NOISE_NODES})")
    if h.device.type not in (("cpu",) if kernel == "cpu" else _triton_devices()):
        return f"features on {h.device}"
    if h.dtype not in (torch.float32, torch.float64):
        return f"{h.dtype} features"
    tensors = [*parameters, running_mean, running_var] + ([noise] if noise is not None else [])
    if any(t.dtype != h.dtype or t.device != h.device for t in tensors):
        return "φ, its statistics or the noise in another precision than the features"
    identity_kernels, _, stat_kernels, _ = parameters
    if tuple(identity_kernels.shape[-2:]) != (3, 3) or stat_kernels.shape[0] != 4:
        return "kernels other than 3×3 or other than four statistics filters"
    if kernel == "triton" and h.shape[1] > _MAX_TRITON_CHANNELS:
        return f"more than {_MAX_TRITON_CHANNELS} channels"
    return None


def select(choice: str, h, parameters, running_mean, running_var, noise, settings):
    """`perturb` on the kernel that `choice` and this call allow, else None (the eager path)."""
    if choice == "eager":
        return None
    kernel = choice if choice != "auto" else "triton" if h.device.type == "cuda" else "cpu"
    if unsupported(h, parameters, running_mean, running_var, noise, settings, kernel):
        return None
    state = _states[kernel]
    if state.get("checked") is not True:
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return None  # the self-check cannot run inside torch.func: this call goes eager, a later one checks
        unchecked = "checked" not in state and "error" not in state
        if unchecked and h.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("φ's Triton kernel checks itself against eager on its first call, which cannot run "
                               "during CUDA-graph capture: run φ once before capturing (a warm-up step).")
    problem = availability(kernel)
    if problem is None:
        return functools.partial(perturb, kernel=kernel)
    name = _NAMES[kernel][0]
    if choice != "auto":
        raise RuntimeError(f"METAPERTURB_KERNEL={choice}, but φ's fused {name} is not usable: {problem}")
    if not state.get("logged"):
        state["logged"] = True
        logger.warning("φ runs on the eager path: the fused %s %s", name, problem)
    return None


def availability(kernel: str = "cpu") -> str | None:
    """None when `kernel` loaded and passed its self-check; otherwise what went wrong."""
    state = _states[kernel]
    if state.get("checked") is True:  # the settled answer without the build lock, which torch.compile cannot trace
        return None
    if _extension(kernel) is None:
        return f"could not be {_NAMES[kernel][1]} ({state['error']})"
    if "checked" not in state:
        state["checked"] = True  # while the check runs, its own calls take the kernel
        try:
            result = _self_check(kernel)
        except Exception as error:  # a check that cannot even run is a failed one
            result = f"{type(error).__name__}: {error}"
        state["checked"] = result
    return None if state["checked"] is True else f"failed its self-check against eager ({state['checked']})"


def _self_check(kernel: str):
    """True when output, running statistics and every gradient match the eager path on a small random case."""
    with torch.random.fork_rng(devices=[]), torch.enable_grad():  # the check must not shift the caller's seeds
        return _compare_with_eager(kernel)


def _compare_with_eager(kernel: str):
    from ..configuration_metaperturb import MetaPerturbConfig
    from ..modeling_metaperturb import MetaPerturbModel

    device = "cpu" if kernel == "cpu" or "cpu" in _triton_devices() else "cuda"  # Triton: CPU under its interpreter
    generator = torch.Generator().manual_seed(0)
    phi = MetaPerturbModel(MetaPerturbConfig(initializer_range=0.5)).double().train()
    with torch.no_grad():
        for parameter in phi.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * 0.5)
    phi.to(device)
    h, noise, upstream = (torch.randn(3, 5, 6, 7, generator=generator, dtype=torch.float64).to(device)
                          for _ in range(3))

    def run(path, expected):
        phi.zero_grad()
        x = h.clone().requires_grad_()
        mean, var = h.new_zeros(5, 4), h.new_ones(5, 4)
        out = phi(x, mean, var, 16, 8, noise_coeff=0.7, noise=None if expected else noise, clip_value=0.5,
                  expected_noise=expected, kernel=path)  # the clamp is reached
        out.backward(upstream)
        return [out.detach(), mean, var, x.grad, *(p.grad for p in phi.parameters())]

    names = ["output", "running mean", "running var", "input gradient", "λ", "γ", "K", "w"]
    for expected, mode in ((False, ""), (True, " in the expected-noise mode")):
        for name, a, b in zip(names, run(kernel, expected), run("eager", expected)):
            if not torch.allclose(a, b, rtol=1e-7, atol=1e-9):
                return f"{name}{mode} differs by {(a - b).abs().max().item():.3g}"
    return True


__all__ = ["availability", "perturb", "phi_backward", "phi_forward", "select", "unsupported"]
