"""PerturbationConfig: validated in one place, saved with its format version, read by both wrappers alike."""

import dataclasses
import json

import pytest
import torch

import metaperturb_hf
from metaperturb_hf import PerturbationConfig, add_perturbation
from metaperturb_hf.architectures import create_model
from metaperturb_hf.perturbation_config import CONFIG_NAME, FORMAT_VERSION
from metaperturb_hf.regularizers import add_regularizer


@pytest.mark.parametrize("fields, error, match", [
    ({"select": "middle"}, ValueError, r"select must be one of \('all', 'bottom', 'top', 'top_bottom'\)"),
    ({"select": "top"}, ValueError, r"select='top' needs num_sites, an integer >= 1.*got None"),
    ({"select": "bottom", "num_sites": 0}, ValueError, "needs num_sites, an integer >= 1"),
    ({"select": "bottom", "num_sites": True}, ValueError, "needs num_sites, an integer >= 1"),
    ({"select": "bottom", "num_sites": 2.0}, ValueError, "needs num_sites, an integer >= 1"),
    ({"num_sites": 3}, ValueError, r"num_sites=3 needs select='bottom'.*leave num_sites None"),
    ({"sites": "layer[1"}, ValueError, r"sites='layer\[1' is not a valid regular expression"),
    ({"sites": []}, TypeError, "sites must be 'auto', a regex string or a non-empty list"),
    ({"sites": ["layer1", 3]}, TypeError, "sites must be 'auto'"),
    ({"sites": ["layer1", "layer1"]}, ValueError, "lists a name twice"),
    ({"channel_norm": -1}, ValueError, "channel_norm must be a positive number, or None"),
    ({"spatial_norm": float("nan")}, ValueError, "spatial_norm must be a positive number"),
    ({"channel_norm": True}, ValueError, "channel_norm must be a positive number"),
    ({"channel_norm": "64"}, ValueError, "channel_norm must be a positive number"),
    ({"noise_mode": "median"}, ValueError, r"noise_mode must be one of \('sample', 'mean'\)"),
])
def test_a_bad_field_is_refused_naming_it(fields, error, match):
    with pytest.raises(error, match=match):
        PerturbationConfig(**fields)


def test_values_are_normalised_and_the_config_is_frozen():
    config = PerturbationConfig(sites=["layer1.0", "layer2.0"], channel_norm=64)
    assert config.sites == ("layer1.0", "layer2.0") and config.channel_norm == 64.0
    assert isinstance(config.channel_norm, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.select = "top"
    with pytest.raises(ValueError, match="num_sites"):  # a changed copy is validated again
        dataclasses.replace(config, select="top")


def test_dict_and_folder_round_trips_carry_the_format_and_package_versions(tmp_path):
    config = PerturbationConfig(sites=["a", "b"], select="top_bottom", num_sites=1, spatial_norm=32, noise_mode="mean")
    data = config.to_dict()
    assert data["format_version"] == FORMAT_VERSION and data["metaperturb_hf_version"] == metaperturb_hf.__version__
    assert data["sites"] == ["a", "b"]
    assert PerturbationConfig.from_dict(json.loads(json.dumps(data))) == config
    path = config.save_pretrained(tmp_path / "out")
    assert path == tmp_path / "out" / CONFIG_NAME
    assert PerturbationConfig.from_pretrained(tmp_path / "out") == config


@pytest.mark.parametrize("change, match", [
    ({"format_version": FORMAT_VERSION + 1}, rf"format {FORMAT_VERSION + 1}, written by metaperturb_hf 9\.9.*upgrade"),
    ({"format_version": None}, "no integer format_version"),
    ({"selct": "top"}, r"unknown field\(s\) \['selct'\]"),
    ({"select": "middle"}, "select must be one of"),
])
def test_a_saved_config_that_this_version_cannot_read_is_refused(tmp_path, change, match):
    data = {**PerturbationConfig().to_dict(), "metaperturb_hf_version": "9.9.0", **change}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match) as raised:
        PerturbationConfig.from_pretrained(tmp_path)
    assert str(tmp_path / CONFIG_NAME) in str(raised.value)


def test_a_missing_or_unparsable_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="perturbation_config.json not found"):
        PerturbationConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        PerturbationConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a hub repo id"):
        PerturbationConfig.from_pretrained(tmp_path / "absent")


def test_add_perturbation_takes_a_config_or_its_fields_as_keywords_but_not_both(perturbation):
    model = create_model("resnet20", num_classes=10)
    config = PerturbationConfig(select="top", num_sites=2, channel_norm=128, noise_mode="mean")
    by_config = add_perturbation(model, perturbation, config)
    assert by_config.perturbation_config is config
    assert [s.name for s in by_config.sites] == ["layer3.1", "layer3.2"]
    assert (by_config.channel_norm, by_config.spatial_norm, by_config.noise_mode) == (128.0, 8.0, "mean")
    by_config.unwrap()
    by_keywords = add_perturbation(model, perturbation, select="top", num_sites=2, channel_norm=128, noise_mode="mean")
    assert by_keywords.perturbation_config == config and by_keywords.sites == by_config.sites
    by_keywords.unwrap()
    with pytest.raises(TypeError, match=r"config= or the keyword fields \['select'\], not both.*dataclasses.replace"):
        add_perturbation(model, perturbation, config, select="bottom")
    with pytest.raises(TypeError, match=r"Unknown PerturbationConfig field\(s\) \['selct'\]"):
        add_perturbation(model, perturbation, selct="top")
    with pytest.raises(TypeError, match="config must be a PerturbationConfig"):
        add_perturbation(model, perturbation, {"select": "top"})
    with pytest.raises(TypeError, match="positional"):  # everything after the config is keyword-only
        add_perturbation(model, perturbation, None, torch.randn(2, 3, 32, 32))


def test_the_noise_mode_lives_in_the_config_and_is_validated_there(perturbation):
    perturbed = add_perturbation(create_model("conv4", num_classes=5), perturbation)
    assert perturbed.noise_mode == "sample"
    perturbed.set_noise_mode("mean")
    assert perturbed.perturbation_config.noise_mode == "mean"
    with pytest.raises(ValueError, match="noise_mode must be one of"):
        perturbed.set_noise_mode("median")
    assert perturbed.noise_mode == "mean"


def test_a_regularizer_is_placed_by_the_same_config_as_metaperturb(perturbation):
    model = create_model("resnet20", num_classes=10)
    config = PerturbationConfig(sites=r"layer[23]\..*", select="bottom", num_sites=2, noise_mode="mean")
    perturbed = add_perturbation(model, perturbation, config)
    metaperturb_sites = [s.name for s in perturbed.sites]
    perturbed.unwrap()
    assert metaperturb_sites == ["layer2.0", "layer2.1"]
    by_config = add_regularizer(model, "dropout", config, p=0.2)  # φ's own fields (noise_mode) are not read
    assert [s.name for s in by_config.sites] == metaperturb_sites and by_config.p == 0.2
    by_config.unwrap()
    by_keywords = add_regularizer(model, "dropblock", sites=r"layer[23]\..*", select="bottom", num_sites=2)
    assert [s.name for s in by_keywords.sites] == metaperturb_sites
    by_keywords.unwrap()
    with pytest.raises(TypeError, match="not both"):
        add_regularizer(model, "dropout", config, select="top")
    with pytest.raises(TypeError, match="positional"):
        add_regularizer(model, "dropout", None, torch.randn(2, 3, 32, 32))
