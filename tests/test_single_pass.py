"""The calibrated single pass: BatchNorm statistics of its own, re-estimated under it, switched by the noise mode."""

import copy
import importlib.util
import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from metaperturb_hf import PerturbedModel, add_perturbation
from metaperturb_hf.architectures import create_model
from metaperturb_hf.injection import FITTED, MATCHED, SINGLE_PASS_BLEND_WEIGHTS, SINGLE_PASS_WEIGHTS_NAME
from metaperturb_hf.modeling_metaperturb import NonFiniteFeaturesError

ROOT = Path(__file__).resolve().parents[1]


def trained_conv4(perturbation, steps: int = 3):
    """A Conv4 whose BatchNorm and site statistics were gathered under sampled noise, as after transfer training."""
    torch.manual_seed(0)
    model = add_perturbation(create_model("conv4", num_classes=5), perturbation)
    model.train()
    for _ in range(steps):
        model(torch.randn(16, 3, 32, 32))
    return model.eval()


def batchnorms(model: PerturbedModel) -> list[nn.BatchNorm2d]:
    return [m for m in model.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def calibration_batches(count: int = 4, size: int = 16):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(size, 3, 32, 32, generator=generator) for _ in range(count)]


def test_calibration_keeps_mc_and_site_statistics_and_changes_only_the_single_pass(perturbation):
    model = trained_conv4(perturbation)
    classifier_state = copy.deepcopy(model.model.state_dict())
    site_state = copy.deepcopy(model.site_statistics.state_dict())
    x = torch.randn(6, 3, 32, 32)
    torch.manual_seed(3)
    mc_before = model.predict_proba(x, num_samples=4)
    model.set_noise_mode("mean")
    single_before = model(x)

    assert model.calibrate_single_pass(calibration_batches()) == 4
    assert model.single_pass_calibrated and model.noise_mode == "mean" and not model.training
    for key, value in model.model.state_dict().items():
        assert torch.equal(value, classifier_state[key]), key
    for key, value in model.site_statistics.state_dict().items():
        assert torch.equal(value, site_state[key]), key
    for own, norm in zip(model.single_pass_statistics.norms.values(), batchnorms(model), strict=True):
        assert not torch.allclose(own.running_var, norm.running_var)
        assert int(own.num_batches_tracked) == 4

    assert not torch.allclose(model(x), single_before, atol=1e-3)
    model.set_noise_mode("sample")
    torch.manual_seed(3)
    torch.testing.assert_close(model.predict_proba(x, num_samples=4), mc_before)


def test_calibrated_statistics_are_the_batch_average_under_the_single_pass(perturbation):
    """What `torch.optim.swa_utils.update_bn` gives on a copy of the model in "mean" mode with φ in eval."""
    model = trained_conv4(perturbation)
    reference = copy.deepcopy(model)
    reference.set_noise_mode("mean")
    reference.eval()
    for norm in batchnorms(reference):
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    with torch.no_grad():
        for batch in calibration_batches():
            reference(batch)

    model.calibrate_single_pass(calibration_batches())
    for (name, norm), own in zip(
        ((n, m) for n, m in reference.model.named_modules() if isinstance(m, nn.BatchNorm2d)),
        model.single_pass_statistics.norms.values(),
    ):
        torch.testing.assert_close(own.running_mean, norm.running_mean, msg=name)
        torch.testing.assert_close(own.running_var, norm.running_var, msg=name)
    assert all(norm.momentum == 0.1 and not norm.training for norm in batchnorms(model))


def test_the_noise_mode_chooses_the_statistics_and_training_updates_the_classifiers_own(perturbation):
    model = trained_conv4(perturbation)
    model.calibrate_single_pass(calibration_batches())
    norm = batchnorms(model)[0]
    own_var = norm.running_var
    single_var = next(iter(model.single_pass_statistics.norms.values())).running_var
    seen = []
    norm.register_forward_pre_hook(lambda module, args: seen.append(module.running_var))
    x = torch.randn(4, 3, 32, 32)
    model.set_noise_mode("mean")
    model(x)
    model.set_noise_mode("sample")
    model(x)
    model.set_noise_mode("mean")
    model.set_noise_coeff(0.5)  # not the κ the statistics were estimated at
    model(x)
    model.set_noise_coeff(1.0)
    assert [t is single_var for t in seen] == [True, False, False] and seen[1] is own_var and seen[2] is own_var
    assert norm.running_var is own_var  # restored after the forward

    before, single_before = own_var.clone(), single_var.clone()
    model.train()  # "mean" mode, but training samples noise and updates the classifier's own statistics
    model(torch.randn(8, 3, 32, 32))
    assert not torch.equal(own_var, before) and torch.equal(single_var, single_before)


