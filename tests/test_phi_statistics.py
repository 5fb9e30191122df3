"""benchmarks/phi_statistics.py --state-dict: it measures the trained run it is given, not a fresh network."""

import json
from pathlib import Path

import pytest
import torch
from conftest_data import image_dataset, isolated_hf_cache  # noqa: F401 (a fixture)
from script_loading import load_script

from metaperturb_hf import MetaPerturbConfig, MetaPerturbModel
from metaperturb_hf.data import load_image_dataset, normalize, to_tensors
from metaperturb_hf.methods import apply_method, build_classifier


@pytest.fixture(scope="module")
def script():
    return load_script("benchmarks/phi_statistics.py")


@pytest.fixture
def target(tmp_path, isolated_hf_cache):
    folder = tmp_path / "target"
    folder.mkdir()
    image_dataset(num_classes=3, per_class=12, size=16, seed=1).to_parquet(str(folder / "train.parquet"))
    image_dataset(num_classes=3, per_class=4, size=16, seed=2).to_parquet(str(folder / "test.parquet"))
    return folder


@pytest.fixture
def phi_folder(tmp_path):
    """A φ far from the usual N(0, 0.01) start, so that s follows the features it meets."""
    torch.manual_seed(0)
    MetaPerturbModel(MetaPerturbConfig(initializer_range=0.5)).save_pretrained(tmp_path / "phi")
    return tmp_path / "phi"


def trained_run(phi_folder, path: Path) -> torch.nn.Module:
    """A perturbed Conv4 whose BatchNorm scales differ from a fresh one's, as training would leave them."""
    model = apply_method(build_classifier("conv4", 3, 16, seed=0), "metaperturb", 16,
                         MetaPerturbModel.from_pretrained(phi_folder))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith("model.") and parameter.dim() == 1:
                parameter.copy_(3 * torch.rand(parameter.shape, generator=generator))
    torch.save(model.state_dict(), path)
    return model


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_state_dict_measures_the_trained_network(script, target, phi_folder, tmp_path):
    model = trained_run(phi_folder, tmp_path / "run.pt")
    common = ["--target", str(target), "--archs", "conv4", "--perturbations", f"test-phi={phi_folder}"]
    script.main([*common, "--output", str(tmp_path / "fresh.jsonl")])
    script.main([*common, "--state-dict", str(tmp_path / "run.pt"), "--output", str(tmp_path / "trained.jsonl")])

    fresh = [line for line in lines(tmp_path / "fresh.jsonl") if "site" in line]
    trained = lines(tmp_path / "trained.jsonl")
    fit = [line for line in trained if "train_accuracy" in line]
    sites = [line for line in trained if "site" in line]
    assert len(fit) == 1 and 0 <= fit[0]["train_accuracy"] <= 1 and 0 <= fit[0]["test_accuracy"] <= 1
    assert all(line["trained"] == "run.pt" for line in fit + sites)
    assert [line["site"] for line in sites] == [line["site"] for line in fresh]

    train = to_tensors(load_image_dataset(str(target), "train"))
    torch.manual_seed(0)
    images = normalize(train.images[torch.randperm(len(train))[:128]])
    torch.manual_seed(0)
    expected = script.site_multipliers(model, images)
    assert [line["mean_s"] for line in sites] == pytest.approx([line["mean_s"] for line in expected], abs=1e-6)
    assert max(abs(a["mean_s"] - b["mean_s"]) for a, b in zip(sites, fresh)) > 1e-3  # not the fresh network's


@pytest.mark.parametrize("archs, message", [("conv4,resnet20", "one trained run"), ("conv4", "is not a file")])
def test_state_dict_needs_one_saved_run(script, target, phi_folder, tmp_path, capsys, archs, message):
    with pytest.raises(SystemExit):
        script.main(["--target", str(target), "--archs", archs, "--perturbations", f"a={phi_folder}",
                     "--state-dict", str(tmp_path / "absent.pt"), "--output", str(tmp_path / "out.jsonl")])
    assert message in capsys.readouterr().err
