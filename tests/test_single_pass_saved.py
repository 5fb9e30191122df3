"""benchmarks/single_pass_saved.py and single_pass_choice.py: a saved MetaPerturb run evaluated again, MC-K and every
single-pass candidate, and the signals that could choose among them."""

import json

import pytest
import torch
from conftest_data import image_dataset, isolated_hf_cache  # noqa: F401 (a fixture)
from script_loading import load_script

from metaperturb_hf import MetaPerturbConfig, MetaPerturbModel
from metaperturb_hf.data import load_image_dataset, to_tensors
from metaperturb_hf.injection import FITTED, MATCHED
from metaperturb_hf.methods import run_transfer
from metaperturb_hf.transfer import TransferConfig


@pytest.fixture(scope="module")
def script():
    return load_script("benchmarks/single_pass_saved.py")


@pytest.fixture
def saved_run(tmp_path, isolated_hf_cache):  # noqa: F811 (the fixture)
    """A 3-step Conv4 MetaPerturb run on 3 classes of 16×16 images, saved: (target folder, φ folder, run.pt)."""
    target = tmp_path / "target"
    target.mkdir()
    image_dataset(num_classes=3, per_class=12, size=16, seed=1).to_parquet(str(target / "train.parquet"))
    image_dataset(num_classes=3, per_class=4, size=16, seed=2).to_parquet(str(target / "test.parquet"))
    torch.manual_seed(0)
    MetaPerturbModel(MetaPerturbConfig(initializer_range=0.5)).save_pretrained(tmp_path / "phi")
    train, test = (to_tensors(load_image_dataset(str(target), split)) for split in ("train", "test"))
    run_transfer("metaperturb", "conv4", train, test, TransferConfig(steps=3, batch_size=8),
                 MetaPerturbModel.from_pretrained(tmp_path / "phi"), mc_samples=2, save_model=str(tmp_path / "run.pt"))
    return target, tmp_path / "phi", tmp_path / "run.pt"


def run_arguments(saved_run) -> list[str]:
    target, phi, run = saved_run
    return ["--model", str(run), "--dataset", str(target), "--seed", "0", "--arch", "conv4",
            "--perturbation", str(phi), "--batch-size", "8"]


def test_a_saved_run_gets_mc_draws_and_every_candidate(script, saved_run, tmp_path, capsys):
    records = tmp_path / "records.jsonl"
    script.main([*run_arguments(saved_run), "--mc-draw-seeds", "2", "--output", str(records)])
    (record,) = [json.loads(line) for line in records.read_text().splitlines()]
    assert record["run"] == "run" and len(record["mc10_by_draw_seed"]) == 2
    assert record["mc10"] == pytest.approx(sum(record["mc10_by_draw_seed"]) / 2)
    assert set(record["mc_by_samples"]) == {"1", "2", "5"}
    assert {MATCHED, FITTED} <= set(record["accuracy_by_weight"])
    assert record["single_pass"] == record["accuracy_by_weight"][str(record["single_pass_weight"])]
    assert record["shortfall"] == pytest.approx(record["mc10"] - record["single_pass"])

    capsys.readouterr()
    script.main(["--report", str(records)])
    table = capsys.readouterr().out
    assert "| run | " in table and f"{100 * record['shortfall']:+.2f} |" in table and "of 1 runs" in table


def test_the_report_counts_a_shortfall_of_one_point_as_shown_within_one_point(script):
    def saved(run, mc10, single_pass):
        return {"run": run, "mc_by_samples": {"1": 0.3, "2": 0.3, "5": 0.3}, "mc10": mc10,
                "mc10_by_draw_seed": [mc10], "single_pass": single_pass, "single_pass_weight": FITTED,
                "accuracy_by_weight": {FITTED: single_pass}, "shortfall": mc10 - single_pass}

    records = [saved("a", 0.31, 0.30), saved("b", 0.3102, 0.30)]
    assert records[0]["shortfall"] > 0.01  # 1.00 points, summed in floats as 1.0000000000000009
    table = script.report(records)
    assert "| +1.00 |" in table and "| +1.02 |" in table and "Within 1 point of MC-10: 1 of 2 runs." in table


def test_a_run_to_evaluate_must_be_named(script, capsys):
    with pytest.raises(SystemExit):
        script.main(["--dataset", "somewhere"])
    assert "--model, --dataset and --seed" in capsys.readouterr().err


@pytest.fixture(scope="module")
def choice_script():
    return load_script("benchmarks/single_pass_choice.py")


def test_every_signal_chooses_a_candidate_of_the_saved_run(choice_script, saved_run, tmp_path, capsys):
    records = tmp_path / "choice.jsonl"
    choice_script.main([*run_arguments(saved_run), "--output", str(records)])
    (record,) = [json.loads(line) for line in records.read_text().splitlines()]
    candidates = set(record["accuracy_by_weight"])
    assert {MATCHED, FITTED, "1.0", "0.0"} <= candidates and 0 <= record["mc10"] <= 1
    assert set(record["signals"]) == {"train", "train_augmented", "test_inputs", "train_augmented_labels"}
    for name in ("train", "train_augmented", "test_inputs"):
        signal = record["signals"][name]
        assert set(signal["agreement"]) == candidates and signal["chosen"] in candidates
        agreement = {key: value for key, value in signal["agreement"].items() if value is not None}
        assert signal["agreement"][signal["chosen"]] == max(agreement.values())
    labels = record["signals"]["train_augmented_labels"]["accuracy"]
    usable = [value for value in labels.values() if value is not None]
    assert labels[record["signals"]["train_augmented_labels"]["chosen"]] == max(usable)

    capsys.readouterr()
    choice_script.main(["--report", str(records)])
    assert "| train_augmented_labels |" in capsys.readouterr().out


def test_the_choice_report_measures_each_signal_against_mc_and_the_best_candidate(choice_script):
    def signal(chosen):
        return {"chosen": chosen}

    record = {"run": "a", "mc10": 0.40, "accuracy_by_weight": {"fitted": 0.405, "matched": 0.39, "0.5": 0.38},
              "signals": {"train": signal("fitted"), "train_augmented": signal("matched"),
                          "test_inputs": signal("0.5"), "train_augmented_labels": signal("fitted")}}
    table = choice_script.report([record])
    assert "| a | 40.00 | 40.50 (fitted) | -0.50 (fitted) | +1.00 (matched) | +2.00 (0.5) | -0.50 (fitted) |" in table
    assert "| train | 0.00 | 1 of 1 |" in table and "| train_augmented | 1.50 | 1 of 1 |" in table
    assert "| test_inputs | 2.50 | 0 of 1 |" in table
