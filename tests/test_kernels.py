"""φ's fused CPU kernel against the eager path: outputs, running statistics, every gradient, drawn noise, compile.

The checks take the kernel and the device, so that `test_triton_kernels.py` runs the same ones on the Triton kernel.
"""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaperturb_hf import MetaPerturbConfig, MetaPerturbModel, add_perturbation
from metaperturb_hf.architectures import create_model
from metaperturb_hf.kernels import loading
from metaperturb_hf.modeling_metaperturb import NonFiniteFeaturesError

pytestmark = pytest.mark.usefixtures("fused_kernel", "one_thread")


def make_phi(dtype=torch.float32):
    torch.manual_seed(0)
    return MetaPerturbModel(MetaPerturbConfig(initializer_range=0.3)).to(dtype)


def run(phi, kernel, h, noise, *, training=True, kappa=1.0, clip=None, seed=None, input_grad=True, expected=False):
    """Output, running statistics and the gradients of input, λ, γ, K, w for one call with the given path."""
    phi.train(training)
    phi.zero_grad()
    x = h.clone().requires_grad_(input_grad)
    generator = torch.Generator().manual_seed(1)
    channels = h.shape[1]
    mean = torch.rand(channels, 4, generator=generator, dtype=h.dtype).to(h.device)
    var = torch.rand(channels, 4, generator=generator, dtype=h.dtype).to(h.device)
    if seed is not None:
        torch.manual_seed(seed)
    out = phi(x, mean, var, 64, 32, noise_coeff=kappa, noise=noise, clip_value=clip, expected_noise=expected,
              kernel=kernel)
    upstream = torch.randn(out.shape, generator=generator, dtype=h.dtype).to(h.device)
    (out * upstream).sum().backward()
    grads = {name: p.grad for name, p in phi.named_parameters()}
    return {"output": out.detach(), "running_mean": mean, "running_var": var, "input": x.grad, **grads}


def assert_same(fused, eager, tolerance=1e-5):
    assert fused.keys() == eager.keys()
    for name, reference in eager.items():
        if reference is None:
            assert fused[name] is None, f"{name}: eager gives no gradient, the kernel does"
            continue
        scale = max(1.0, reference.abs().max().item())  # sums over whole maps: relative to their size
        torch.testing.assert_close(fused[name], reference, rtol=tolerance, atol=tolerance * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")
        assert fused[name].stride() == reference.stride(), f"{name} has another layout"


CASES = {
    # name: (shape, training, κ, clip, channels_last, dtype)
    "train": ((4, 16, 7, 7), True, 1.0, None, True, torch.float32),
    "eval": ((4, 16, 7, 7), False, 1.0, None, True, torch.float32),
    "clip_reached": ((3, 5, 3, 5), True, 1.0, 0.3, False, torch.float64),
    "clip_not_reached": ((3, 5, 3, 5), True, 1.0, 1e6, False, torch.float64),
    "kappa_0": ((2, 6, 7, 7), True, 0.0, None, False, torch.float64),
    "kappa_0.3": ((2, 6, 7, 7), True, 0.3, None, True, torch.float64),
    "kappa_0.3_eval_clip": ((2, 6, 7, 7), False, 0.3, 0.3, False, torch.float64),
    "one_channel": ((5, 1, 6, 6), True, 1.0, None, False, torch.float64),
    "batch_of_one": ((1, 8, 5, 5), True, 1.0, None, True, torch.float64),
    "one_by_one": ((6, 20, 1, 1), True, 0.7, None, False, torch.float32),
    "512_channels": ((2, 512, 3, 5), True, 1.0, None, True, torch.float32),
    "64_channels_32x32": ((2, 64, 32, 32), True, 1.0, None, True, torch.float32),
    "16_channels_32x32_contiguous": ((4, 16, 32, 32), True, 0.3, None, False, torch.float32),
    "rows_across_tiles": ((2, 16, 9, 11), True, 0.3, None, False, torch.float32),  # Triton: a tile ends mid-row
}


def check_case(case, kernel, device="cpu", expected=False):
    """One CASES entry on `kernel` against eager, with the same explicit noise (or none: the expected-noise mode)."""
    shape, training, kappa, clip, channels_last, dtype = CASES[case]
    phi = make_phi(dtype).to(device)
    generator = torch.Generator().manual_seed(2)
    h = (torch.randn(shape, generator=generator, dtype=dtype) * 2).to(device)
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last)
    noise = None if expected else torch.randn(shape, generator=generator, dtype=dtype).to(device)
    options = dict(training=training, kappa=kappa, clip=clip, expected=expected)
    fused, eager = run(phi, kernel, h, noise, **options), run(phi, "eager", h, noise, **options)
    if clip is not None and clip < 1:
        assert (eager["output"] == clip).any(), "the clamp must be reached for this case to test it"
    assert_same(fused, eager)


