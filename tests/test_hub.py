"""Round trips through the loopback Hub emulator (tests/hub_server.py) with the real huggingface_hub client.

Client code runs in subprocesses: huggingface_hub reads HF_ENDPOINT/HF_HUB_OFFLINE at import, and this session has
already imported it offline (conftest.py). Subprocesses are few and do several steps each, since every one pays
for importing torch and transformers.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from hub_server import Hub, hub, running_hub  # noqa: F401  (hub is a fixture)

REPO_ROOT = Path(__file__).resolve().parents[1]
PHI_REPO = "testuser/phi"

_FORWARD = r'''
import sys, torch
from pathlib import Path
torch.set_num_threads(1)
io = Path(sys.argv[2])
inputs = torch.load(io / "inputs.pt", weights_only=True)

def run(model):
    model.eval()
    with torch.no_grad():
        return model(inputs["hidden_states"], inputs["running_mean"].clone(), inputs["running_var"].clone(),
                     channel_norm=16.0, spatial_norm=8.0, noise=inputs["noise"])

def state(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
'''

# With the package: push twice (the second push shifts every weight by 0.5), load through the package class and
# through AutoModel without trust_remote_code, and load the first commit by its sha.
_PUSH_AND_LOAD = _FORWARD + r'''
import metaperturb_hf
from metaperturb_hf import MetaPerturbConfig, MetaPerturbModel
from transformers import AutoModel
from huggingface_hub import HfApi
repo = sys.argv[1]
out = {}
torch.manual_seed(0)
phi = MetaPerturbModel(MetaPerturbConfig(initializer_range=0.1))
out["first_state"], out["first_out"] = state(phi), run(phi)
out["first_sha"] = phi.push_to_hub(repo).oid

loaded = MetaPerturbModel.from_pretrained(repo)
auto = AutoModel.from_pretrained(repo)
assert type(loaded) is MetaPerturbModel and type(auto) is MetaPerturbModel, (type(loaded), type(auto))
out["class_out"], out["auto_out"] = run(loaded), run(auto)
out["class_state"], out["auto_state"] = state(loaded), state(auto)

with torch.no_grad():
    for parameter in phi.parameters():
        parameter.add_(0.5)
out["second_state"], out["second_out"] = state(phi), run(phi)
out["second_sha"] = phi.push_to_hub(repo, commit_message="Shift every weight").oid
out["main_sha"] = HfApi().repo_info(repo).sha
out["at_first_state"] = state(MetaPerturbModel.from_pretrained(repo, revision=out["first_sha"]))
out["at_main_state"] = state(AutoModel.from_pretrained(repo))
torch.save(out, io / "pushed.pt")
'''

# Without the package (blocked in sys.modules, not on PYTHONPATH, cwd elsewhere) and with an empty cache.
_REMOTE_CODE = r'''
import sys
sys.modules["metaperturb_hf"] = None
''' + _FORWARD + r'''
import os
from transformers import AutoModel
repo, first_sha = sys.argv[1], sys.argv[3]
home = Path(os.environ["HF_HOME"])
out = {}

def code_files():
    return sorted(str(p.relative_to(home)) for p in home.rglob("*.py") if p.name != "__init__.py")

def custom_modules():
    """Modules of the repo's code (transformers_modules.<ns>.<name>...) or of the package itself."""
    return sorted(n for n, m in sys.modules.items() if m is not None
                  and (n.count(".") >= 1 and n.startswith("transformers_modules.") or n.startswith("metaperturb_hf")))

try:
    AutoModel.from_pretrained(repo)
    out["refusal"] = None
except ValueError as error:
    out["refusal"] = str(error)
out["modules_after_refusal"], out["code_after_refusal"] = custom_modules(), code_files()

model = AutoModel.from_pretrained(repo, trust_remote_code=True)
old = AutoModel.from_pretrained(repo, trust_remote_code=True, revision=first_sha)
out["module"], out["old_module"], out["model_type"] = type(model).__module__, type(old).__module__, model.config.model_type
out["main_state"], out["main_out"] = state(model), run(model)
out["first_state"], out["first_out"] = state(old), run(old)
out["code_after_load"] = code_files()
try:
    import metaperturb_hf
    out["package_importable"] = True
except ImportError:
    out["package_importable"] = False
