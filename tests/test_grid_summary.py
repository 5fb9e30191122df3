"""benchmarks/grid_summary.py: gains paired by seed, and the single pass against MC, from a grid's records."""

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("grid_summary", ROOT / "benchmarks" / "grid_summary.py")
grid_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(grid_summary)


def record(method, seed, accuracy, source="-", **extra):
    return {"target": "cub", "arch": "conv4", "source": source, "seed": seed, "method": method,
            "accuracy": accuracy, **extra}


def single(seed, weight, by_weight):
    return record("metaperturb_single_pass", seed, by_weight[str(weight)], "phi", single_pass_weight=weight,
                  accuracy_by_weight=by_weight)


def test_gains_are_paired_by_seed_and_counted():
    records = [record("none", 0, 0.30), record("none", 1, 0.40), record("none", 2, 0.50),
               record("metaperturb", 0, 0.32, "phi"), record("metaperturb", 1, 0.39, "phi")]  # seed 2 unfinished
    row = grid_summary.gain_table(records).splitlines()[-1]
    assert row == "| cub | conv4 | phi | +0.50 ± 2.12 | 1 of 2 |"


def test_the_single_pass_row_reports_the_chosen_blend_and_the_worst_seed():
    records = [record("metaperturb", 0, 0.30, "phi"), single(0, 0.5, {"0.0": 0.20, "0.5": 0.29, "1.0": 0.25}),
               record("metaperturb", 1, 0.40, "phi"), single(1, 1.0, {"0.0": 0.30, "0.5": 0.38, "1.0": 0.41})]
    row = grid_summary.single_pass_table(records).splitlines()[-1]
    assert row == "| cub | conv4 | phi | 2 | 35.00 | 35.00 | 25.00 | 33.00 | – | +1.00 | 0.5, 1 |"  # no matched yet


def test_the_matched_statistics_get_their_column_and_a_partial_one_says_how_many_seeds():
    records = [record("metaperturb", 0, 0.30, "phi"),
               single(0, "matched", {"0.0": 0.20, "1.0": 0.25, "matched": 0.31}),
               record("metaperturb", 1, 0.40, "phi"), single(1, 1.0, {"0.0": 0.30, "1.0": 0.41})]
    row = grid_summary.single_pass_table(records).splitlines()[-1]
    assert row == ("| cub | conv4 | phi | 2 | 35.00 | 36.00 | 25.00 | 33.00 | 31.00 (1 of 2 seeds) | -1.00 | "
                   "matched, 1 |")


def test_a_candidate_that_broke_the_single_pass_is_left_out_of_its_mean():
    records = [record("metaperturb", 0, 0.30, "phi"), single(0, 0.0, {"0.0": 0.28, "1.0": None, "matched": None}),
               record("metaperturb", 1, 0.40, "phi"), single(1, 1.0, {"0.0": 0.30, "1.0": 0.41, "matched": None})]
    row = grid_summary.single_pass_table(records).splitlines()[-1]
    assert row == "| cub | conv4 | phi | 2 | 35.00 | 34.50 | 29.00 | 41.00 (1 of 2 seeds) | – | +2.00 | 0, 1 |"


def test_metaperturb_is_set_against_the_best_other_regularizer_by_mean():
    records = [record("none", 0, 0.30), record("dropout", 0, 0.31), record("dropout", 1, 0.33),
               record("dropblock", 0, 0.34), record("metaperturb", 0, 0.35, "phi"),
               record("metaperturb", 0, 0.20, "psi"),
               record("metaperturb_single_pass", 0, 0.50, "phi")]  # the single pass is not an MC column
    row = grid_summary.regularizer_table(records).splitlines()[-1]
    assert row == "| cub | conv4 | 30.00 (1) | dropblock 34.00 (1) | phi 35.00 (1) | +1.00 |"
    assert len(grid_summary.regularizer_table(records[:1] + records[4:]).splitlines()) == 2  # no other: no row


def test_each_placement_of_a_phi_gets_a_column_beside_all_sites_and_none():
    records = [record("none", 0, 0.30), record("metaperturb", 0, 0.36, "phi"), record("metaperturb", 1, 0.34, "phi"),
               record("metaperturb", 0, 0.31, "phi @top:3"), record("metaperturb", 0, 0.33, "phi @bottom:3"),
               record("metaperturb", 0, 0.40, "psi κ=0.5")]  # psi ran at all sites only: no row
    lines = grid_summary.placement_table(records).splitlines()
    assert lines[0] == "| target | network | φ | none | all sites | bottom:3 | top:3 |"
    assert lines[2:] == ["| cub | conv4 | phi | 30.00 (1) | 35.00 (2) | 33.00 (1) | 31.00 (1) |"]


def test_a_placement_is_read_from_a_source_with_a_strength():
    assert grid_summary.split_placement("authors @top_bottom:3 κ=0.5") == ("authors κ=0.5", "top_bottom:3")
    assert grid_summary.split_placement("authors") == ("authors", "all")


def test_the_headline_pairs_every_default_setting_with_none_and_leaves_chosen_settings_out():
    records = [record("none", 0, 0.30), record("none", 1, 0.40),
               record("metaperturb", 0, 0.33, "phi"), record("metaperturb", 1, 0.41, "phi"),
               record("dropout", 0, 0.28), record("dropout", 2, 0.90),  # seed 2 has no none to pair with
               record("metaperturb", 0, 0.50, "phi @top:3"), record("metaperturb", 0, 0.50, "phi κ=0.5"),
               record("metaperturb_single_pass", 0, 0.50, "phi")]
    lines = grid_summary.headline_table(records).splitlines()
    assert lines[0] == "| target | network | none | metaperturb [phi] | dropout |"
    assert lines[2:] == ["| cub | conv4 | 35.00 (2) | +2.00 ± 1.41, 2 of 2 | -2.00 (1 seed), 0 of 1 |"]


