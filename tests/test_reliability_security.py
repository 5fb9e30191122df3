"""Reliability, security: code that comes with weights never runs unless asked, pickles are never executed.

Every hostile file here, when run, writes a marker file; the tests check the marker is absent after each load, and
present after the one load that is allowed to run code (`trust_remote_code=True`), so that the check is not vacuous.

- hub repos, loaded with the package installed: a φ repo whose code files were replaced, a repo of an unknown
  model_type that brings its own classes, a φ repo whose weights are a pickle with code;
- local folders: the same hostile φ folder, and a classifier of an unknown model_type under a PerturbedModel;
- the authors' checkpoint (.pth): pickles with code in every form torch.load meets (legacy, zip, nested beside real
  tensors, through os.system), through the API and the command line;
- meta-training checkpoints: a trainer state or task file replaced by a pickle with code.

test_hub.py shows the refusal without the package (nothing downloaded or imported); not repeated here.
"""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from hub_server import running_hub
from test_convert import official_like_state
from test_hub import _env_with_package
from test_meta_training import trainer
from transformers import AutoConfig, AutoModel

from metaperturb_hf import (
    MetaPerturbConfig,
    MetaPerturbModel,
    PerturbationConfig,
    PerturbedModel,
    convert_official_checkpoint,
)
from metaperturb_hf.convert import main as convert_main
from metaperturb_hf.loading import load_perturbation


def hostile_code(marker: Path) -> str:
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran in ' + __name__)\n"


class RunsCode:
    """Unpickling this runs `code` (what a malicious checkpoint does)."""

    def __init__(self, code: str, via: str = "exec"):
        self.code, self.via = code, via

    def __reduce__(self):
        if self.via == "system":
            return (os.system, (f"python -c {self.code!r}",))
        return (exec, (self.code,))


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "code-ran"
    yield path
    assert not path.exists(), f"hostile code ran: {path.read_text() if path.exists() else ''}"


def hostile_phi_folder(folder: Path, marker: Path) -> Path:
    """A saved φ whose code files write the marker when imported (and still define the classes)."""
    torch.manual_seed(0)
    MetaPerturbModel(MetaPerturbConfig(initializer_range=0.1)).save_pretrained(folder)
    for name in ("configuration_metaperturb.py", "modeling_metaperturb.py"):
        (folder / name).write_text(hostile_code(marker) + (folder / name).read_text())
    return folder


# ------------------------------------------------------------------------------------------------------- hub repos
_HUB = r'''
import json, sys
from pathlib import Path
from huggingface_hub import HfApi
from metaperturb_hf import MetaPerturbModel
from metaperturb_hf.hub import download_repo
from metaperturb_hf.loading import load_perturbation
from transformers import AutoConfig, AutoModel

marker, folder, evil_dir = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
api = HfApi()
for repo, source in [("testuser/phi-hostile-code", folder), ("testuser/unknown-type", evil_dir / "unknown"),
                     ("testuser/phi-pickle", evil_dir / "pickle")]:
    api.create_repo(repo)
    api.upload_folder(repo_id=repo, folder_path=source)

report = {}

def attempt(name, call):
    try:
        result = call()
        report[name] = {"ok": type(result).__module__ + "." + type(result).__name__}
    except Exception as error:
        report[name] = {"error": type(error).__name__, "message": str(error)[:600]}
    report[name]["code_ran"] = marker.exists()
    report[name]["repo_modules"] = sorted(m for m in sys.modules if m.startswith("transformers_modules."))

attempt("class", lambda: MetaPerturbModel.from_pretrained("testuser/phi-hostile-code"))
attempt("automodel", lambda: AutoModel.from_pretrained("testuser/phi-hostile-code"))
attempt("autoconfig", lambda: AutoConfig.from_pretrained("testuser/phi-hostile-code"))
attempt("download", lambda: load_perturbation(download_repo("testuser/phi-hostile-code")))
attempt("unknown automodel", lambda: AutoModel.from_pretrained("testuser/unknown-type"))
attempt("unknown autoconfig", lambda: AutoConfig.from_pretrained("testuser/unknown-type"))
attempt("pickle weights", lambda: MetaPerturbModel.from_pretrained("testuser/phi-pickle"))
attempt("pickle weights automodel", lambda: AutoModel.from_pretrained("testuser/phi-pickle"))
# With the package, even trust_remote_code=True loads a φ repo through the package's classes.
attempt("trusted phi", lambda: AutoModel.from_pretrained("testuser/phi-hostile-code", trust_remote_code=True))
# The one load allowed to run a repo's code: it must, or the checks above prove nothing (its code defines no class).
attempt("trusted", lambda: AutoConfig.from_pretrained("testuser/unknown-type", trust_remote_code=True))
print("REPORT=" + json.dumps(report))
'''


@pytest.fixture(scope="module")
def hub_report(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("hostile_hub")
    marker = tmp_path / "hub-code-ran"
    folder = hostile_phi_folder(tmp_path / "phi", marker)
    unknown = tmp_path / "evil" / "unknown"
    unknown.mkdir(parents=True)
    (unknown / "config.json").write_text(json.dumps({
        "model_type": "evil-net",
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}}))
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (unknown / name).write_text(hostile_code(marker))
    pickled = tmp_path / "evil" / "pickle"
    pickled.mkdir()
    shutil.copy(folder / "config.json", pickled / "config.json")
    torch.save({"scale_weight": RunsCode(hostile_code(marker))}, pickled / "pytorch_model.bin")
    with running_hub(tmp_path) as hub:
        proc = hub.run_python(_HUB, marker, folder, tmp_path / "evil", env=_env_with_package(hub))
    # (transformers asks "Do you wish to run the custom code? [y/N]" on the closed stdin: no, on the same line)
    lines = [line.split("REPORT=", 1)[1] for line in proc.stdout.splitlines() if "REPORT=" in line]
    assert lines, f"no report:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1]), marker