torch.save(out, io / "remote.pt")
'''


def _env_with_package(hub: Hub) -> dict:
    env = dict(hub.env)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _env_without_package(hub: Hub, home: Path) -> dict:
    env = dict(hub.env)
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO_ROOT]
    env["PYTHONPATH"] = os.pathsep.join(kept)
    env["HF_HOME"] = str(home)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _assert_same_state(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


@pytest.fixture(scope="module")
def phi_hub(tmp_path_factory):
    """One emulator (safetensors marked LFS, as on the real Hub): testuser/phi pushed twice by the package, then
    loaded without it; then a meta-training output folder pushed with push_perturbation_folder.
    Returns (hub, pushed results, remote results, requests of the pushing step, (folder, release report))."""
    root = tmp_path_factory.mktemp("phi_hub")
    io = root / "io"
    io.mkdir()
    generator = torch.Generator().manual_seed(1)
    torch.save({"hidden_states": torch.randn(3, 5, 6, 6, generator=generator),
                "noise": torch.randn(3, 5, 6, 6, generator=generator),
                "running_mean": torch.rand(5, 4, generator=generator),
                "running_var": torch.rand(5, 4, generator=generator)}, io / "inputs.pt")
    with running_hub(root, lfs_patterns=["*.safetensors"]) as hub:
        hub.run_python(_PUSH_AND_LOAD + _PUSH_FOLDER_DEF + _RELEASE, PHI_REPO, io, RELEASE_REPO,
                       env=_env_with_package(hub))
        pushed = torch.load(io / "pushed.pt", weights_only=True)
        release = json.loads((io / "release.json").read_text())
        push_requests = list(hub.server.requests)
        elsewhere = root / "elsewhere"
        elsewhere.mkdir()
        hub.run_python(_REMOTE_CODE, PHI_REPO, io, pushed["first_sha"], cwd=elsewhere,
                       env=_env_without_package(hub, root / "fresh_hf_home"))
        remote = torch.load(io / "remote.pt", weights_only=True)
        yield hub, pushed, remote, push_requests, (io / "output", release)


def test_push_then_remote_code_load_without_package_gives_identical_outputs(phi_hub):
    hub, pushed, remote, _, _ = phi_hub
    assert remote["package_importable"] is False
    assert remote["module"].startswith("transformers_modules.") and remote["model_type"] == "metaperturb"
    assert any(path.endswith("modeling_metaperturb.py") for path in remote["code_after_load"])
    # main holds the second push, the first sha the first one: same weights, bit-identical outputs for fixed ε.
    _assert_same_state(remote["main_state"], pushed["second_state"])
    assert torch.equal(remote["main_out"], pushed["second_out"])
    _assert_same_state(remote["first_state"], pushed["first_state"])
    assert torch.equal(remote["first_out"], pushed["first_out"])
    assert not torch.equal(pushed["first_out"], pushed["second_out"])
    # The remote code and weights came over HTTP: LFS-marked weights, code files as regular blobs.
    files = hub.server.files(PHI_REPO)
    assert {"config.json", "model.safetensors", "configuration_metaperturb.py", "modeling_metaperturb.py"} <= set(files)
    assert json.loads(files["config.json"])["auto_map"] == {
        "AutoConfig": "configuration_metaperturb.MetaPerturbConfig",
        "AutoModel": "modeling_metaperturb.MetaPerturbModel",
    }
    assert hub.server.get_repo(PHI_REPO).resolve("main").files["model.safetensors"].lfs
    assert hub.server.requests_matching("GET", r"/resolve/[0-9a-f]{40}/modeling_metaperturb\.py$")
    assert not hub.server.unhandled


def test_package_loads_without_trust_remote_code(phi_hub):
    _, pushed, _, push_requests, _ = phi_hub
    _assert_same_state(pushed["class_state"], pushed["first_state"])
    _assert_same_state(pushed["auto_state"], pushed["first_state"])
    assert torch.equal(pushed["class_out"], pushed["first_out"])
    assert torch.equal(pushed["auto_out"], pushed["first_out"])
    # The package's own classes were used: no code file was ever downloaded in that process.
    assert not [r for r in push_requests if r.method == "GET" and r.path.endswith(".py")]


def test_load_refuses_remote_code_without_trust_remote_code(phi_hub):
    _, _, remote, _, _ = phi_hub
    assert remote["refusal"] is not None and "trust_remote_code=True" in remote["refusal"]
    assert remote["modules_after_refusal"] == []   # nothing from the repo was imported...
    assert remote["code_after_refusal"] == []      # ...or even downloaded


def test_second_push_is_a_new_commit_and_old_revision_stays_loadable(phi_hub):
    hub, pushed, _, _, _ = phi_hub
    first, second = pushed["first_sha"], pushed["second_sha"]
    assert first != second and pushed["main_sha"] == second
    initial, *pushes = hub.server.commit_shas(PHI_REPO)
    assert pushes == [first, second]
    _assert_same_state(pushed["at_first_state"], pushed["first_state"])
    _assert_same_state(pushed["at_main_state"], pushed["second_state"])
    assert hub.server.files(PHI_REPO, first)["model.safetensors"] != hub.server.files(PHI_REPO, second)["model.safetensors"]
    # The unchanged config.json was skipped by the client (preupload returned its oid), the weights were not.
    commits = hub.server.requests_matching("POST", rf"^/api/models/{PHI_REPO}/commit/main$")
    assert len(commits) == 2
    second_commit_paths = [line["value"].get("path") for line in commits[1].ndjson()[1:]]
    assert "model.safetensors" in second_commit_paths and "config.json" not in second_commit_paths


# ------------------------------------------------------------------------------------------- push_perturbation_folder
RELEASE = {"config.json", "model.safetensors", "configuration_metaperturb.py", "modeling_metaperturb.py",
           "meta_training.json"}
RELEASE_REPO = "testuser/phi-release"

# Builds what meta-training leaves in output_dir (φ via save_pretrained, meta_training.json, checkpoints/, logs/),
# then pushes it `attempts` times with push_perturbation_folder, recording each outcome and the folder's digests.
_PUSH_FOLDER_DEF = r'''
import hashlib, json, sys, torch
from pathlib import Path
from metaperturb_hf import MetaPerturbConfig, MetaPerturbModel
from metaperturb_hf.hub import push_perturbation_folder

