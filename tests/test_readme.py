"""The README's usage example runs as written (with the authors' checkpoint from ../shared)."""

import importlib.util
import re
from pathlib import Path

import torch

from metaperturb_hf import PerturbationConfig
from metaperturb_hf.results import markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_usage_example_runs(official_checkpoint, tmp_path, monkeypatch):
    text = README.read_text()
    usage = text[text.index("## Usage"):]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    code = code.replace('"official_tin_resnet20_perturb_750.pth"', repr(str(official_checkpoint)))
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["probs"].shape == (4, 10)
    assert (tmp_path / "metaperturb-tin-resnet20" / "model.safetensors").is_file()
    for name in ("perturbation_config.json", "perturbation_sites.json", "config.json", "model.safetensors"):
        assert (tmp_path / "perturbed-resnet" / name).is_file(), name
    model, loaded = namespace["model"], namespace["loaded"]
    assert loaded.perturbation_config == model.perturbation_config == PerturbationConfig(noise_mode="mean")
    assert loaded.sites == model.sites and loaded.single_pass_calibrated == model.single_pass_calibrated
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def grid_summary_and_records(name: str):
    spec = importlib.util.spec_from_file_location("grid_summary", README.parent / "benchmarks" / "grid_summary.py")
    grid_summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grid_summary)
    return grid_summary, grid_summary.load_records(README.parent / "benchmarks" / "results" / f"{name}.jsonl")


def test_the_results_headline_is_what_grid_summary_makes_of_the_committed_records():
    grid_summary, records = grid_summary_and_records("grid_1500")
    results = README.read_text().split("## Results", 1)[1].split("\n## ", 1)[0]
    assert grid_summary.headline_table(records) in results, "README is stale: python benchmarks/grid_summary.py ..."


def test_the_tables_of_docs_results_are_those_of_the_committed_records():
    text = (README.parent / "docs" / "results.md").read_text()
    grid_summary, records = grid_summary_and_records("grid_1500")
    tables = {"transfer_grid.py --report": markdown_table(records)}
    tables |= {f"grid_summary.py's {f.__name__}": f(records) for f in (grid_summary.gain_table,
               grid_summary.single_pass_table, grid_summary.regularizer_table, grid_summary.placement_table)}
    grid_summary, records = grid_summary_and_records("single_pass_1500")
    tables["single_pass_1500's single_pass_table"] = grid_summary.single_pass_table(records)
    stale = [name for name, table in tables.items() if table not in text]
    assert not stale, f"docs/results.md is stale, regenerate: {stale}"