@pytest.mark.parametrize("case", CASES)
def test_fused_kernel_matches_eager_with_explicit_noise(case):
    check_case(case, "cpu")


# the single pass's cases: evaluation mostly, but training and the clamp too (the backward is implemented as well)
EXPECTED_CASES = ["train", "eval", "clip_reached", "kappa_0.3_eval_clip", "512_channels", "64_channels_32x32",
                  "rows_across_tiles"]


@pytest.mark.parametrize("case", EXPECTED_CASES)
def test_fused_kernel_matches_eager_in_the_expected_noise_mode(case, fused_kernel, monkeypatch):
    calls = []
    monkeypatch.setattr(fused_kernel, "perturb", lambda *args, _run=fused_kernel.perturb, **kwargs:
                        calls.append(kwargs["kernel"]) or _run(*args, **kwargs))
    check_case(case, "cpu", expected=True)
    assert calls == ["cpu"], "the expected-noise mode ran eager, not on the kernel"


def check_expected_noise_at_extremes(kernel, device="cpu", dtype=torch.float64, spread=40.0, tolerance=1e-9):
    """E[softplus(μ + ε)] where μ is far out (the exponentials' clamp, softplus' threshold, the ends of float32's
    table) and near 0; `spread` scales the input and so μ's range."""
    phi = make_phi(dtype).to(device)
    h = (torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(0), dtype=dtype) * spread).to(device)
    with torch.no_grad():  # μ = 5 ReLU(h) − 10 mean_c ReLU(h) (centre taps only): spread × 2.5 either side of 0
        for parameter in (phi.identity_kernels, phi.mean_kernels):
            parameter.zero_()
        phi.identity_kernels.view(2, 9)[:, 4] = torch.tensor([1.0, 5.0])
        phi.mean_kernels.view(2, 9)[1, 4] = -10.0
    mu = _eager_mu(phi, h)
    assert mu.min() < -2.5 * spread and mu.max() > 2.5 * spread and (mu.abs() < 1).any()
    assert_same(run(phi, kernel, h, None, expected=True, training=False),
                run(phi, "eager", h, None, expected=True, training=False), tolerance=tolerance)


def test_expected_noise_at_extreme_arguments():
    check_expected_noise_at_extremes("cpu")


@pytest.mark.parametrize("spread", [40.0, 4.0])  # beyond float32's table on both sides; across its inside
def test_expected_noise_in_float32_matches_the_rule(spread):
    check_expected_noise_at_extremes("cpu", dtype=torch.float32, spread=spread, tolerance=1e-5)


def check_flat_features(kernel, device="cpu"):
    phi = make_phi().to(device)
    h, noise = torch.randn(6, 20, device=device), torch.randn(6, 20, device=device)
    assert_same(run(phi, kernel, h, noise), run(phi, "eager", h, noise))


def test_flat_features_match_eager():
    check_flat_features("cpu")


def check_only_the_wanted_gradients(kernel, device="cpu"):
    """A frozen φ (transfer: only the input's gradient) and features that need none (only φ's)."""
    phi = make_phi().to(device)
    h, noise = torch.randn(3, 6, 5, 5, device=device), torch.randn(3, 6, 5, 5, device=device)
    for frozen in (True, False):
        phi.requires_grad_(not frozen)
        assert_same(run(phi, kernel, h, noise, clip=1.0, input_grad=frozen),
                    run(phi, "eager", h, noise, clip=1.0, input_grad=frozen))
    phi.requires_grad_(True)


def test_only_the_wanted_gradients():
    check_only_the_wanted_gradients("cpu")


def test_broken_features_are_the_error_eager_raises():
    """The kernel refuses NaN features with a plain ValueError; φ passes it on as eager's NonFiniteFeaturesError,
    the type the single pass's choice of statistics catches."""
    h = torch.randn(2, 3, 6, 6)
    h[1, 2, 3, 4] = float("nan")
    for kernel in ("cpu", "eager"):
        with pytest.raises(NonFiniteFeaturesError, match="NaN or Inf"):
            run(make_phi(), kernel, h, None, input_grad=False)


def normals(kernel, like, seed):
    """The noise that `kernel` draws for features like `like` from `seed` (a tensor on their device)."""
    return loading.extension(kernel).normals(like, seed)


def check_standard_normal_draws(kernel, device="cpu"):
    like = torch.empty(16, 32, 16, 16, device=device)
    draws = normals(kernel, like, torch.tensor(11, device=device))
    assert abs(draws.mean().item()) < 0.01 and abs(draws.var().item() - 1) < 0.01
    assert abs((draws.abs() > 2).float().mean().item() - 0.0455) < 0.002  # the tails of N(0, 1), not just 2 moments
    assert torch.equal(draws, normals(kernel, like, torch.tensor(11, device=device)))
    assert not torch.equal(draws, normals(kernel, like, torch.tensor(12, device=device)))


