"""Every folder in hub_cards/ agrees with its card: weights, code copies, meta-training record and transfer results.

The cards are written by scripts/write_cards.py; a test here fails while a card differs from what it writes now.
"""

import importlib.util
import json
import re
import statistics
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from metaperturb_hf import MetaPerturbConfig, MetaPerturbModel
from metaperturb_hf.hub import (
    CITATION,
    LIBRARY_NAME,
    TAGS,
    build_model_card,
    card_for_folder,
    file_sha256,
    meta_training_facts,
    source_name,
)
from metaperturb_hf.results import accuracy_cells, markdown_table

ROOT = Path(__file__).resolve().parents[1]
CARD_FOLDERS = sorted(p for p in (ROOT / "hub_cards").iterdir() if p.is_dir())
RELEASES = [p for p in CARD_FOLDERS if (p / "model.safetensors").is_file()]
_spec = importlib.util.spec_from_file_location("write_cards", ROOT / "scripts" / "write_cards.py")
write_cards = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(write_cards)


def card_facts(card: ModelCard) -> dict[str, str]:
    """The rows of the card's meta-training table."""
    section = card.text.split("## Meta-training", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `([^`]+)` \| (.*) \|$", section, flags=re.MULTILINE))


def eval_cells(card: ModelCard) -> list[tuple]:
    """(target, arch, column, value) of every model-index result, as build_model_card names them."""
    cells = [(e.dataset_name, *e.metric_name.split(", accuracy")[0].rsplit(" on ", 1), e.metric_value)
             for e in card.data.eval_results or []]
    return sorted((target, arch, column, value) for target, column, arch, value in cells)


def expected_cells(results: dict[str, list[dict]], source: str) -> list[tuple]:
    """The same, recomputed from the records: the mean of each of this φ's benchmark-table cells."""
    return sorted((target, arch, column, round(statistics.mean(values), 2))
                  for records in results.values()
                  for (target, arch, column), values in accuracy_cells(
                      [r for r in records if r["source"] == source]).items())


@pytest.fixture(scope="module")
def regenerated():
    return write_cards.build_cards(write_cards.default_results())


def test_there_are_released_perturbations_and_the_authors_card():
    assert {p.name for p in RELEASES} >= {"metaperturb-tin-conv4", "metaperturb-tin-resnet20"}
    assert write_cards.AUTHORS in {p.name for p in CARD_FOLDERS}
    assert all((p / "README.md").is_file() for p in CARD_FOLDERS)


@pytest.mark.parametrize("folder", RELEASES, ids=lambda p: p.name)
def test_release_loads_and_matches_its_record(folder):
    phi = MetaPerturbModel.from_pretrained(folder)
    parameters = torch.cat([p.flatten() for p in phi.parameters()])
    assert parameters.numel() == 82 and torch.isfinite(parameters).all()
    assert parameters.std() > 0.02  # meta-trained, not the N(0, 0.01) initialisation
    record = json.loads((folder / "meta_training.json").read_text())
    assert record["num_tasks"] == len(record["tasks"]) and 0 < record["steps"] <= 750
    for name in ("modeling_metaperturb.py", "configuration_metaperturb.py"):  # trust_remote_code gets today's code
        assert (folder / name).read_text() == (ROOT / "metaperturb_hf" / name).read_text(), (
            f"{folder.name}/{name} is stale")


@pytest.mark.parametrize("folder", RELEASES, ids=lambda p: p.name)
def test_release_card_states_its_weights_and_meta_training(folder):
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == LIBRARY_NAME and set(TAGS) <= set(card.data.tags)
    assert f"sha256 `{file_sha256(folder / 'model.safetensors')}`" in card.text
    assert card_facts(card) == meta_training_facts(json.loads((folder / "meta_training.json").read_text()))
    for snippet in (f'MetaPerturbModel.from_pretrained("hub_cards/{folder.name}")', "add_perturbation(",
                    "callbacks=[MetaPerturbCallback()]", CITATION):
        assert snippet in card.text, snippet
    strength = MetaPerturbConfig.from_pretrained(folder).noise_strength
    assert (f"`noise_strength: {strength:g}`" in card.text) == (strength != 1.0)


@pytest.mark.parametrize("folder", CARD_FOLDERS, ids=lambda p: p.name)
def test_card_numbers_are_those_of_the_records(folder, regenerated):
    card = ModelCard.load(folder / "README.md")
    results = write_cards.default_results()
    source = source_name(folder)
    assert eval_cells(card) == expected_cells(results, source)
    assert card.content == regenerated[folder].content, (
        f"{folder.name}/README.md is stale: python scripts/write_cards.py")


def test_authors_card_explains_the_conversion(official_checkpoint, tmp_path):
    folder = ROOT / "hub_cards" / write_cards.AUTHORS
    assert sorted(p.name for p in folder.iterdir()) == ["README.md"]
    card = ModelCard.load(folder / "README.md")
    command = f"python -m metaperturb_hf.convert {write_cards.AUTHORS_CHECKPOINT} {write_cards.AUTHORS}"
    assert command in card.text and card.data.library_name == LIBRARY_NAME
    assert card_facts(card) == meta_training_facts(write_cards.AUTHORS_META_TRAINING)
    # The checksum on the card is the reference file's, and the command it gives makes a loadable φ.
    assert f"sha256 `{file_sha256(official_checkpoint)}`" in card.text
    from metaperturb_hf.convert import main as convert

    convert([str(official_checkpoint), str(tmp_path / write_cards.AUTHORS)])
    assert sum(p.numel() for p in MetaPerturbModel.from_pretrained(tmp_path / write_cards.AUTHORS).parameters()) == 82


def test_a_phi_released_below_full_strength_says_so_on_its_card(tmp_path):
    phi = MetaPerturbModel(MetaPerturbConfig(noise_strength=0.5))
    phi.save_pretrained(tmp_path)
    card = card_for_folder(tmp_path, "me/phi")
    assert "released at κ = 0.5: its config records `noise_strength: 0.5`" in card.text
    assert "released at κ" not in build_model_card({"steps": 3}, model_name="me/phi").text
    with pytest.raises(ValueError, match="noise_strength .* in \\(0, 1\\], got 2"):
        build_model_card({"steps": 3}, model_name="me/phi", noise_strength=2.0)


def _record(source, target, arch, method, seed, accuracy):
    return {"source": source, "target": target, "arch": arch, "method": method, "seed": seed, "steps": 100,
            "train_per_class": None, "accuracy": accuracy}


def test_a_cell_where_the_phi_ran_only_at_another_strength_is_on_its_card():
    grid = [_record("-", "cub", "vgg9", "none", 0, 0.40),
            _record("mine κ=0.5", "cub", "vgg9", "metaperturb", 0, 0.45)]
    card = build_model_card({"steps": 3}, {"grid.jsonl": grid}, model_name="me/phi", source="mine")
    assert "| cub | vgg9 | metaperturb [mine κ=0.5] | +5.00 (1 seed) | 1 of 1 |" in card.text
    assert card.data.eval_results is None  # the model-index holds the φ's own columns only


def test_card_parses_back_with_the_numbers_of_the_benchmark_table(tmp_path):
    grid = [_record("-", "cub", "conv4", "none", s, a) for s, a in enumerate([0.30, 0.32, 0.31])]
    grid += [_record("mine", "cub", "conv4", "metaperturb", s, a) for s, a in enumerate([0.33, 0.35, 0.30])]
    grid += [_record("mine", "cub", "conv4", "metaperturb_single_pass", s, a) for s, a in enumerate([0.2, 0.25, 0.3])]
    grid += [_record("other", "cub", "resnet20", "metaperturb", 0, 0.4),
             _record("-", "cub", "resnet20", "none", 0, 0.5)]
    grid += [_record("mine κ=0.5", "cub", "conv4", "metaperturb", 0, 0.34), _record("other κ=0.5", "cub", "conv4",
                                                                                    "metaperturb", 0, 0.9)]
    check = [_record("mine", "cifar10", "resnet20", "metaperturb", 0, 0.6)]
    results = {"grid.jsonl": grid, "check.jsonl": check}
    built = build_model_card({"steps": 3, "final_metrics": {"valid_loss": 1.23456}}, results, model_name="me/phi",
                             source="mine")
    built.save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.model_name == "me/phi"
    assert eval_cells(card) == [("cifar10", "resnet20", "metaperturb [mine]", 60.0),
                                ("cub", "conv4", "metaperturb [mine]", 32.67),
                                ("cub", "conv4", "metaperturb_single_pass [mine]", 25.0)]
    # Each file's benchmark table, restricted to the rows where this φ ran, is on the card as benchmark.py prints it.
    shown = markdown_table([r for r in grid if r["arch"] == "conv4" and not r["source"].startswith("other")])
    assert shown in card.text and markdown_table(check) in card.text
    for *_, value in eval_cells(card):
        assert f"{value:.2f} ± " in shown or f"{value:.2f} (1)" in markdown_table(check)
    assert "nan" not in markdown_table(check)  # one seed has no interval
    assert "| cub | resnet20 |" not in card.text and "[other" not in card.text
    # Beside it, this φ's gains over none paired by seed, at every strength it ran with.
    assert "| cub | conv4 | metaperturb [mine] | +1.67 ± 2.31 | 2 of 3 |" in card.text
    assert "| cub | conv4 | metaperturb [mine κ=0.5] | +4.00 (1 seed) | 1 of 1 |" in card.text
    assert "beats training without a regularizer in 1 of 1 settings" in card.text
    assert card_facts(card) == {"steps": "3", "final_metrics.valid_loss": "1.235"}