def test_hub_repos_never_run_their_code_without_trust_remote_code(hub_report):
    report, marker = hub_report
    untrusted = {name: outcome for name, outcome in report.items() if name != "trusted"}
    for name, outcome in untrusted.items():
        assert not outcome["code_ran"] and outcome["repo_modules"] == [], (name, outcome)
    # With the package, a φ repo loads through the package's own classes, whatever code files it carries.
    for name in ("class", "automodel", "download", "trusted phi"):
        assert report[name]["ok"] == "metaperturb_hf.modeling_metaperturb.MetaPerturbModel", (name, report[name])
    assert report["autoconfig"]["ok"] == "metaperturb_hf.configuration_metaperturb.MetaPerturbConfig"
    # A type nobody registered: refused, with the way to allow it.
    for name in ("unknown automodel", "unknown autoconfig"):
        assert report[name]["error"] == "ValueError" and "trust_remote_code=True" in report[name]["message"]
    # Weights that are a pickle with code: refused by torch.load(weights_only=True).
    for name in ("pickle weights", "pickle weights automodel"):
        assert "error" in report[name] and "weights_only" in report[name]["message"], report[name]


def test_trust_remote_code_does_run_the_code_so_the_checks_are_not_vacuous(hub_report):
    report, marker = hub_report
    assert report["trusted"]["code_ran"] and report["trusted"]["repo_modules"], report["trusted"]
    assert marker.read_text().startswith("ran in transformers_modules.")
    marker.unlink()  # expected here; the fixture's final check is for the other loads


# --------------------------------------------------------------------------------------------------- local folders
def test_a_local_phi_folder_with_hostile_code_loads_without_running_it(tmp_path, marker):
    folder = hostile_phi_folder(tmp_path / "phi", marker)
    for loader in (MetaPerturbModel.from_pretrained, AutoModel.from_pretrained, load_perturbation):
        assert type(loader(folder)) is MetaPerturbModel
    assert type(AutoConfig.from_pretrained(folder)) is MetaPerturbConfig


def test_a_perturbed_model_folder_with_a_classifier_of_unknown_type_is_refused(tmp_path, marker):
    folder = tmp_path / "perturbed"
    hostile_phi_folder(folder / "perturbation", marker)
    (folder / "perturbation_sites.json").write_text(json.dumps({"sites": []}))
    PerturbationConfig().save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "evil-net", "auto_map": {
        "AutoConfig": "configuration_evil.EvilConfig", "AutoModelForImageClassification": "modeling_evil.EvilModel"}}))
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (folder / name).write_text(hostile_code(marker))
    with pytest.raises(ValueError, match="trust_remote_code"):
        PerturbedModel.from_pretrained(folder)


# ------------------------------------------------------------------------------------------- the authors' checkpoint
def write_legacy_pickle(path, obj):
    with open(path, "wb") as file:
        pickle.dump(obj, file)


def write_zip(path, obj):
    torch.save(obj, path)


@pytest.mark.parametrize(
    "write, make",
    [
        (write_legacy_pickle, lambda code: {"kernel": RunsCode(code)}),
        (write_zip, lambda code: {"kernel": RunsCode(code)}),
        (write_zip, lambda code: {**official_like_state(), "fc.weight": RunsCode(code)}),
        (write_zip, lambda code: RunsCode(code)),
        (write_zip, lambda code: {"kernel": RunsCode(code, via="system")}),
        (write_legacy_pickle, lambda code: [official_like_state(), RunsCode(code)]),
    ],
    ids=["legacy-pickle", "zip", "beside-real-tensors", "whole-file", "os-system", "legacy-in-a-list"],
)
def test_converting_a_checkpoint_that_carries_code_never_runs_it(tmp_path, marker, write, make):
    write(tmp_path / "phi.pth", make(hostile_code(marker)))
    with pytest.raises(ValueError, match=r"can be read safely with weights_only=True \(not unpickled: .*"
                                         r"(Unsupported|GLOBAL)"):
        convert_official_checkpoint(tmp_path / "phi.pth")
    with pytest.raises(SystemExit) as exit_info:
        convert_main([str(tmp_path / "phi.pth"), str(tmp_path / "out")])
    assert exit_info.value.code == 1 and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------- meta-training checkpoints
@pytest.mark.parametrize("name", ["trainer_state.pt", "task-2.pt"])
def test_resuming_from_a_checkpoint_file_that_carries_code_never_runs_it(tmp_path, marker, name):
    t = trainer(tmp_path, steps=2)
    checkpoint = t.save_checkpoint()  # step 0
    torch.save({"step": 1, "num_tasks": 4, "phi_optimizer": RunsCode(hostile_code(marker))}, checkpoint / name)
    before = [p.detach().clone() for p in t.phi.parameters()]
    with pytest.raises(ValueError, match=rf"Cannot read .*{name} \(UnpicklingError: not unpickled: Unsupported global"
                                         rf".*nothing was restored"):
        t.resume(checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(before, t.phi.parameters()))
