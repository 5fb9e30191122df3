"""Single-pass statistics fitted to the model's own MC prediction (`single_pass_fitting`)."""

import pytest
import torch
from test_single_pass import calibration_batches, trained_conv4

from metaperturb_hf import add_perturbation
from metaperturb_hf.injection import FITTED, MATCHED
from metaperturb_hf.modeling_metaperturb import NonFiniteFeaturesError
from metaperturb_hf.single_pass_fitting import fit_single_pass_statistics


def divergence_from(model, statistics, batches, targets) -> float:
    """KL(MC ‖ single pass) with `statistics`, to fixed MC targets, summed over the batches."""
    model.set_noise_mode("mean")
    model.single_pass_statistics = statistics
    with torch.no_grad():
        return sum((t * (t.log() - model(x).log_softmax(-1))).sum(-1).mean().item() for x, t in zip(batches, targets))


def mc_targets(model, batches, draws: int = 32):
    model.set_noise_mode("sample")
    torch.manual_seed(5)
    with torch.no_grad():
        return [model.predict_proba(x, num_samples=draws) for x in batches]


def test_the_fit_brings_the_single_pass_closer_to_mc_on_its_batches(perturbation):
    model = trained_conv4(perturbation)
    model.calibrate_single_pass(calibration_batches())
    start = model.single_pass_statistics
    batches = calibration_batches()
    targets = mc_targets(model, batches)
    fitted = fit_single_pass_statistics(model, batches * 10, start, num_samples=8, steps=40, learning_rate=0.05)
    before, after = (divergence_from(model, s, batches, targets) for s in (start, fitted))
    assert after < 0.5 * before


def test_at_learning_rate_zero_the_fitted_statistics_are_the_ones_it_started_from(perturbation):
    model = trained_conv4(perturbation)
    model.calibrate_single_pass(calibration_batches())
    start = model.single_pass_statistics
    fitted = fit_single_pass_statistics(model, calibration_batches(), start, num_samples=2, learning_rate=0.0)
    assert fitted is not start and fitted.kappa == start.kappa
    for own, other in zip(start.norms.values(), fitted.norms.values()):
        torch.testing.assert_close(other.running_mean, own.running_mean)
        torch.testing.assert_close(other.running_var, own.running_var, rtol=1e-4, atol=1e-6)
    # without a start, it starts from the classifier's own statistics
    from_training = fit_single_pass_statistics(model, calibration_batches(), None, num_samples=2, learning_rate=0.0)
    norms = [m for m in model.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm, own in zip(norms, from_training.norms.values(), strict=True):
        torch.testing.assert_close(own.running_mean, norm.running_mean)


def test_the_fit_leaves_the_model_as_it_was(perturbation):
    model = trained_conv4(perturbation)
    model.calibrate_single_pass(calibration_batches())
    calibrated, state = model.single_pass_statistics, {k: v.clone() for k, v in model.state_dict().items()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    fit_single_pass_statistics(model, calibration_batches(), calibrated, num_samples=2, steps=3, learning_rate=0.1)
    assert model.noise_mode == "sample" and model.single_pass_statistics is calibrated and not model.training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


def test_the_fitted_statistics_are_a_candidate_after_the_matched_ones(perturbation):
    model = trained_conv4(perturbation)
    model.calibrate_single_pass(calibration_batches())
    candidates = model.single_pass_candidates(calibration_batches(), num_samples=4, weights=(0.0, 1.0),
                                              fit_batches=calibration_batches())
    assert list(candidates) == [MATCHED, FITTED, 1.0, 0.0]
    choice = model.choose_single_pass_statistics(calibration_batches(), num_samples=4, candidates=candidates)
    assert set(choice["agreements"]) == set(candidates)
    assert model.single_pass_statistics is candidates[choice["weight"]]
    # choosing makes the candidates itself under no_grad; the fit still gets its gradients
    choice = model.choose_single_pass_statistics(calibration_batches(), num_samples=4, weights=(0.0,),
                                                 fit_batches=calibration_batches())
    assert set(choice["agreements"]) == {MATCHED, FITTED, 0.0}


def test_bad_input_is_refused_with_a_clear_error(perturbation):
    model = trained_conv4(perturbation)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        fit_single_pass_statistics(model, calibration_batches(), steps=0)
    with pytest.raises(ValueError, match="got no batches"):
        fit_single_pass_statistics(model, [])
    with pytest.raises(NonFiniteFeaturesError):
        fit_single_pass_statistics(model, [torch.full((4, 3, 32, 32), float("inf"))], num_samples=2)
    plain = add_perturbation(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                                 torch.nn.LazyLinear(2)), perturbation, input_size=(3, 8, 8))
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        fit_single_pass_statistics(plain, [torch.randn(2, 3, 8, 8)])


def test_among_equally_agreeing_candidates_the_softmax_closest_to_mcs_is_kept(perturbation, monkeypatch):
    """Both candidates give MC's top-1 class on every image; the one whose probabilities are nearer MC's wins, even
    when it comes last (ties in agreement are broken by the cross-entropy to MC before the candidates' order)."""
    model = trained_conv4(perturbation)
    model.calibrate_single_pass(calibration_batches())
    reference = torch.tensor([0.7, 0.2, 0.1, 0.0, 0.0])
    confident, close = model.single_pass_statistics, fit_single_pass_statistics(model, calibration_batches(), steps=1)
    given = {id(confident): torch.tensor([0.99, 0.01, 0.0, 0.0, 0.0]),
             id(close): torch.tensor([0.6, 0.25, 0.15, 0, 0])}

    def mc(self, *args, num_samples=1, **kwargs):
        return reference.expand(len(args[0]), -1)

    def single_pass(self, args, kwargs):
        return given[id(self.single_pass_statistics)].expand(len(args[0]), -1)

    monkeypatch.setattr(type(model), "predict_proba", mc)
    monkeypatch.setattr(type(model), "_finite_prediction", single_pass)
    choice = model.choose_single_pass_statistics(calibration_batches(), num_samples=2,
                                                 candidates={MATCHED: confident, FITTED: close})
    assert choice["agreements"] == {MATCHED: 1.0, FITTED: 1.0}
    assert choice["cross_entropies"][FITTED] < choice["cross_entropies"][MATCHED]
    assert choice["weight"] == FITTED and model.single_pass_statistics is close