def test_the_targets_table_judges_one_phi_setting_against_none_the_best_other_and_its_mc():
    records = [record("none", 0, 0.30), record("none", 1, 0.40), record("dropout", 0, 0.31),
               record("dropout", 1, 0.45),
               record("metaperturb", 0, 0.33, "phi κ=0.5"), single(0, 0.0, {"0.0": 0.315}) | {"source": "phi κ=0.5"},
               record("metaperturb", 1, 0.41, "phi κ=0.5"), single(1, 0.0, {"0.0": 0.42}) | {"source": "phi κ=0.5"},
               # full strength: not judged
               record("metaperturb", 0, 0.90, "phi"), record("metaperturb", 1, 0.90, "phi")]
    lines = grid_summary.targets_table(records, "phi κ=0.5").splitlines()
    assert lines[2] == "| cub | conv4 | 35.00 (2) | +2.00 ± 1.41 | 2 of 2 | dropout +3.00 ± 2.83 | 1.50 |"
    assert lines[-1] == ("Against the targets: above none (mean over seeds) in 1 of 1 cells (target: all); mean gain "
                         "+2.00 points (target: ≥ +2); MetaPerturb minus the best other regularizer -1.00 points on "
                         "average over the 1 cells where others ran (target: ≥ 0); single pass within 1 point "
                         "of MC-10 on every seed in 0 of 1 cells with a single pass (target: all).")


def test_a_mean_gain_that_is_a_tie_up_to_float_rounding_is_not_counted_above_none():
    records = [record("none", seed, accuracy) for seed, accuracy in enumerate([0.1, 0.3, 0.2])]
    records += [record("metaperturb", seed, accuracy, "phi") for seed, accuracy in enumerate([0.3, 0.2, 0.1])]
    assert statistics.mean(
        grid_summary.paired_gains(records, lambda r: True)[("cub", "conv4", "metaperturb [phi]")]) > 0
    assert "above none (mean over seeds) in 0 of 1 cells" in grid_summary.targets_table(records, "phi")


def test_a_single_pass_exactly_one_point_below_mc_in_floats_counts_as_within_one_point():
    records = [record("none", 0, 0.30), record("metaperturb", 0, 0.31, "phi"), single(0, 0.0, {"0.0": 0.30})]
    assert 100 * (0.31 - 0.30) > 1
    table = grid_summary.targets_table(records, "phi")
    assert "| 1.00 |" in table and "within 1 point of MC-10 on every seed in 1 of 1 cells" in table


def test_the_targets_table_says_when_the_phi_setting_never_ran():
    assert "No MetaPerturb runs" in grid_summary.targets_table([record("none", 0, 0.30)], "phi")


def test_the_gain_chart_is_drawn_with_a_panel_per_cell(tmp_path):
    records = [record("none", 0, 0.30), record("metaperturb", 0, 0.33, "phi"), record("dropout", 0, 0.28),
               {**record("none", 0, 0.60), "target": "omniglot"}, {**record("dropout", 0, 0.50), "target": "omniglot"}]
    panels = grid_summary.gain_chart(records, tmp_path / "gains.png")
    assert panels == ["cub, conv4", "omniglot, conv4"]
    assert (tmp_path / "gains.png").read_bytes().startswith(b"\x89PNG")


def test_calibration_is_compared_between_none_and_the_default_settings_with_the_lowest_in_bold():
    records = [record("none", 0, 0.30, ece=0.30), record("none", 1, 0.40, ece=0.20),
               record("metaperturb", 0, 0.33, "phi", ece=0.10), record("metaperturb", 0, 0.50, "phi κ=0.5", ece=0.01),
               record("dropout", 0, 0.28, ece=0.40), {**record("dropout", 0, 0.5, ece=0.1), "target": "omniglot"}]
    lines = grid_summary.calibration_table(records).splitlines()
    assert lines[0] == "| target | network | none | metaperturb [phi] | dropout |"
    assert lines[2:] == ["| cub | conv4 | 0.250 | **0.100** | 0.400 |"]  # omniglot has no none: no row


def test_a_baseline_file_lends_only_its_none_runs(tmp_path, monkeypatch, capsys):
    def write(path, records):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))

    side, grid = tmp_path / "side.jsonl", tmp_path / "grid.jsonl"
    write(side, [record("metaperturb", 0, 0.33, "gated", ece=0.1), record("metaperturb", 1, 0.41, "gated", ece=0.1)])
    write(grid, [record("none", 0, 0.30, ece=0.2), record("none", 1, 0.40, ece=0.2),
                 record("metaperturb", 0, 0.90, "phi-of-the-grid", ece=0.1)])
    monkeypatch.setattr(sys, "argv", ["grid_summary.py", str(side), "--baseline", str(grid)])
    grid_summary.main()
    text = capsys.readouterr().out
    assert "| cub | conv4 | gated | +2.00 ± 1.41 | 2 of 2 |" in text
    assert "phi-of-the-grid" not in text  # the baseline's MetaPerturb runs stay out

    monkeypatch.setattr(sys, "argv", ["grid_summary.py", str(side), "--baseline", str(tmp_path / "missing.jsonl")])
    with pytest.raises(SystemExit):
        grid_summary.main()
    assert "missing.jsonl: no such records file" in capsys.readouterr().err