def test_drawn_noise_is_standard_normal_and_fixed_by_the_seed(fused_kernel):
    check_standard_normal_draws("cpu")


def call_seed(seed, device="cpu"):
    """The seed a fused call draws after `torch.manual_seed(seed)`."""
    torch.manual_seed(seed)
    return torch.randint(2**62, (), dtype=torch.int64, device=device)


def check_backward_sees_the_forward_noise(kernel, device="cpu", tolerance=1e-10):
    """A drawn call equals an eager call given the noise of that call's seed, gradients included: the backward
    regenerated the forward's ε (it stores none)."""
    phi = make_phi(torch.float64).to(device)
    h = torch.randn(4, 8, 6, 6, dtype=torch.float64, device=device).contiguous(memory_format=torch.channels_last)
    drawn = run(phi, kernel, h, None, kappa=0.8, seed=5)
    noise = normals(kernel, h, call_seed(5, device))
    assert_same(drawn, run(phi, "eager", h, noise, kappa=0.8), tolerance=tolerance)


def test_backward_sees_the_noise_of_the_forward(fused_kernel):
    check_backward_sees_the_forward_noise("cpu")


def check_manual_seed(kernel, device="cpu"):
    """`torch.manual_seed` reproduces a drawn call exactly, another seed draws other noise, and the memory layout
    does not change the draw."""
    phi = make_phi().to(device)
    h = torch.randn(4, 8, 6, 6, device=device)
    first, again, other = (run(phi, kernel, h, None, seed=seed) for seed in (3, 3, 4))
    for name in first:
        if first[name] is not None:
            assert torch.equal(first[name], again[name]), name
    assert not torch.allclose(first["output"], other["output"])
    channels_last = run(phi, kernel, h.contiguous(memory_format=torch.channels_last), None, seed=3)
    torch.testing.assert_close(channels_last["output"], first["output"], rtol=0, atol=0)


def test_manual_seed_reproduces_a_run_seeds_differ_and_the_layout_does_not_matter():
    check_manual_seed("cpu")


def check_checkpointing_and_monitor(kernel, device="cpu"):
    phi = make_phi().to(device)
    h = torch.randn(4, 8, 6, 6, device=device)
    plain = run(phi, kernel, h, None, seed=2)
    phi.gradient_checkpointing = True
    with phi.monitoring() as calls:
        checkpointed = run(phi, kernel, h, None, seed=2)
    phi.gradient_checkpointing = False
    assert_same(checkpointed, plain, tolerance=0)
    (scale_mean, noise_mean), = calls
    h_channel_last = h.contiguous(memory_format=torch.channels_last)
    z = F.softplus(_eager_mu(phi, h_channel_last) + normals(kernel, h_channel_last, call_seed(2, device)))
    torch.testing.assert_close(noise_mean, z.mean(), rtol=1e-5, atol=1e-6)
    assert 0 < scale_mean < 1


def test_checkpointing_and_monitor_agree_with_the_plain_call():
    check_checkpointing_and_monitor("cpu")


def _eager_mu(phi, h):
    from metaperturb_hf.modeling_metaperturb import _noise_generator

    with torch.no_grad():
        return _noise_generator(h, h.mean(1, keepdim=True), phi.identity_kernels, phi.mean_kernels)[1]


def test_other_node_counts_and_precisions_use_eager(fused_kernel, monkeypatch):
    """What the kernel does not implement is routed to eager even when it is forced."""
    calls = []
    monkeypatch.setattr(fused_kernel, "perturb", lambda *args, **kwargs: calls.append(args))
    phi = make_phi()
    h = torch.randn(2, 3, 4, 4)
    monkeypatch.setattr(phi, "expected_noise_nodes", 12)
    phi.eval()(h, torch.zeros(3, 4), torch.ones(3, 4), 8, 8, expected_noise=True, kernel="cpu")
    phi.to(torch.bfloat16)(h.bfloat16(), torch.zeros(3, 4), torch.ones(3, 4), 8, 8, kernel="cpu")
    assert calls == []


