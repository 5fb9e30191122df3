"""PerturbedModel.save_pretrained / from_pretrained for every kind of classifier, as PEFT saves and loads adapters.

The hub round trip (push_to_hub, from_pretrained by repo id) is in test_hub.py.
"""

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForImageClassification, ResNetConfig, ResNetForImageClassification

from metaperturb_hf import PerturbationConfig, PerturbedModel, add_perturbation
from metaperturb_hf.architectures import create_model
from metaperturb_hf.classifier_saving import CLASSIFIER_CONFIG_NAME


def trained(perturbed: PerturbedModel, *args, **kwargs) -> PerturbedModel:
    """A few training forwards, so that BatchNorm and site statistics leave their initial values."""
    perturbed.train()
    with torch.no_grad():
        for _ in range(3):
            perturbed(*args, **kwargs)
    return perturbed.eval()


def outputs(perturbed: PerturbedModel, *args, **kwargs) -> list[torch.Tensor]:
    """Logits in "mean" mode and in "sample" mode under one seed; the model's noise mode is left as it was."""
    mode, result = perturbed.noise_mode, []
    for noise in ("mean", "sample"):
        perturbed.set_noise_mode(noise)
        torch.manual_seed(3)
        with torch.no_grad():
            output = perturbed(*args, **kwargs)
        result.append(getattr(output, "logits", output))
    perturbed.set_noise_mode(mode)
    return result


def assert_same_outputs(a: list[torch.Tensor], b: list[torch.Tensor], exact: bool = True) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, **({"rtol": 0, "atol": 0} if exact else {}))


def test_a_reference_network_is_rebuilt_from_the_folder_alone(perturbation, tmp_path):
    model = create_model("mlp", num_classes=4, image_size=16, hidden_sizes=(12, 8))
    x = torch.randn(6, 3, 16, 16)
    config = PerturbationConfig(select="top", num_sites=1, spatial_norm=2, noise_mode="mean")
    perturbed = trained(add_perturbation(model, perturbation, config, input_size=(3, 16, 16)), x)
    perturbed.save_pretrained(tmp_path)
    record = json.loads((tmp_path / CLASSIFIER_CONFIG_NAME).read_text())
    assert record == {"kind": "create_model", "create_model": {
        "name": "mlp", "num_classes": 4, "image_size": 16, "in_channels": 3, "hidden_sizes": [12, 8]}}

    loaded = PerturbedModel.from_pretrained(tmp_path)
    assert not any(module.training for module in loaded.modules())  # eval mode, as transformers' from_pretrained
    assert type(loaded.model) is type(model) and loaded.model is not model
    assert loaded.perturbation_config == config and loaded.noise_mode == "mean"
    assert loaded.sites == perturbed.sites and (loaded.channel_norm, loaded.spatial_norm) == (8.0, 2.0)
    assert not any(p.requires_grad for p in loaded.perturbation.parameters())  # φ comes back frozen
    assert_same_outputs(outputs(loaded, x), outputs(perturbed, x))


def test_a_channels_last_resnet_with_calibrated_single_pass_round_trips(perturbation, tmp_path):
    model = create_model("resnet20", num_classes=3).to(memory_format=torch.channels_last)  # as build_classifier
    x = torch.randn(4, 3, 32, 32)
    perturbed = trained(add_perturbation(model, perturbation), x)
    perturbed.calibrate_single_pass([torch.randn(8, 3, 32, 32) for _ in range(2)])
    perturbed.save_pretrained(tmp_path)
    loaded = PerturbedModel.from_pretrained(tmp_path)
    assert loaded.single_pass_calibrated
    # Rebuilt in the default memory format: the same weights, convolutions rounded in another order.
    assert_same_outputs(outputs(loaded, x), outputs(perturbed, x), exact=False)
    assert loaded.state_dict().keys() == perturbed.state_dict().keys()
    for key, value in perturbed.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


class TwoLayerNet(nn.Module):
    """A user's own classifier: nothing in the saved folder says how to build it."""

    def __init__(self, hidden: int = 6):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 2)

    def forward(self, x):
        return self.head(self.body(x))


def test_a_plain_module_needs_the_model_and_gets_the_saved_weights(perturbation, tmp_path):
    x = torch.randn(8, 5)
    perturbed = trained(add_perturbation(TwoLayerNet(), perturbation, example_inputs=x), x)
    perturbed.save_pretrained(tmp_path)
    assert json.loads((tmp_path / CLASSIFIER_CONFIG_NAME).read_text()) == {
        "kind": "module", "class": f"{__name__}.TwoLayerNet"}
    with pytest.raises(TypeError, match=r"TwoLayerNet, which cannot be rebuilt.*from_pretrained\(path, model="):
        PerturbedModel.from_pretrained(tmp_path)

    fresh = TwoLayerNet()
    loaded = PerturbedModel.from_pretrained(tmp_path, model=fresh)
    assert loaded.model is fresh
    assert torch.equal(fresh.body[1].running_mean, perturbed.model.body[1].running_mean)
    assert_same_outputs(outputs(loaded, x), outputs(perturbed, x))

    with pytest.raises(ValueError, match="(?s)does not fit the given TwoLayerNet.*size mismatch for body.0.weight"):
        PerturbedModel.from_pretrained(tmp_path, model=TwoLayerNet(hidden=7))
    with pytest.raises(ValueError, match="already carries a perturbation"):
        PerturbedModel.from_pretrained(tmp_path, model=perturbed.model)


def tiny_resnet() -> ResNetForImageClassification:
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    return ResNetForImageClassification(config)


def test_a_transformers_classifier_is_saved_its_own_way(perturbation, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    perturbed = trained(add_perturbation(tiny_resnet(), perturbation), pixel_values=x)
    perturbed.save_pretrained(tmp_path)
    assert not (tmp_path / CLASSIFIER_CONFIG_NAME).exists()
    # The folder is also a plain transformers checkpoint of the classifier.
    alone = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert torch.equal(alone.state_dict()["resnet.embedder.embedder.normalization.running_mean"],
                       perturbed.model.state_dict()["resnet.embedder.embedder.normalization.running_mean"])

    rebuilt = PerturbedModel.from_pretrained(tmp_path)
    assert type(rebuilt.model) is ResNetForImageClassification
    assert_same_outputs(outputs(rebuilt, pixel_values=x), outputs(perturbed, pixel_values=x))
    given = tiny_resnet()
    into_given = PerturbedModel.from_pretrained(tmp_path, model=given)
    assert into_given.model is given
    assert_same_outputs(outputs(into_given, pixel_values=x), outputs(perturbed, pixel_values=x))


def test_a_folder_saved_again_with_another_kind_of_classifier_loads_the_new_one(perturbation, tmp_path):
    add_perturbation(create_model("conv4", num_classes=3), perturbation).save_pretrained(tmp_path)
    add_perturbation(tiny_resnet(), perturbation).save_pretrained(tmp_path)
    assert type(PerturbedModel.from_pretrained(tmp_path).model) is ResNetForImageClassification


def test_a_folder_that_is_not_a_saved_perturbed_model_is_named(perturbation, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a hub repo id"):
        PerturbedModel.from_pretrained(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="was not written by PerturbedModel.save_pretrained"):
        PerturbedModel.from_pretrained(tmp_path)
    add_perturbation(create_model("conv4", num_classes=3), perturbation).save_pretrained(tmp_path)
    (tmp_path / "perturbation_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="perturbation_config.json not found"):
        PerturbedModel.from_pretrained(tmp_path)
