"""The example scripts end to end on tiny data: transfer, the resumable transfer grid (benchmarks/transfer_grid.py),
the quick start."""

import json
import re
from pathlib import Path

import pytest
from conftest_data import image_dataset
from script_loading import load_script as load_repository_script

from metaperturb_hf import MetaPerturbConfig, MetaPerturbModel

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BENCHMARKS = EXAMPLES.parent / "benchmarks"


def load_script(name: str, folder: Path = EXAMPLES):
    return load_repository_script(f"{folder.name}/{name}.py")


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    folder = tmp_path_factory.mktemp("target")
    image_dataset(num_classes=3, per_class=12, size=16, seed=1).to_parquet(str(folder / "train.parquet"))
    image_dataset(num_classes=3, per_class=4, size=16, seed=2).to_parquet(str(folder / "test.parquet"))
    return folder


@pytest.fixture(scope="module")
def phi_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phi")
    MetaPerturbModel(MetaPerturbConfig()).save_pretrained(folder)
    return folder


def test_transfer_script_writes_records_for_every_seed(target, phi_dir, tmp_path):
    output = tmp_path / "out.json"
    load_script("transfer").main([
        "--dataset", str(target), "--arch", "conv4", "--image-size", "16", "--method", "metaperturb",
        "--perturbation", str(phi_dir), "--steps", "3", "--batch-size", "8", "--seeds", "0,1",
        "--train-per-class", "6", "--mc-samples", "2", "--output", str(output),
    ])
    result = json.loads(output.read_text())
    assert [(r["method"], r["seed"]) for r in result["records"]] == [
        ("metaperturb", 0), ("metaperturb_single_pass", 0), ("metaperturb", 1), ("metaperturb_single_pass", 1)
    ]
    assert all(r["train_images"] == 18 and 0 <= r["accuracy"] <= 1 for r in result["records"])
    assert result["summary"]["metaperturb"]["seeds"] == 2


@pytest.mark.parametrize(
    "args, match",
    [
        (["--method", "metaperturb"], "needs --perturbation"),
        (["--method", "none", "--train-per-class", "50"], "fewer than per_class"),
        (["--method", "none", "--arch", "conv4", "--image-size", "8"], "too small"),
        (["--method", "finetune"], "init-from"),
        (["--method", "none", "--noise-strength", "2"], "noise_strength"),
    ],
)
def test_transfer_script_refuses_bad_input_before_training(target, args, match):
    with pytest.raises(ValueError, match=match):
        load_script("transfer").main(["--dataset", str(target), "--arch", "conv4", "--image-size", "16",
                                      "--steps", "1", *args])


def test_transfer_script_refuses_a_file_that_is_not_a_perturbation(target, tmp_path):
    from transformers import ResNetConfig, ResNetModel

    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1])).save_pretrained(tmp_path / "resnet")
    with pytest.raises(Exception, match="metaperturb|resnet"):
        load_script("transfer").main(["--dataset", str(target), "--arch", "conv4", "--image-size", "16",
                                      "--steps", "1", "--method", "metaperturb",
                                      "--perturbation", str(tmp_path / "resnet")])


def test_benchmark_grid_resumes_without_redoing_runs(target, phi_dir, tmp_path):
    benchmark = load_script("transfer_grid", BENCHMARKS)
    args = ["--name", "tiny", "--results-dir", str(tmp_path), "--targets", f"toy={target}:6", "--archs", "conv4",
            "--methods", "none,dropout,metaperturb", "--perturbations", f"rand={phi_dir}", "--seeds", "0,1",
            "--steps", "2", "--batch-size", "8", "--mc-samples", "2"]
    results = tmp_path / "tiny.jsonl"
    calls = []
    original = benchmark.run_transfer
    benchmark.run_transfer = lambda *a, **k: calls.append(a[0]) or original(*a, **k)
    benchmark.main([*args, "--shard", "0/2"])  # half the grid, as if the run had been interrupted
    first = results.read_text().splitlines()
    assert len(calls) == 3
    benchmark.main(args)  # the rest, and nothing twice
    assert len(calls) == 6 and results.read_text().splitlines()[: len(first)] == first
    benchmark.main(args)
    assert len(calls) == 6
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(records) == 8  # none, dropout: 2 seeds each; metaperturb: MC + single pass, 2 seeds
    for field in ("source", "target", "arch", "method", "seed", "steps", "train_per_class", "accuracy", "ece",
                  "mc_samples", "train_seconds"):
        assert all(field in record for record in records), field
    table = (tmp_path / "tiny.md").read_text()
    assert "metaperturb [rand]" in table and "**" in table and (tmp_path / "tiny.png").stat().st_size > 1000