def test_kernel_choice_comes_from_the_call_the_model_or_the_environment(fused_kernel, monkeypatch):
    calls = []
    original = fused_kernel.perturb
    monkeypatch.setattr(fused_kernel, "perturb", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    phi = make_phi()
    h, stats = torch.randn(2, 3, 4, 4), (torch.zeros(3, 4), torch.ones(3, 4))
    monkeypatch.setenv("METAPERTURB_KERNEL", "eager")
    phi(h, *stats, 8, 8)
    assert calls == []
    phi(h, *stats, 8, 8, kernel="cpu")
    assert calls == [1]
    phi.kernel = "cpu"
    phi(h, *stats, 8, 8)
    assert calls == [1, 1]
    monkeypatch.setenv("METAPERTURB_KERNEL", "gpu")
    phi.kernel = None
    with pytest.raises(ValueError, match="'auto', 'eager', 'cpu' or 'triton'"):
        phi(h, *stats, 8, 8)


def test_a_kernel_that_cannot_be_built_falls_back_with_one_log_line(fused_kernel, monkeypatch, caplog):
    monkeypatch.setitem(loading.states, "cpu", {"error": "RuntimeError: no C++ compiler"})
    phi = make_phi()
    h, noise, stats = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), (torch.zeros(3, 4), torch.ones(3, 4))
    with caplog.at_level(logging.WARNING, logger=fused_kernel.__name__):
        auto = [phi(h, *stats, 8, 8, noise=noise, kernel="auto") for _ in range(3)]
    assert [record.getMessage() for record in caplog.records] == [
        "φ runs on the eager path: the fused CPU kernel could not be built (RuntimeError: no C++ compiler)"]
    torch.testing.assert_close(auto[0], phi(h, *stats, 8, 8, noise=noise, kernel="eager"))
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        phi(h, *stats, 8, 8, kernel="cpu")


@pytest.mark.parametrize("outcome, reason", [("differs", "output differs by 1"), ("raises", "RuntimeError: boom")])
def test_a_kernel_that_fails_its_self_check_is_not_used(fused_kernel, monkeypatch, outcome, reason):
    def check(kernel):
        if outcome == "raises":
            raise RuntimeError("boom")
        return reason

    monkeypatch.setitem(loading.states, "cpu", {"module": loading.extension()})
    monkeypatch.setattr(fused_kernel, "_compare_with_eager", check)
    assert fused_kernel.availability() == f"failed its self-check against eager ({reason})"
    assert fused_kernel.availability() == f"failed its self-check against eager ({reason})"  # settled, not retried


def test_the_self_check_waits_for_a_call_outside_torch_func(fused_kernel, monkeypatch):
    monkeypatch.setitem(loading.states, "cpu", {"module": loading.extension()})
    phi = make_phi()
    h = torch.randn(2, 3, 4, 4)
    parameters = tuple(phi.parameters())
    from metaperturb_hf.modeling_metaperturb import _Settings

    settings = _Settings(1.0, None, (0.5, 0.5), False, 8, True, 0.1, False, False)
    chosen = torch.func.grad(lambda x: (fused_kernel.select("auto", x, parameters, torch.zeros(3, 4), torch.ones(3, 4),
                                                            None, settings) is None) * x.sum())(h)
    assert torch.equal(chosen, torch.ones_like(h)) and "checked" not in loading.states["cpu"]
    assert fused_kernel.select("auto", h, parameters, torch.zeros(3, 4), torch.ones(3, 4), None, settings) is not None
    assert loading.states["cpu"]["checked"] is True


class NoisySite(nn.Module):
    """conv → φ (explicit noise) → conv: a network whose compiled and eager runs must agree exactly."""

    def __init__(self, phi):
        super().__init__()
        self.phi, self.first, self.second = phi, nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
        self.register_buffer("mean", torch.zeros(8, 4))
        self.register_buffer("var", torch.ones(8, 4))

    def forward(self, x, noise):
        return self.second(self.phi(self.first(x), self.mean, self.var, 8, 8, noise=noise, clip_value=100.0))


def check_compile(kernel, device="cpu", **options):
    """A network around φ compiled with `options` (fullgraph: a graph break is an error) gives eager's gradients."""
    torch.manual_seed(0)
    phi = make_phi()
    phi.kernel = kernel
    model = NoisySite(phi).to(device).train()
    x, noise = torch.randn(4, 3, 6, 6, device=device), torch.randn(4, 8, 6, 6, device=device)

    def step(function):
        model.zero_grad()
        function(x, noise).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    compiled = torch.compile(model, fullgraph=True, **options)
    torch.testing.assert_close(step(compiled), step(model), rtol=1e-5, atol=1e-6)


def test_torch_compile_traces_through_phi_and_matches_eager():
    check_compile("cpu", backend="aot_eager")


def test_torch_compile_of_a_perturbed_network_draws_the_eager_noise(monkeypatch):
    torch.manual_seed(0)
    perturbed = add_perturbation(create_model("conv4", 5), make_phi()).train()
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    eager = perturbed(x)
    compiled = torch.compile(perturbed, backend="aot_eager", fullgraph=True)
    torch.manual_seed(1)
    torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
