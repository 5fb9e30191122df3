"""Which path runs φ: a fused kernel where the call is one it implements and the kernel passed its self-check
against eager, else eager."""

import functools
import logging

import torch

from .loading import NAMES, extension, states, triton_devices
from .ops import EXPECTED_NOISE_NODES, perturb

logger = logging.getLogger(__name__)

_MAX_TRITON_CHANNELS = 4096  # a Triton tile holds every channel of its pixels


def unsupported(h, parameters, running_mean, running_var, noise, settings, kernel="cpu") -> str | None:
    """Why the fused `kernel` does not implement this call, or None when it does."""
    if settings.expected_noise and settings.expected_noise_nodes != EXPECTED_NOISE_NODES:
        return (f"the expected-noise mode with {settings.expected_noise_nodes} nodes "
                f"(the kernels have {EXPECTED_NOISE_NODES})")
    if h.device.type not in (("cpu",) if kernel == "cpu" else triton_devices()):
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
    state = states[kernel]
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
    name = NAMES[kernel][0]
    if choice != "auto":
        raise RuntimeError(f"METAPERTURB_KERNEL={choice}, but φ's fused {name} is not usable: {problem}")
    if not state.get("logged"):
        state["logged"] = True
        logger.warning("φ runs on the eager path: the fused %s %s", name, problem)
    return None


def availability(kernel: str = "cpu") -> str | None:
    """None when `kernel` loaded and passed its self-check; otherwise what went wrong."""
    state = states[kernel]
    if state.get("checked") is True:  # the settled answer without the build lock, which torch.compile cannot trace
        return None
    if extension(kernel) is None:
        return f"could not be {NAMES[kernel][1]} ({state['error']})"
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

    device = "cpu" if kernel == "cpu" or "cpu" in triton_devices() else "cuda"  # Triton: CPU under its interpreter
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