def test_benchmark_grid_places_phi_at_the_chosen_sites_only(target, phi_dir, tmp_path, monkeypatch):
    """--placements: one MetaPerturb column per placement, φ at those sites only; all sites keep the plain label."""
    import metaperturb_hf.methods as methods

    benchmark = load_script("transfer_grid", BENCHMARKS)
    site_counts = []
    original = methods.apply_method
    monkeypatch.setattr(methods, "apply_method", lambda *args, **kwargs: (
        lambda model: site_counts.append(len(model.sites)) or model)(original(*args, **kwargs)))
    benchmark.main(["--name", "where", "--results-dir", str(tmp_path), "--targets", f"toy={target}:6", "--archs",
                    "conv4", "--methods", "metaperturb", "--perturbations", f"rand={phi_dir}", "--placements",
                    "all,top:1,top_bottom:1", "--seeds", "0", "--steps", "1", "--batch-size", "8",
                    "--mc-samples", "2"])
    assert site_counts == [4, 1, 2]  # Conv4: four sites; the last one; the first and the last
    records = [json.loads(line) for line in (tmp_path / "where.jsonl").read_text().splitlines()]
    assert [(r["source"], r.get("placement")) for r in records if r["method"] == "metaperturb"] == [
        ("rand", None), ("rand @top:1", "top:1"), ("rand @top_bottom:1", "top_bottom:1")]
    assert "metaperturb [rand @top:1]" in (tmp_path / "where.md").read_text()
    with pytest.raises(ValueError, match="placement"):
        benchmark.main(["--name", "bad", "--results-dir", str(tmp_path), "--targets", f"toy={target}", "--archs",
                        "conv4", "--methods", "metaperturb", "--perturbations", f"rand={phi_dir}", "--placements",
                        "top"])


def test_benchmark_grid_trains_each_noise_strength_as_its_own_column(target, phi_dir, tmp_path, monkeypatch):
    """--noise-strengths: κ anneals to each value; the run ends (and is evaluated) at that κ."""
    import metaperturb_hf.methods as methods

    benchmark = load_script("transfer_grid", BENCHMARKS)
    final_kappas = []
    original = methods.train_classifier
    monkeypatch.setattr(methods, "train_classifier", lambda model, *args, **kwargs: (
        lambda result: final_kappas.append(model.noise_coeff) or result)(original(model, *args, **kwargs)))
    benchmark.main(["--name", "strength", "--results-dir", str(tmp_path), "--targets", f"toy={target}:6", "--archs",
                    "conv4", "--methods", "metaperturb", "--perturbations", f"rand={phi_dir}", "--noise-strengths",
                    "1,0.5", "--seeds", "0", "--steps", "4", "--batch-size", "8", "--mc-samples", "2"])
    assert final_kappas == pytest.approx([1.0, 0.5])
    records = [json.loads(line) for line in (tmp_path / "strength.jsonl").read_text().splitlines()]
    assert [(r["source"], r.get("noise_strength")) for r in records if r["method"] == "metaperturb"] == [
        ("rand", None), ("rand κ=0.5", 0.5)]
    with pytest.raises(ValueError, match="noise_strength"):
        benchmark.main(["--name", "bad", "--results-dir", str(tmp_path), "--targets", f"toy={target}", "--archs",
                        "conv4", "--methods", "metaperturb", "--perturbations", f"rand={phi_dir}", "--noise-strengths",
                        "2"])


def test_quickstart_runs_in_reduced_mode(tmp_path):
    load_script("quickstart").main(["--quick", "--steps", "3", "--train-per-class", "5",
                                    "--output-dir", str(tmp_path)])
    result = json.loads((tmp_path / "quickstart_results.json").read_text())
    assert set(result["summary"]) == {"none", "metaperturb", "metaperturb_single_pass"}
    # The records name their target and φ as the model cards look them up (source "-" without φ), with the κ below 1
    # that the default φ is released at, as the grid names it.
    source = "tin-full-resnet20-gated κ=0.5"
    assert {(r["method"], r["source"]) for r in result["records"]} == {
        ("none", "-"), ("metaperturb", source), ("metaperturb_single_pass", source)}
    assert {r["target"] for r in result["records"]} == {"digits"}
    assert (tmp_path / "quickstart.png").stat().st_size > 1000


def test_finetune_starts_from_a_saved_source_network(target, tmp_path):
    source = tmp_path / "source.pt"
    load_script("transfer").main(["--dataset", str(target), "--arch", "conv4", "--image-size", "16", "--method",
                                  "none", "--steps", "2", "--batch-size", "8", "--save-model", str(source)])
    benchmark = load_script("transfer_grid", BENCHMARKS)
    args = ["--name", "ft", "--results-dir", str(tmp_path), "--targets", f"toy={target}", "--archs", "conv4",
            "--methods", "finetune", "--seeds", "0", "--steps", "1", "--batch-size", "8"]
    with pytest.raises(ValueError, match="--source-networks"):
        benchmark.main(args)
    started_from = []
    original = benchmark.run_transfer
    benchmark.run_transfer = lambda *a, **k: started_from.append(a[7]) or original(*a, **k)
    benchmark.main([*args, "--source-networks", f"conv4={source}"])
    assert started_from == [str(source)] and not source.with_name("source.pt.partial").exists()
    assert json.loads((tmp_path / "ft.jsonl").read_text())["method"] == "finetune"