def test_calibrated_at_kappa_zero_it_is_the_classifier_alone_with_statistics_without_noise(perturbation):
    model = trained_conv4(perturbation)
    plain = copy.deepcopy(model).unwrap()
    torch.optim.swa_utils.update_bn(calibration_batches(), plain)
    model.set_noise_coeff(0.0)
    model.calibrate_single_pass(calibration_batches())
    model.set_noise_mode("mean")
    calls = []
    model.perturbation.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(model(x), plain.eval()(x))
    assert calls == []  # φ is skipped at κ = 0 in evaluation: the cost of a plain forward
    model.set_noise_coeff(1.0)
    model(x)
    assert calls  # at κ = 1 the classifier's own statistics and φ again


def test_a_failing_forward_leaves_the_classifier_its_own_statistics(perturbation):
    model = trained_conv4(perturbation)
    model.calibrate_single_pass(calibration_batches())
    model.set_noise_mode("mean")
    own = [norm.running_mean for norm in batchnorms(model)]
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5, 32, 32))  # wrong number of channels
    assert all(norm.running_mean is mean for norm, mean in zip(batchnorms(model), own))


def test_single_pass_statistics_survive_state_dict_and_save_pretrained(perturbation, tmp_path):
    from test_injection import tiny_hf_resnet

    model = add_perturbation(tiny_hf_resnet(), perturbation)
    model.train()
    for _ in range(3):
        model(pixel_values=torch.randn(8, 3, 32, 32))
    model.eval()
    model.calibrate_single_pass({"pixel_values": b, "labels": torch.zeros(len(b), dtype=torch.long)}
                                for b in calibration_batches(3, 8))
    model.set_noise_mode("mean")
    x = torch.randn(3, 3, 32, 32)
    expected = model(pixel_values=x).logits

    model.save_pretrained(tmp_path)
    loaded = PerturbedModel.from_pretrained(tmp_path).eval()
    loaded.set_noise_mode("mean")
    assert loaded.single_pass_calibrated
    torch.testing.assert_close(loaded(pixel_values=x).logits, expected)
    loaded.set_noise_mode("sample")
    assert not torch.allclose(loaded(pixel_values=x).logits, expected, atol=1e-3)

    fresh = add_perturbation(tiny_hf_resnet(), type(perturbation)(perturbation.config))
    assert not fresh.single_pass_calibrated
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    fresh.set_noise_mode("mean")
    torch.testing.assert_close(fresh(pixel_values=x).logits, expected)

    fresh.single_pass_statistics = None
    fresh.save_pretrained(tmp_path)  # an uncalibrated save into the same folder drops the old statistics
    assert not (tmp_path / SINGLE_PASS_WEIGHTS_NAME).exists()
    assert not PerturbedModel.from_pretrained(tmp_path).single_pass_calibrated


def test_num_batches_bounds_an_endless_loader(perturbation):
    model = trained_conv4(perturbation)
    labelled = itertools.repeat((torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long)))
    assert model.calibrate_single_pass(labelled, num_batches=3) == 3
    assert all(int(s.num_batches_tracked) == 3 for s in model.single_pass_statistics.norms.values())


def test_bad_calibration_input_is_refused_with_a_clear_error(perturbation):
    model = trained_conv4(perturbation)
    with pytest.raises(ValueError, match="no batches"):
        model.calibrate_single_pass([])
    with pytest.raises(ValueError, match="num_batches"):
        model.calibrate_single_pass(calibration_batches(), num_batches=0)
    with pytest.raises(TypeError, match="calibration batch"):
        model.calibrate_single_pass(["not a tensor"])
    assert not model.single_pass_calibrated and all(norm.momentum == 0.1 for norm in batchnorms(model))
    assert not model.training and model.noise_mode == "sample"
    no_norms = add_perturbation(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), perturbation,
                                example_inputs=torch.randn(2, 6))
    with pytest.raises(ValueError, match="no BatchNorm"):
        no_norms.calibrate_single_pass([torch.randn(4, 6)])


