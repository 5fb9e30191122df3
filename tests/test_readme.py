"""The README's usage example runs as written (with the authors' checkpoint from ../shared), and its tables and those
of docs/ are what the committed records make."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from metaperturb_hf import PerturbationConfig

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


def load_refresh_docs():
    spec = importlib.util.spec_from_file_location("refresh_docs", README.parent / "scripts" / "refresh_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tables_made_from_records_are_generated_blocks_and_none_is_stale():
    refresh_docs = load_refresh_docs()
    present = {(path.name, *block)
               for path in refresh_docs.DOCUMENTS for block in refresh_docs.blocks(path.read_text())}
    wanted = {("README.md", "grid_1500", "headline_table"), ("README.md", "grid_1500", "targets_table")} | {
        ("results.md", "grid_1500", name)
        for name in ("markdown_table", "gain_table", "single_pass_table", "regularizer_table", "placement_table")
    } | {("results.md", "single_pass_1500", "single_pass_table"), ("results.md", "tin_transfer", "markdown_table"),
         ("results.md", "lookahead_1500", "markdown_table")}
    assert wanted <= present, f"generated blocks missing: {wanted - present}"
    assert refresh_docs.stale_blocks() == [], "docs are stale: python scripts/refresh_docs.py"


def test_refresh_rewrites_a_stale_block_and_names_an_unknown_table(tmp_path):
    refresh_docs = load_refresh_docs()
    makers = {"count": lambda records: f"{len(records)} records\n"}
    stale = "before\n<!-- generated: grid_1500 count -->\nold\n<!-- end generated -->\nafter\n"
    fresh = refresh_docs.refreshed(stale, makers)
    records = len(refresh_docs.load_records(refresh_docs.RESULTS / "grid_1500.jsonl"))
    assert fresh == (f"before\n<!-- generated: grid_1500 count -->\n\n{records} records\n\n"
                     "<!-- end generated -->\nafter\n")
    assert refresh_docs.refreshed(fresh, makers) == fresh
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        refresh_docs.refreshed(stale.replace("count", "nope"), makers)
    with pytest.raises(FileNotFoundError, match="no_such_grid"):
        refresh_docs.refreshed(stale.replace("grid_1500", "no_such_grid"), makers)