def test_selection_keeps_the_best_candidate_scored_on_held_out_classes(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    image_dataset(num_classes=8, per_class=20, size=16, seed=3).to_parquet(str(source / "train.parquet"))
    image_dataset(num_classes=8, per_class=4, size=16, seed=4).to_parquet(str(source / "test.parquet"))
    output = tmp_path / "selection"
    args = ["--dataset", str(source), "--architectures", "conv4", "--image_size", "16", "--batch_size", "8",
            "--steps", "2", "--checkpoint_every", "0", "--seeds", "0,1", "--num_groups", "2", "--holdout_classes", "2",
            "--score_steps", "2", "--score_train_per_class", "5", "--score_mc_samples", "2",
            "--output_dir", str(output)]
    load_script("select_perturbation").main(args)

    records = {name: json.loads((output / name / "meta_training.json").read_text()) for name in ("seed-0", "seed-1")}
    selections = [record["selection"] for record in records.values()]
    held_out = selections[0]["held_out_classes"]
    assert len(held_out) == 2 and all(s["held_out_classes"] == held_out for s in selections)
    for record in records.values():  # the held-out classes never reach meta-training
        assert not {c for task in record["tasks"] for c in task["classes"]} & set(held_out)
    winner = selections[0]["winner"]
    assert selections[0]["scores"][winner] == max(selections[0]["scores"].values())
    assert [name for name, record in records.items() if record["selection"]["selected"]] == [winner]
    best = MetaPerturbModel.from_pretrained(output / "best")
    chosen = MetaPerturbModel.from_pretrained(output / winner)
    assert all(a.equal(b) for a, b in zip(best.parameters(), chosen.parameters()))

    weights = output / "seed-0" / "model.safetensors"
    written = weights.stat().st_mtime_ns
    load_script("select_perturbation").main(args)  # finished candidates are kept, not trained again
    assert weights.stat().st_mtime_ns == written


def test_trainer_transfer_trains_resumes_and_saves_a_transformers_classifier(target, phi_dir, tmp_path):
    script = load_script("trainer_transfer")
    common = ["--dataset", str(target), "--perturbation", str(phi_dir), "--image_size", "16", "--mc_samples", "2",
              "--per_device_train_batch_size", "8", "--save_steps", "2", "--logging_steps", "1",
              "--output_dir", str(tmp_path), "--disable_tqdm", "true"]
    script.main([*common, "--max_steps", "2"])
    script.main([*common, "--max_steps", "3", "--resume", "true"])
    state = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and [entry["step"] for entry in state["log_history"]
                                          if "loss" in entry] == [1, 2, 3]
    results = json.loads((tmp_path / "transfer_results.json").read_text())
    assert results["mc"]["num_samples"] == 2 and results["single_pass"]["mode"] == "single_pass"
    assert all(0 <= record["accuracy"] <= 1 and record["n"] == 12 for record in results.values())
    saved = tmp_path / "perturbed-model"
    assert {"config.json", "model.safetensors"} <= {p.name for p in saved.iterdir()}
    calibrated = results["single_pass"]["weight"] != 0.0
    assert (saved / "single_pass_statistics.safetensors").is_file() == calibrated


def test_transfer_script_trains_a_transformers_classifier_from_its_config(target, phi_dir, tmp_path):
    from transformers import ResNetConfig

    ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic").save_pretrained(
        tmp_path / "cfg")
    output = tmp_path / "out.json"
    load_script("transfer").main([
        "--dataset", str(target), "--hf-model", str(tmp_path / "cfg"), "--image-size", "16", "--method", "metaperturb",
        "--perturbation", str(phi_dir), "--steps", "2", "--batch-size", "8", "--mc-samples", "2",
        "--output", str(output),
    ])
    records = json.loads(output.read_text())["records"]
    assert [r["method"] for r in records] == ["metaperturb", "metaperturb_single_pass"]
    assert all(r["arch"] == f"hf:{tmp_path / 'cfg'}" and 0 <= r["accuracy"] <= 1 for r in records)


@pytest.mark.parametrize("script", sorted(path.stem for path in EXAMPLES.glob("*.py")))
def test_every_example_explains_itself_with_help(script, capsys):
    with pytest.raises(SystemExit) as stopped:
        load_script(script).main(["--help"])
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out
    # A multi-line example command keeps its line continuations (a raw docstring), so it can be copied as printed.
    assert not re.search(r"\S {4,}--", out), "an example command's continuation lines were joined"
