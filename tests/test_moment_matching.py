"""Single-pass statistics matched to the moments of the noise-averaged features (moment_matching)."""

import copy

import pytest
import torch
from test_single_pass import trained_conv4

from metaperturb_hf.moment_matching import match_single_pass_statistics
from metaperturb_hf.single_pass_statistics import running_norms


def one_batch(size: int = 64):
    return [torch.randn(size, 3, 32, 32, generator=torch.Generator().manual_seed(1))]


def norm_outputs(model, x, passes: int) -> list[torch.Tensor]:
    """Every norm layer's output for `x`, averaged over `passes` forwards (noise draws, or one deterministic pass)."""
    norms = [norm for _, norm in running_norms(model.model)]
    sums = [0.0] * len(norms)

    def hook(index):
        def record(module, args, output):
            sums[index] = sums[index] + output.double()

        return record

    handles = [norm.register_forward_hook(hook(i)) for i, norm in enumerate(norms)]
    with torch.no_grad():
        for _ in range(passes):
            model(x)
    for handle in handles:
        handle.remove()
    return [total / passes for total in sums]


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.transpose(0, 1).flatten(1)
    return flat.mean(1), flat.var(1, unbiased=False)


def test_the_single_pass_gets_the_moments_of_the_noise_averaged_features_at_every_norm(perturbation):
    model = trained_conv4(perturbation)
    batches = one_batch()
    model.calibrate_single_pass(batches)
    calibrated = model.single_pass_statistics
    torch.manual_seed(0)
    model.single_pass_statistics = match_single_pass_statistics(model, batches, num_samples=10)

    model.set_noise_mode("sample")
    torch.manual_seed(1)
    averaged = norm_outputs(model, batches[0], passes=200)  # E_noise of every norm's output, per image
    model.set_noise_mode("mean")
    single = norm_outputs(model, batches[0], passes=1)
    assert len(single) == 4
    for noisy, deterministic in zip(averaged, single):
        (target_mean, target_variance), (mean, variance) = channel_moments(noisy), channel_moments(deterministic)
        torch.testing.assert_close(mean, target_mean, atol=0.05 * float(target_variance.sqrt().mean()), rtol=0)
        torch.testing.assert_close(variance, target_variance, rtol=0.15, atol=1e-4)
    # Neither the statistics from training (None) nor those re-estimated under the single pass give them.
    for statistics in (None, calibrated):
        model.single_pass_statistics = statistics
        variance = channel_moments(norm_outputs(model, batches[0], 1)[-1])[1]
        assert not torch.allclose(variance, channel_moments(averaged[-1])[1], rtol=0.15)


def test_without_noise_the_matched_statistics_are_the_classifiers_own(perturbation):
    """At κ = 0 every draw is the single pass, so matching must give back the statistics from training exactly."""
    model = trained_conv4(perturbation)
    model.set_noise_coeff(0.0)
    model.calibrate_single_pass(one_batch())
    matched = match_single_pass_statistics(model, one_batch(), num_samples=3)
    assert matched.kappa == 0.0
    for (_, norm), statistics in zip(running_norms(model.model), matched.norms.values(), strict=True):
        torch.testing.assert_close(statistics.running_mean, norm.running_mean, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(statistics.running_var, norm.running_var, rtol=1e-3, atol=1e-5)


def test_a_channel_constant_over_the_data_gets_finite_statistics(perturbation):
    model = trained_conv4(perturbation)
    first_conv = next(m for m in model.model.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        first_conv.weight[0].zero_()
        if first_conv.bias is not None:
            first_conv.bias[0].zero_()
    model.calibrate_single_pass(one_batch(16))
    matched = match_single_pass_statistics(model, one_batch(16), num_samples=3)
    for statistics in matched.norms.values():
        assert torch.isfinite(statistics.running_mean).all() and torch.isfinite(statistics.running_var).all()
    model.single_pass_statistics = matched
    model.set_noise_mode("mean")
    assert torch.isfinite(model(one_batch(4)[0])).all()


def test_matching_leaves_the_model_as_it_was(perturbation):
    model = trained_conv4(perturbation)
    model.calibrate_single_pass(one_batch(16))
    calibrated = model.single_pass_statistics
    state = copy.deepcopy(model.state_dict())
    flags = [module.training for module in model.modules()]
    model.set_noise_coeff(0.7)
    matched = match_single_pass_statistics(model, one_batch(16), num_samples=2)
    assert matched.kappa == 1.0  # the calibration's κ, which the single pass uses
    assert model.noise_coeff == 0.7 and model.noise_mode == "sample"
    assert model.single_pass_statistics is calibrated
    assert [module.training for module in model.modules()] == flags
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], msg=key)


def test_bad_input_is_refused_with_a_clear_error(perturbation):
    model = trained_conv4(perturbation)
    with pytest.raises(ValueError, match="calibrate_single_pass first"):
        match_single_pass_statistics(model, one_batch(8))
    model.calibrate_single_pass(one_batch(8))
    with pytest.raises(ValueError, match="num_samples must be an integer >= 2"):
        match_single_pass_statistics(model, one_batch(8), num_samples=1)
    with pytest.raises(ValueError, match="no batches"):
        match_single_pass_statistics(model, [])
    assert len(match_single_pass_statistics(model, iter(one_batch(8) * 5), num_batches=2).norms) == 4