def test_calibrated_and_matched_single_passes_beat_the_uncalibrated_one_after_training(one_thread):
    """Digits, Conv4 with the released Conv4 φ, 60 steps: the uncalibrated single pass falls near chance."""
    from metaperturb_hf import load_perturbation
    from metaperturb_hf.evaluation import evaluate, normalized_batches
    from metaperturb_hf.methods import apply_method, build_classifier
    from metaperturb_hf.moment_matching import match_single_pass_statistics
    from metaperturb_hf.transfer import TransferConfig, train_classifier

    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    train, test = quickstart.digits(10, 0)
    test = type(test)(test.images[:300], test.labels[:300], test.class_names)
    phi = load_perturbation(ROOT / "hub_cards" / "metaperturb-tin-conv4")
    model = apply_method(build_classifier("conv4", 10, 32, 0), "metaperturb", 32, phi)
    train_classifier(model, train, TransferConfig(steps=60, batch_size=32, seed=0), progress=False)
    model.set_noise_mode("mean")
    uncalibrated = evaluate(model, test)["accuracy"]
    model.calibrate_single_pass(normalized_batches(train, 32))
    calibrated = evaluate(model, test)["accuracy"]
    assert calibrated > uncalibrated + 0.2, (uncalibrated, calibrated)
    model.single_pass_statistics = match_single_pass_statistics(model, normalized_batches(train, 32))
    matched = evaluate(model, test)["accuracy"]
    assert matched > uncalibrated + 0.2, (uncalibrated, matched)


def test_run_transfer_reports_both_passes_and_saves_the_calibrated_run(perturbation, tmp_path):
    from test_transfer import separable_data

    from metaperturb_hf.methods import apply_method, build_classifier, run_transfer
    from metaperturb_hf.transfer import TransferConfig

    train, test = separable_data(n_per_class=8), separable_data(n_per_class=4)
    saved = tmp_path / "run.pt"
    mc, single = run_transfer("metaperturb", "conv4", train, test, TransferConfig(steps=4, batch_size=8), perturbation,
                              mc_samples=3, save_model=str(saved))
    assert (mc["method"], mc["mode"], mc["num_samples"]) == ("metaperturb", "mc", 3)
    assert (single["method"], single["mode"]) == ("metaperturb_single_pass", "single_pass")
    assert single["calibration_batches"] == 3
    assert 0 <= single["uncalibrated_accuracy"] <= 1 and 0 <= single["noise_off_calibrated_accuracy"] <= 1

    weight = single["single_pass_weight"]
    candidates = {str(a) for a in SINGLE_PASS_BLEND_WEIGHTS} | {MATCHED, FITTED}
    assert set(single["accuracy_by_weight"]) == set(single["agreement_by_weight"]) == candidates
    assert single["accuracy"] == single["accuracy_by_weight"][str(weight)]
    assert single["uncalibrated_accuracy"] == single["accuracy_by_weight"]["0.0"]
    assert single["calibrated_accuracy"] == single["accuracy_by_weight"]["1.0"]
    assert single["matched_accuracy"] == single["accuracy_by_weight"][MATCHED]
    assert single["fitted_accuracy"] == single["accuracy_by_weight"][FITTED]

    state = torch.load(saved, weights_only=True)
    calibrated = weight != 0.0
    assert any(key.startswith("single_pass_statistics.") for key in state) == calibrated
    restored = apply_method(build_classifier("conv4", 3, 16, 0), "metaperturb", 16, copy.deepcopy(perturbation))
    restored.load_state_dict(state)
    assert restored.single_pass_calibrated == calibrated
    build_classifier("conv4", 3, 16, 0, init_from=str(saved))  # a saved run is also a source network for finetune


def test_the_transfer_path_chooses_on_augmented_batches_drawn_apart_from_the_fit(perturbation, monkeypatch):
    """Plain training images the classifier has memorised cannot tell candidates apart; augmented ones drawn with
    another seed than the fit's batches can."""
    from test_transfer import separable_data

    from metaperturb_hf.data import BatchSampler
    from metaperturb_hf.methods import CHOICE_BATCHES, CHOICE_SEED_OFFSET, run_transfer
    from metaperturb_hf.transfer import TransferConfig

    seen, choose = [], PerturbedModel.choose_single_pass_statistics

    def spy(self, batches, *args, **kwargs):
        seen.append(list(batches))
        return choose(self, seen[-1], *args, **kwargs)

    monkeypatch.setattr(PerturbedModel, "choose_single_pass_statistics", spy)
    train, test = separable_data(n_per_class=8), separable_data(n_per_class=4)
    run_transfer("metaperturb", "conv4", train, test, TransferConfig(steps=2, batch_size=8, seed=3), perturbation,
                 mc_samples=3)
    (batches,) = seen
    sampler = BatchSampler(train, seed=3 + CHOICE_SEED_OFFSET)
    assert len(batches) == CHOICE_BATCHES
    for images, labels in batches:
        expected_images, expected_labels = sampler.next_batch(8)
        assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)


