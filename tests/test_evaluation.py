"""Evaluation: calibration and likelihood by hand, MC prediction, evaluate(), PGD with EoT, and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification

from metaperturb_hf import (
    MetaPerturbConfig,
    MetaPerturbModel,
    add_perturbation,
    classifier_io,
    evaluation,
    modeling_metaperturb,
)
from metaperturb_hf.architectures import create_model
from metaperturb_hf.data import ImageTensors, normalize
from metaperturb_hf.evaluation import (
    evaluate,
    expected_calibration_error,
    negative_log_likelihood,
    pgd_attack,
    predict_proba,
    robust_accuracy,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Two OpenMP threads on two busy cores spin-wait and run these tiny models ~100x slower; one is enough."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturbed_conv4():
    torch.manual_seed(0)
    model = create_model("conv4", num_classes=5, image_size=16, width=8)
    return add_perturbation(model, MetaPerturbModel(MetaPerturbConfig()), input_size=(3, 16, 16))


def random_images() -> ImageTensors:
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    return ImageTensors(images, torch.tensor([0, 1, 2, 3]), list("abcde"))


def memorising_model() -> nn.Module:
    """Flatten → Dropout → Linear, logit c = sum of channel c: a 2×2 image lit in channel c is class c."""
    linear = nn.Linear(12, 3)
    with torch.no_grad():
        linear.weight.zero_()
        for c in range(3):
            linear.weight[c, 4 * c : 4 * (c + 1)] = 1.0
        linear.bias.zero_()
    return nn.Sequential(nn.Flatten(), nn.Dropout(0.5), linear)


def lit_channel_images() -> ImageTensors:
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    images = torch.zeros(6, 3, 2, 2, dtype=torch.uint8)
    images[torch.arange(6), labels] = 255
    return ImageTensors(images, labels, ["r", "g", "b"])


# ---------------------------------------------------------------------------------------------
# ECE and NLL


def test_ece_by_hand():
    probs = torch.tensor([[0.40, 0.30, 0.30], [0.45, 0.35, 0.20], [0.90, 0.05, 0.05], [0.10, 0.70, 0.20]])
    labels = torch.tensor([0, 1, 0, 1])
    # bin (0, .5]: right, wrong at conf .40, .45 -> |0.5 - 0.425| * 2/4
    # bin (.5, 1]: both right at conf .9, .7 -> |1 - 0.8| * 2/4
    assert expected_calibration_error(probs, labels, num_bins=2) == pytest.approx(0.075 / 2 + 0.2 / 2)


def test_ece_bins_include_their_upper_edge():
    probs = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    labels = torch.tensor([0, 1])
    # 0.5 falls in (0, .5] on its own: |1 - .5|/2 + |0 - .9|/2; sharing (.5, 1] with 0.9 would give |.5 - .7| = .2
    assert expected_calibration_error(probs, labels, num_bins=2) == pytest.approx(0.7)


def test_ece_is_zero_when_calibrated_and_one_when_confidently_wrong():
    probs = torch.tensor([[0.8, 0.2]] * 5 + [[0.25, 0.75]] * 4)
    labels = torch.tensor([0, 0, 0, 0, 1] + [1, 1, 1, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-6)  # float32 0.8
    wrong = torch.tensor([[0.999, 0.001]] * 3)
    assert expected_calibration_error(wrong, torch.ones(3, dtype=torch.long)) == pytest.approx(0.999)


def test_nll_by_hand_and_finite_at_zero_probability():
    probs = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    assert negative_log_likelihood(probs, torch.tensor([0, 1])) == pytest.approx(-(math.log(0.5) + math.log(0.75)) / 2)
    certain = torch.tensor([[1.0, 0.0]])
    assert negative_log_likelihood(certain, torch.tensor([1])) == pytest.approx(-math.log(evaluation.MIN_PROBABILITY))


def test_metrics_reject_bad_probabilities_and_labels():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    with pytest.raises(ValueError, match="sum to 1"):
        expected_calibration_error(logits, torch.tensor([0, 1]))
    probs = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        negative_log_likelihood(probs, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="shape"):
        expected_calibration_error(probs, torch.tensor([0]))
    with pytest.raises(ValueError, match="num_bins"):
        expected_calibration_error(probs, torch.tensor([0, 1]), num_bins=0)


# ---------------------------------------------------------------------------------------------
# predict_proba


def test_mean_mode_is_one_deterministic_pass():
    model = perturbed_conv4()
    model.set_noise_mode("mean")
    x = torch.randn(6, 3, 16, 16)
    probs = predict_proba(model, x, num_samples=8)
    assert torch.equal(probs, predict_proba(model, x, num_samples=1))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(probs, model(x).softmax(-1))


def test_sample_mode_averages_draws_and_its_variance_shrinks_with_k():
    model = perturbed_conv4()
    x = torch.randn(4, 3, 16, 16)
    variances = {}
    for k in (1, 16):
        draws = torch.stack([predict_proba(model, x, num_samples=k) for _ in range(6)])
        torch.testing.assert_close(draws.sum(-1), torch.ones(6, 4))
        variances[k] = draws.var(dim=0).mean()
    assert variances[1] > 0
    assert variances[16] < variances[1] / 4  # 1/16 in expectation


def test_chunked_draws_keep_each_image_with_its_own_draws(monkeypatch):
    """With the noise pinned to 0 every draw is the same pass, so the MC average must equal it exactly."""
    model = perturbed_conv4()
    x = torch.randn(5, 3, 16, 16) * torch.linspace(0.5, 3, 5).view(5, 1, 1, 1)
    monkeypatch.setattr(classifier_io, "MAX_REPEATED_BATCH", 12)  # 2 copies per pass: chunks of 2, 2, 2, 1
    monkeypatch.setattr(modeling_metaperturb, "_sample_noise", lambda mu, seed: torch.zeros_like(mu))
    model.perturbation.kernel = "eager"  # the eager path's noise is the one pinned
    probs = predict_proba(model, x, num_samples=7, batch_size=5)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(probs, model(x).softmax(-1))


def test_chunked_mc_matches_separate_passes():
    model = perturbed_conv4()
    x = torch.randn(4, 3, 16, 16)
    chunked = predict_proba(model, x, num_samples=64)
    model.eval()
    separate = model.predict_proba(x, num_samples=64)
    torch.testing.assert_close(chunked, separate, atol=0.01, rtol=0)


def test_predict_proba_restores_every_train_eval_flag():
    model = perturbed_conv4()
    model.train()
    model.perturbation.eval()
    predict_proba(model, torch.randn(2, 3, 16, 16), num_samples=2)
    assert model.training and model.model.training and not model.perturbation.training


def test_transformers_classifiers_get_pixel_values():
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], layer_type="basic", num_labels=4)
    model = ResNetForImageClassification(config).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = model(pixel_values=x).logits.softmax(-1)
    torch.testing.assert_close(predict_proba(model, x, batch_size=2), expected)

    class KeywordOnly(nn.Module):
        def forward(self, *, pixel_values):
            return pixel_values.flatten(1)[:, :4]

    probs = predict_proba(KeywordOnly(), x, input_name="pixel_values")
    torch.testing.assert_close(probs, x.flatten(1)[:, :4].softmax(-1))


# ---------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_memorised_data_and_keep_the_mode():
    model = memorising_model().train()
    data = lit_channel_images()
    result = evaluate(model, data, batch_size=4)
    assert result["accuracy"] == 1.0
    p = math.exp(4) / (math.exp(4) + 2 * math.exp(-4))  # logits: 4 for the lit channel, -4 for the others
    assert result["nll"] == pytest.approx(-math.log(p), rel=1e-4)
    assert result["ece"] == pytest.approx(1 - p, rel=1e-3)
    assert (result["mode"], result["num_samples"], result["n"]) == ("deterministic", 1, 6)
    assert model.training
    evaluate(model.eval(), data)
    assert not model.training


def test_evaluate_reports_how_a_perturbed_model_predicted():
    model = perturbed_conv4()
    data = random_images()
    result = evaluate(model, data, num_samples=3)
    assert (result["mode"], result["num_samples"]) == ("mc", 3)
    model.set_noise_mode("mean")
    result = evaluate(model, data, num_samples=3)
    assert (result["mode"], result["num_samples"]) == ("single_pass", 1)
    assert 0.0 <= result["ece"] <= 1.0 and result["nll"] > 0


# ---------------------------------------------------------------------------------------------
# PGD


def _loss(model, x, labels):
    with torch.no_grad():
        return F.cross_entropy(model.eval()(x), labels).item()


def test_pgd_raises_the_loss_within_the_ball_and_the_pixel_range():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3), nn.ReLU(), nn.Linear(3, 3))
    images = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8)
    labels = torch.randint(0, 3, (8,))
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.5)
    x = normalize(images, mean, std)
    epsilon = 8 / 255
    adversarial = pgd_attack(model, x, labels, epsilon, steps=5, mean=mean, std=std, batch_size=5)
    assert _loss(model, adversarial, labels) > _loss(model, x, labels)
    std_t, mean_t = torch.tensor(std).view(1, 3, 1, 1), torch.tensor(mean).view(1, 3, 1, 1)
    assert ((adversarial - x).abs() <= epsilon / std_t + 1e-6).all()
    pixels = adversarial * std_t + mean_t
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6


def test_pgd_with_eot_on_a_perturbed_model():
    model = perturbed_conv4()
    x = normalize(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8))
    labels = torch.tensor([0, 1, 2, 3])
    model.set_noise_mode("mean")  # a deterministic loss to compare; the attack below samples noise
    clean = _loss(model, x, labels)
    model.set_noise_mode("sample")
    adversarial = pgd_attack(model, x, labels, epsilon=16 / 255, steps=3, eot_samples=4)
    assert ((adversarial - x).abs() <= 2 * 16 / 255 + 1e-6).all() and adversarial.abs().max() <= 1 + 1e-6
    model.set_noise_mode("mean")
    assert _loss(model, adversarial, labels) > clean


def test_robust_accuracy_is_at_most_clean_accuracy():
    model, data = memorising_model(), lit_channel_images()
    assert robust_accuracy(model, data, epsilon=0.0, steps=1) == evaluate(model, data)["accuracy"] == 1.0
    # 0.6 pixel = 1.2 normalised: the lit channel drops to -0.2 and another rises to 0.2, so every label flips
    assert robust_accuracy(model, data, epsilon=0.6, steps=10) == 0.0
    perturbed = perturbed_conv4()
    data = random_images()
    accuracy = robust_accuracy(perturbed, data, epsilon=8 / 255, steps=2, eot_samples=2, num_samples=2)
    assert 0.0 <= accuracy <= 1.0


# ---------------------------------------------------------------------------------------------
# Bad input


def test_clear_errors():
    model, data = memorising_model(), lit_channel_images()
    x = normalize(data.images)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        predict_proba(model, x, num_samples=0)
    with pytest.raises(ValueError, match="num_samples"):
        evaluate(perturbed_conv4(), data, num_samples=0)
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, ImageTensors(data.images[:0], data.labels[:0], data.class_names))
    with pytest.raises(ValueError, match="empty"):
        predict_proba(model, x[:0])
    with pytest.raises(TypeError, match="normalize"):
        predict_proba(model, data.images)
    too_many = ImageTensors(data.images, torch.tensor([0, 1, 2, 3, 4, 5]), list("abcdef"))
    with pytest.raises(ValueError, match=r"3 outputs.*classifier head"):
        evaluate(model, too_many)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        pgd_attack(model, x, too_many.labels, epsilon=0.1)
    with pytest.raises(ValueError, match="epsilon"):
        pgd_attack(model, x, data.labels, epsilon=-0.1)
    with pytest.raises(ValueError, match="eot_samples"):
        pgd_attack(model, x, data.labels, epsilon=0.1, eot_samples=0)


def test_an_overflowing_network_is_an_error_not_an_accuracy():
    """Logits that overflow to Inf give NaN probabilities, whose argmax would still make an accuracy."""
    model, data = memorising_model(), lit_channel_images()
    with torch.no_grad():
        model[2].weight.mul_(1e38)
    with pytest.raises(modeling_metaperturb.NonFiniteFeaturesError, match="overflowed"):
        evaluate(model, data)