def push_folder(folder, repo, attempts):
    torch.manual_seed(0)
    phi = MetaPerturbModel(MetaPerturbConfig(initializer_range=0.1))
    phi.save_pretrained(folder)
    (folder / "meta_training.json").write_text(json.dumps({"steps": 2, "num_tasks": 2}))
    checkpoint = folder / "checkpoints" / "checkpoint-2"
    phi.save_pretrained(checkpoint / "perturbation")
    torch.save({"step": 2}, checkpoint / "trainer_state.pt")
    torch.save({}, checkpoint / "task-0.pt")
    (folder / "logs").mkdir()
    (folder / "logs" / "metrics.jsonl").write_text('{"step": 1, "valid_loss": 1.0}\n')

    def digest():
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    report = {"before": digest(), "attempts": []}
    for _ in range(attempts):
        try:
            report["attempts"].append({"ok": str(push_perturbation_folder(folder, repo))})
        except Exception as error:
            response = getattr(error, "response", None)
            report["attempts"].append({"error": type(error).__name__, "status": getattr(response, "status_code", None),
                                       "message": str(error)[:500]})
    report["after"] = digest()
    return report
'''
_RELEASE = r'''
(io / "release.json").write_text(json.dumps(push_folder(io / "output", sys.argv[3], 1)))
'''
_PUSH_FOLDER = _PUSH_FOLDER_DEF + r'''
print("REPORT=" + json.dumps(push_folder(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))))
'''


def _report(proc) -> dict:
    line = [line for line in proc.stdout.splitlines() if line.startswith("REPORT=")][-1]
    return json.loads(line[len("REPORT="):])


def test_push_perturbation_folder_uploads_the_release_files(phi_hub):
    hub, pushed, _, _, (folder, report) = phi_hub
    assert report["attempts"] == [{"ok": f"{hub.endpoint}/{RELEASE_REPO}"}]
    files = hub.server.files(RELEASE_REPO)
    assert RELEASE <= set(files)
    for name in RELEASE:
        assert files[name] == (folder / name).read_bytes(), name
    assert not [p for p in files if p.startswith("logs/")]
    assert not [p for p in files if p.endswith((".pt", ".jsonl"))]
    assert "checkpoints/checkpoint-2/perturbation/model.safetensors" not in files
    assert len(hub.server.commit_shas(RELEASE_REPO)) == 2   # initial commit + one upload commit
    # The weights went by LFS, and the object was already stored (same φ as the first push of testuser/phi): only
    # the two pushes of testuser/phi uploaded LFS content.
    assert hub.server.get_repo(RELEASE_REPO).resolve("main").files["model.safetensors"].lfs
    assert files["model.safetensors"] == hub.server.files(PHI_REPO, pushed["first_sha"])["model.safetensors"]
    assert len(hub.server.requests_matching("PUT", r"^/_lfs/")) == 2


def test_push_perturbation_folder_uploads_nothing_from_checkpoints(phi_hub):
    hub = phi_hub[0]
    files = hub.server.files(RELEASE_REPO)
    assert [p for p in files if p.startswith("checkpoints/")] == []


def test_failed_commit_raises_and_leaves_the_folder_intact(hub, tmp_path):
    hub.server.fail_next("POST", r"/commit/", status=500)
    hub.server.fail_next("POST", r"/commit/", status="drop")
    proc = hub.run_python(_PUSH_FOLDER, tmp_path / "output", "testuser/phi-flaky", 3, env=_env_with_package(hub))
    report = _report(proc)
    first, second, third = report["attempts"]
    assert first["error"] == "HfHubHTTPError" and first["status"] == 500, first
    assert "error" in second, second                       # connection closed without an answer
    assert third == {"ok": f"{hub.endpoint}/testuser/phi-flaky"}
    assert report["after"] == report["before"]
    commits = hub.server.requests_matching("POST", r"/commit/")
    assert [(r.status, r.fault) for r in commits] == [(500, "status"), (None, "drop"), (200, None)]
    # The failed attempts created nothing: initial commit + the one successful upload.
    assert len(hub.server.commit_shas("testuser/phi-flaky")) == 2
    assert RELEASE <= set(hub.server.files("testuser/phi-flaky"))


# ------------------------------------------------------------------------------------------------ the emulator itself
_PROTOCOL = r'''
import json, os, sys
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
api, repo, out = HfApi(), "testuser/proto", {}
api.create_repo(repo)
out["again"] = str(api.create_repo(repo, exist_ok=True))
first = api.upload_file(path_or_fileobj=b"one", path_in_repo="a/x.txt", repo_id=repo).oid
second = api.upload_file(path_or_fileobj=b"two", path_in_repo="a/x.txt", repo_id=repo).oid
api.upload_file(path_or_fileobj=b"b", path_in_repo="b.txt", repo_id=repo)
api.create_tag(repo, tag="v1", revision=first)
out["at_first"] = open(hf_hub_download(repo, "a/x.txt", revision=first), "rb").read().decode()
out["at_tag"] = open(hf_hub_download(repo, "a/x.txt", revision="v1"), "rb").read().decode()
out["at_main"] = open(hf_hub_download(repo, "a/x.txt"), "rb").read().decode()
snapshot = snapshot_download(repo, revision=second)
out["snapshot"] = sorted(os.path.relpath(os.path.join(d, f), snapshot) for d, _, fs in os.walk(snapshot) for f in fs)
out["tree"] = sorted(e.path for e in api.list_repo_tree(repo))
out["tree_recursive"] = sorted(e.path for e in api.list_repo_tree(repo, recursive=True))
out["commits"] = [c.title for c in api.list_repo_commits(repo)]
out["exists"] = [api.file_exists(repo, "b.txt"), api.file_exists(repo, "nope.txt"), api.repo_exists("testuser/none")]
out["paths_info"] = sorted(p.path for p in api.get_paths_info(repo, ["a", "b.txt", "missing"]))
api.delete_file("b.txt", repo)
out["after_delete"] = sorted(api.list_repo_files(repo))
for name, call in [("repo", lambda: hf_hub_download("testuser/none", "x")),
                   ("revision", lambda: hf_hub_download(repo, "a/x.txt", revision="nobranch")),
                   ("entry", lambda: hf_hub_download(repo, "missing.txt"))]:
    try:
        call()
        out[name] = None
    except (RevisionNotFoundError, EntryNotFoundError, RepositoryNotFoundError) as error:
        out[name] = type(error).__name__
print("REPORT=" + json.dumps(out))
'''


def test_emulator_speaks_the_client_protocol(hub):
    report = _report(hub.run_python(_PROTOCOL))
    assert report["again"] == f"{hub.endpoint}/testuser/proto"
    assert (report["at_first"], report["at_tag"], report["at_main"]) == ("one", "one", "two")
    assert report["snapshot"] == [".gitattributes", "a/x.txt"]
    assert report["tree"] == [".gitattributes", "a", "b.txt"]
    assert report["tree_recursive"] == [".gitattributes", "a", "a/x.txt", "b.txt"]
    assert len(report["commits"]) == 4 and report["commits"][-1] == "initial commit"
    assert report["exists"] == [True, False, False]
    assert report["paths_info"] == ["a", "b.txt"]
    assert report["after_delete"] == [".gitattributes", "a/x.txt"]
    assert (report["repo"], report["revision"], report["entry"]) == (
        "RepositoryNotFoundError", "RevisionNotFoundError", "RemoteEntryNotFoundError")
    assert not hub.server.unhandled
    assert all(r.headers.get("authorization") == "Bearer hf_dummy" for r in hub.server.requests)