def test_the_choice_counts_top1_agreement_with_mc_for_every_blend_and_keeps_the_best(perturbation):
    model = trained_conv4(perturbation)
    batches = calibration_batches(count=3)
    model.calibrate_single_pass(batches)
    calibrated = copy.deepcopy(model.single_pass_statistics)
    torch.manual_seed(5)
    choice = model.choose_single_pass_statistics(batches, num_samples=4, weights=(1.0, 0.0, 0.5), match_moments=False)

    torch.manual_seed(5)  # the same draws: the single passes in between draw no noise
    references = [model.predict_proba(x, num_samples=4) for x in batches]
    passes = {weight: [blended_pass(model, calibrated, weight, x) for x in batches] for weight in (0.0, 0.5, 1.0)}
    expected = {weight: sum((y.argmax(-1) == r.argmax(-1)).sum().item() for y, r in zip(ys, references)) / 48
                for weight, ys in passes.items()}
    cross_entropies = {weight: sum(-(r * y.softmax(-1).log()).sum().item() for y, r in zip(ys, references)) / 48
                       for weight, ys in passes.items()}
    assert choice["agreements"] == pytest.approx(expected)
    assert choice["cross_entropies"] == pytest.approx(cross_entropies, rel=1e-4)
    best = max(expected.values())
    assert choice["weight"] == min((a for a, value in expected.items() if value == best), key=cross_entropies.get)
    model.set_noise_mode("mean")
    for x in batches:  # the model now single-passes with the chosen blend
        assert torch.allclose(model(x), blended_pass(model, calibrated, choice["weight"], x), atol=1e-5)


def blended_pass(model, calibrated, weight, x):
    """The single pass of a copy of `model` whose own statistics are the blend and that has none of its own."""
    other = copy.deepcopy(model)
    other.single_pass_statistics = None
    other.set_noise_mode("mean")
    with torch.no_grad():
        for norm, own in zip(batchnorms(other), calibrated.norms.values(), strict=True):
            norm.running_mean.lerp_(own.running_mean, weight)
            norm.running_var.lerp_(own.running_var, weight)
    return other(x)


def test_a_calibration_that_misleads_the_single_pass_is_dropped(perturbation):
    model = trained_conv4(perturbation)
    model.calibrate_single_pass([x.mean((2, 3), keepdim=True).expand_as(x) for x in calibration_batches()])  # flat
    choice = model.choose_single_pass_statistics(calibration_batches(), num_samples=8, weights=(0.0, 1.0),
                                                 match_moments=False)
    assert choice["weight"] == 0.0 and choice["agreements"][0.0] > choice["agreements"][1.0]
    assert model.single_pass_statistics is None and model.noise_mode == "sample" and not model.training


def test_choosing_needs_a_calibration_draws_weights_and_batches(perturbation):
    model = trained_conv4(perturbation)
    with pytest.raises(ValueError, match="calibrate_single_pass"):
        model.choose_single_pass_statistics(calibration_batches())
    model.calibrate_single_pass(calibration_batches())
    with pytest.raises(ValueError, match="num_samples"):
        model.choose_single_pass_statistics(calibration_batches(), num_samples=1)
    with pytest.raises(ValueError, match="weights"):
        model.choose_single_pass_statistics(calibration_batches(), weights=(0.5, 1.5))
    with pytest.raises(ValueError, match="no batches"):
        model.choose_single_pass_statistics([])
    assert model.single_pass_calibrated and model.noise_mode == "sample"


def test_the_matched_statistics_are_a_candidate_and_chosen_over_a_misleading_calibration(perturbation):
    model = trained_conv4(perturbation)
    model.calibrate_single_pass([x.mean((2, 3), keepdim=True).expand_as(x) for x in calibration_batches()])  # flat
    torch.manual_seed(5)
    candidates = model.single_pass_candidates(calibration_batches(), num_samples=4, weights=(0.0, 1.0))
    assert list(candidates) == [MATCHED, 1.0, 0.0] and candidates[0.0] is None
    choice = model.choose_single_pass_statistics(calibration_batches(), num_samples=8, candidates=candidates)
    assert set(choice["agreements"]) == {MATCHED, 1.0, 0.0}
    # Matched on the real batches, it does not depend on the calibration's statistics, only on its κ.
    assert choice["agreements"][MATCHED] > choice["agreements"][1.0]
    assert choice["weight"] == max(candidates, key=lambda key: (choice["agreements"][key],
                                                               -choice["cross_entropies"][key]))
    assert model.single_pass_statistics is candidates[choice["weight"]]


