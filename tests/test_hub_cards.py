"""Every released φ in hub_cards/ loads, has 82 parameters, ships the package's current code and its training record."""

import json
from pathlib import Path

import pytest
import torch

from metaperturb_hf import MetaPerturbModel

ROOT = Path(__file__).resolve().parents[1]
RELEASES = sorted(p for p in (ROOT / "hub_cards").iterdir() if (p / "model.safetensors").is_file())


def test_there_are_released_perturbations():
    assert {p.name for p in RELEASES} >= {"metaperturb-tin-conv4", "metaperturb-tin-resnet20"}


@pytest.mark.parametrize("folder", RELEASES, ids=lambda p: p.name)
def test_release_loads_and_matches_its_record(folder):
    phi = MetaPerturbModel.from_pretrained(folder)
    parameters = torch.cat([p.flatten() for p in phi.parameters()])
    assert parameters.numel() == 82 and torch.isfinite(parameters).all()
    assert parameters.std() > 0.02  # meta-trained, not the N(0, 0.01) initialisation
    record = json.loads((folder / "meta_training.json").read_text())
    assert record["num_tasks"] == len(record["tasks"]) and 0 < record["steps"] <= 750
    for name in ("modeling_metaperturb.py", "configuration_metaperturb.py"):  # trust_remote_code gets today's code
        assert (folder / name).read_text() == (ROOT / "metaperturb_hf" / name).read_text(), f"{folder.name}/{name} is stale"