def statistics_that_break_the_single_pass(statistics):
    """A copy whose first norm layer normalises with a NaN variance: NaN features from there on."""
    broken = copy.deepcopy(statistics)
    next(iter(broken.norms.values())).running_var.fill_(float("nan"))
    return broken


def test_candidates_that_break_the_single_pass_are_never_chosen(perturbation):
    model = trained_conv4(perturbation)
    model.calibrate_single_pass(calibration_batches())
    candidates = model.single_pass_candidates(calibration_batches(), num_samples=4, weights=(0.0, 1.0),
                                              match_moments=False)
    candidates = {0.5: statistics_that_break_the_single_pass(candidates[1.0]), **candidates}  # would win ties
    choice = model.choose_single_pass_statistics(calibration_batches(), num_samples=4, candidates=candidates)
    assert choice["agreements"][0.5] is None and choice["weight"] in (0.0, 1.0)
    assert choice["agreements"][choice["weight"]] > 0
    assert model.single_pass_statistics is candidates[choice["weight"]]


def test_when_every_candidate_breaks_the_single_pass_the_error_says_to_sample(perturbation):
    model = trained_conv4(perturbation)
    model.calibrate_single_pass(calibration_batches())
    calibrated = model.single_pass_statistics
    broken = {1.0: statistics_that_break_the_single_pass(calibrated)}
    with pytest.raises(NonFiniteFeaturesError, match=r"set_noise_mode\('sample'\)"):
        model.choose_single_pass_statistics(calibration_batches(), num_samples=4, candidates=broken)
    assert model.single_pass_statistics is calibrated and model.noise_mode == "sample"


@pytest.mark.parametrize("break_all", [False, True])
def test_run_transfer_keeps_what_survives_statistics_that_break_the_single_pass(perturbation, monkeypatch, caplog,
                                                                              break_all):
    """A candidate that breaks the single pass is recorded with accuracy None; if all do, the MC record stands
    alone."""
    from test_transfer import separable_data

    from metaperturb_hf.methods import run_transfer
    from metaperturb_hf.transfer import TransferConfig

    candidates_of = PerturbedModel.single_pass_candidates

    def with_broken(self, *args, **kwargs):
        candidates = candidates_of(self, *args, **kwargs)
        broken = statistics_that_break_the_single_pass(self.single_pass_statistics)
        return {key: broken for key in candidates} if break_all else {**candidates, 0.5: broken}

    monkeypatch.setattr(PerturbedModel, "single_pass_candidates", with_broken)
    train, test = separable_data(n_per_class=8), separable_data(n_per_class=4)
    records = run_transfer("metaperturb", "conv4", train, test, TransferConfig(steps=4, batch_size=8), perturbation,
                           mc_samples=3)
    assert records[0]["method"] == "metaperturb" and 0 <= records[0]["accuracy"] <= 1
    if break_all:
        assert len(records) == 1 and "No single-pass record" in caplog.text
    else:
        single = records[1]
        assert single["accuracy_by_weight"]["0.5"] is None and single["agreement_by_weight"]["0.5"] is None
        assert single["single_pass_weight"] != 0.5 and 0 <= single["accuracy"] <= 1


def test_a_calibration_that_overflows_leaves_the_statistics_from_training_as_the_single_pass(perturbation, monkeypatch,
                                                                                             caplog):
    """A φ whose expected noise overflows the calibration's pass still gets a single-pass record (a = 0 alone)."""
    from test_transfer import separable_data

    from metaperturb_hf.methods import run_transfer
    from metaperturb_hf.transfer import TransferConfig

    calibrate = PerturbedModel.calibrate_single_pass

    def overflowing_under_noise(self, *args, **kwargs):
        if self.noise_coeff > 0:  # the noise-off calibration (κ = 0) still works
            raise NonFiniteFeaturesError("At perturbation site 'act4' (32 channels): hidden_states contains NaN "
                                         "or Inf")
        return calibrate(self, *args, **kwargs)

    monkeypatch.setattr(PerturbedModel, "calibrate_single_pass", overflowing_under_noise)
    train, test = separable_data(n_per_class=8), separable_data(n_per_class=4)
    mc, single = run_transfer("metaperturb", "conv4", train, test, TransferConfig(steps=4, batch_size=8), perturbation,
                              mc_samples=3)
    assert single["method"] == "metaperturb_single_pass" and single["single_pass_weight"] == 0.0
    assert list(single["accuracy_by_weight"]) == ["0.0"] and single["accuracy"] == single["uncalibrated_accuracy"]
    assert single["calibrated_accuracy"] is None and single["matched_accuracy"] is None
    assert single["calibration_batches"] == 0 and "calibration overflowed" in caplog.text
