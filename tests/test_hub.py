"""Round trips through the loopback Hub emulator (tests/hub_server.py) with the real huggingface_hub client.

Client code runs in subprocesses: huggingface_hub reads HF_ENDPOINT/HF_HUB_OFFLINE at import, and this session has
already imported it offline (conftest.py). Subprocesses are few and do several steps each, since every one pays
for importing torch and transformers.
"""

import hashlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from conftest_data import image_dataset
from hub_server import Hub, hub, running_hub  # noqa: F401  (hub is a fixture)
from huggingface_hub import ModelCard

from metaperturb_hf.hub import LIBRARY_NAME, TAGS, meta_training_facts

REPO_ROOT = Path(__file__).resolve().parents[1]
PHI_REPO = "testuser/phi"
RELEASE_REPO = "testuser/phi-release"
PERTURBED_REPO = "testuser/resnet-perturbed"

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
out["load_perturbation_state"] = state(metaperturb_hf.load_perturbation(repo))
out["load_perturbation_first_state"] = state(metaperturb_hf.load_perturbation(repo, revision=out["first_sha"]))
torch.save(out, io / "pushed.pt")
'''

# A perturbed transformers classifier whose BatchNorm and site statistics have moved, placed by a config and left in
# "mean" mode: pushed, loaded back by repo id, evaluated with the deterministic "mean" noise and with sampled noise
# under one seed.
_PERTURBED = r'''
from transformers import ResNetConfig, ResNetForImageClassification
from metaperturb_hf import PerturbationConfig, PerturbedModel, add_perturbation
torch.manual_seed(0)
config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
placement = PerturbationConfig(select="top", num_sites=1, channel_norm=32, noise_mode="mean")
resnet = ResNetForImageClassification(config)
perturbed = add_perturbation(resnet, MetaPerturbModel(MetaPerturbConfig(initializer_range=0.1)), placement)
images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
perturbed.train()
with torch.no_grad():
    for _ in range(3):
        perturbed(pixel_values=images)

def evaluate(model):
    model.eval()
    outputs = []
    for mode in ("mean", "sample"):
        model.set_noise_mode(mode)
        torch.manual_seed(7)
        with torch.no_grad():
            outputs.append(model(pixel_values=images).logits)
    return outputs

out = {"url": perturbed.push_to_hub(sys.argv[4]), "placement": placement.to_dict()}
out.update(before=evaluate(perturbed), state_before=state(perturbed))
loaded = PerturbedModel.from_pretrained(sys.argv[4])
out.update(loaded_placement=loaded.perturbation_config.to_dict(), classifier=type(loaded.model).__name__,
           config_by_repo_id=PerturbationConfig.from_pretrained(sys.argv[4]).to_dict())
out.update(after=evaluate(loaded), state_after=state(loaded))
torch.save(out, io / "perturbed.pt")
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
out["module"], out["old_module"], out["model_type"] = (type(model).__module__, type(old).__module__,
                                                       model.config.model_type)
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
    # Outputs are compared bit for bit with the remote code's, which (without the package) runs φ's eager path.
    env["METAPERTURB_KERNEL"] = "eager"
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
    """One emulator (safetensors marked LFS, as on the real Hub): testuser/phi pushed twice by the package, a
    meta-training output folder pushed with push_perturbation_folder, a perturbed classifier pushed and loaded back;
    then testuser/phi loaded without the package. Returns a dict of what each step recorded."""
    root = tmp_path_factory.mktemp("phi_hub")
    io = root / "io"
    io.mkdir()
    generator = torch.Generator().manual_seed(1)
    torch.save({"hidden_states": torch.randn(3, 5, 6, 6, generator=generator),
                "noise": torch.randn(3, 5, 6, 6, generator=generator),
                "running_mean": torch.rand(5, 4, generator=generator),
                "running_var": torch.rand(5, 4, generator=generator)}, io / "inputs.pt")
    with running_hub(root, lfs_patterns=["*.safetensors"]) as hub:
        hub.run_python(_PUSH_AND_LOAD + _OUTPUT_DEF + _RELEASE + _PERTURBED, PHI_REPO, io, RELEASE_REPO,
                       PERTURBED_REPO, env=_env_with_package(hub))
        pushed = torch.load(io / "pushed.pt", weights_only=True)
        push_requests = list(hub.server.requests)
        elsewhere = root / "elsewhere"
        elsewhere.mkdir()
        hub.run_python(_REMOTE_CODE, PHI_REPO, io, pushed["first_sha"], cwd=elsewhere,
                       env=_env_without_package(hub, root / "fresh_hf_home"))
        yield {"hub": hub, "pushed": pushed, "remote": torch.load(io / "remote.pt", weights_only=True),
               "push_requests": push_requests, "folder": io / "output",
               "release": json.loads((io / "release.json").read_text()),
               "perturbed": torch.load(io / "perturbed.pt", weights_only=True)}


def test_push_then_remote_code_load_without_package_gives_identical_outputs(phi_hub):
    hub, pushed, remote = phi_hub["hub"], phi_hub["pushed"], phi_hub["remote"]
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
    assert {"config.json", "model.safetensors", "configuration_metaperturb.py",
            "modeling_metaperturb.py"} <= set(files)
    assert json.loads(files["config.json"])["auto_map"] == {
        "AutoConfig": "configuration_metaperturb.MetaPerturbConfig",
        "AutoModel": "modeling_metaperturb.MetaPerturbModel",
    }
    assert hub.server.get_repo(PHI_REPO).resolve("main").files["model.safetensors"].lfs
    assert hub.server.requests_matching("GET", r"/resolve/[0-9a-f]{40}/modeling_metaperturb\.py$")
    assert not hub.server.unhandled


def test_package_loads_without_trust_remote_code(phi_hub):
    pushed = phi_hub["pushed"]
    _assert_same_state(pushed["load_perturbation_state"], pushed["second_state"])   # load_perturbation(repo id)
    _assert_same_state(pushed["load_perturbation_first_state"], pushed["first_state"])
    _assert_same_state(pushed["class_state"], pushed["first_state"])
    _assert_same_state(pushed["auto_state"], pushed["first_state"])
    assert torch.equal(pushed["class_out"], pushed["first_out"])
    assert torch.equal(pushed["auto_out"], pushed["first_out"])
    # The package's own classes were used: no code file of testuser/phi was ever downloaded in that process.
    assert not [r for r in phi_hub["push_requests"] if r.method == "GET" and r.path.startswith(f"/{PHI_REPO}/")
                and r.path.endswith(".py")]


def test_load_refuses_remote_code_without_trust_remote_code(phi_hub):
    remote = phi_hub["remote"]
    assert remote["refusal"] is not None and "trust_remote_code=True" in remote["refusal"]
    assert remote["modules_after_refusal"] == []   # nothing from the repo was imported...
    assert remote["code_after_refusal"] == []      # ...or even downloaded


def test_second_push_is_a_new_commit_and_old_revision_stays_loadable(phi_hub):
    hub, pushed = phi_hub["hub"], phi_hub["pushed"]
    first, second = pushed["first_sha"], pushed["second_sha"]
    assert first != second and pushed["main_sha"] == second
    initial, *pushes = hub.server.commit_shas(PHI_REPO)
    assert pushes == [first, second]
    _assert_same_state(pushed["at_first_state"], pushed["first_state"])
    _assert_same_state(pushed["at_main_state"], pushed["second_state"])
    assert (hub.server.files(PHI_REPO, first)["model.safetensors"]
            != hub.server.files(PHI_REPO, second)["model.safetensors"])
    # The unchanged config.json was skipped by the client (preupload returned its oid), the weights were not.
    commits = hub.server.requests_matching("POST", rf"^/api/models/{PHI_REPO}/commit/main$")
    assert len(commits) == 2
    second_commit_paths = [line["value"].get("path") for line in commits[1].ndjson()[1:]]
    assert "model.safetensors" in second_commit_paths and "config.json" not in second_commit_paths


def test_perturbed_classifier_pushed_and_loaded_back_gives_identical_eval_outputs(phi_hub):
    hub, perturbed = phi_hub["hub"], phi_hub["perturbed"]
    assert perturbed["url"] == f"{hub.endpoint}/{PERTURBED_REPO}"
    assert perturbed["classifier"] == "ResNetForImageClassification"
    # The config came back as it was pushed, the noise mode included; and on its own by repo id.
    assert perturbed["loaded_placement"] == perturbed["config_by_repo_id"] == perturbed["placement"]
    assert perturbed["placement"]["noise_mode"] == "mean" and perturbed["placement"]["format_version"] == 1
    _assert_same_state(perturbed["state_after"], perturbed["state_before"])
    means = [v for k, v in perturbed["state_before"].items()
             if k.startswith("site_statistics.") and k.endswith("_mean")]
    assert means and all(v.abs().sum() > 0 for v in means)   # the site statistics left their initial zeros
    for before, after in zip(perturbed["before"], perturbed["after"]):     # "mean" noise, then sampled noise
        assert torch.equal(before, after)
    assert not torch.equal(*perturbed["before"])
    files = hub.server.files(PERTURBED_REPO)
    assert {"config.json", "model.safetensors", "perturbation/config.json", "perturbation/model.safetensors",
            "perturbation_config.json", "perturbation_sites.json", "perturbation_sites.safetensors"} <= set(files)
    assert len(hub.server.commit_shas(PERTURBED_REPO)) == 2   # initial commit + one upload commit


# ------------------------------------------------------------------------------------------- push_perturbation_folder
RELEASE = {"config.json", "model.safetensors", "configuration_metaperturb.py", "modeling_metaperturb.py",
           "meta_training.json"}
META_TRAINING = {"steps": 2, "num_tasks": 2, "image_size": 16}

# What meta-training leaves in output_dir (φ via save_pretrained, meta_training.json, checkpoints/, logs/), the
# folder's digests, and one call's outcome as a dict (the HubError's message and the error it was raised from).
_OUTPUT_DEF = r"""
import hashlib, json, sys, torch
from pathlib import Path
from metaperturb_hf import MetaPerturbConfig, MetaPerturbModel
from metaperturb_hf.hub import push_perturbation_folder

def make_output(folder):
    torch.manual_seed(0)
    phi = MetaPerturbModel(MetaPerturbConfig(initializer_range=0.1))
    phi.save_pretrained(folder)
    (folder / "meta_training.json").write_text(json.dumps(%s))
    checkpoint = folder / "checkpoints" / "checkpoint-2"
    phi.save_pretrained(checkpoint / "perturbation")
    torch.save({"step": 2}, checkpoint / "trainer_state.pt")
    torch.save({}, checkpoint / "task-0.pt")
    (folder / "logs").mkdir()
    (folder / "logs" / "metrics.jsonl").write_text('{"step": 1, "valid_loss": 1.0}\n')

def digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}

def attempt(call):
    try:
        return {"ok": call()}
    except Exception as error:
        cause = error.__cause__
        return {"error": type(error).__name__, "cause": type(cause).__name__ if cause else None, "message": str(error)}
""" % json.dumps(META_TRAINING)  # noqa: UP031 (the code holds braces)
_RELEASE = r"""
make_output(io / "output")
release = {"before": digest(io / "output")}
release["attempt"] = attempt(lambda: push_perturbation_folder(io / "output", sys.argv[3]))
release["after"] = digest(io / "output")
(io / "release.json").write_text(json.dumps(release))
"""


def _report(proc) -> dict:
    line = [line for line in proc.stdout.splitlines() if line.startswith("REPORT=")][-1]
    return json.loads(line[len("REPORT="):])


def test_push_perturbation_folder_uploads_the_release_files_and_card(phi_hub):
    hub, pushed, folder, release = phi_hub["hub"], phi_hub["pushed"], phi_hub["folder"], phi_hub["release"]
    assert release["attempt"] == {"ok": f"{hub.endpoint}/{RELEASE_REPO}"}
    files = hub.server.files(RELEASE_REPO)
    assert set(files) == RELEASE | {".gitattributes", "README.md"}   # no logs/, checkpoints/ or *.pt
    for name in RELEASE:
        assert files[name] == (folder / name).read_bytes(), name
    assert len(hub.server.commit_shas(RELEASE_REPO)) == 2   # initial commit + one upload commit
    # The card was built in memory from meta_training.json: the folder is as meta-training left it.
    assert release["after"] == release["before"] and "README.md" not in release["after"]
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == LIBRARY_NAME and card.data.tags == TAGS
    for key, value in meta_training_facts(META_TRAINING).items():
        assert f"| `{key}` | {value} |" in card.text
    assert f"sha256 `{hashlib.sha256(files['model.safetensors']).hexdigest()}`" in card.text
    assert f'MetaPerturbModel.from_pretrained("{RELEASE_REPO}")' in card.text
    # The weights went by LFS, and their object was already stored by the first push of testuser/phi (same φ).
    assert hub.server.get_repo(RELEASE_REPO).resolve("main").files["model.safetensors"].lfs
    assert files["model.safetensors"] == hub.server.files(PHI_REPO, pushed["first_sha"])["model.safetensors"]
    oid = hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert len(hub.server.requests_matching("PUT", rf"^/_lfs/{oid}$")) == 1


# A push that fails in every way the brief names, then downloads that fail; the folder's digests around them all.
_FAILURES = _OUTPUT_DEF + r"""
import huggingface_hub.constants as constants
from metaperturb_hf.hub import download_repo
folder, repo, closed = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
make_output(folder)
report = {"before": digest(folder), "push": {}, "download": {}}

def push(token=None):
    return push_perturbation_folder(folder, repo, token=token)

for name, call in [("server error", push), ("connection dropped", push),
                   ("read-only token", lambda: push("hf_reader")),
                   ("unknown token", lambda: push("hf_wrong")), ("ok", push)]:
    report["push"][name] = attempt(call)
live, constants.ENDPOINT = constants.ENDPOINT, closed
report["push"]["connection refused"] = attempt(push)
report["download"]["connection refused"] = attempt(lambda: str(download_repo(repo)))
constants.ENDPOINT = live
report["download"]["server error"] = attempt(lambda: str(download_repo(repo)))
report["download"]["no such repo"] = attempt(lambda: str(download_repo("testuser/none")))
report["download"]["ok"] = attempt(lambda: sorted(p.name for p in download_repo(repo).iterdir()))
report["after"] = digest(folder)
print("REPORT=" + json.dumps(report))
"""


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_failed_pushes_and_downloads_say_what_failed_and_leave_the_folder_intact(tmp_path):
    repo = "testuser/phi-flaky"
    with running_hub(tmp_path, tokens={"hf_dummy": "write", "hf_reader": "read"}) as hub:
        hub.server.fail_next("POST", r"/commit/", status=500)
        hub.server.fail_next("POST", r"/commit/", status="drop")
        hub.server.fail_next("GET", r"/resolve/[0-9a-f]{40}/model\.safetensors$", status=500)
        closed = f"http://127.0.0.1:{_closed_port()}"
        report = _report(hub.run_python(_FAILURES, tmp_path / "output", repo, closed, env=_env_with_package(hub)))
        push, download = report["push"], report["download"]
        assert push["ok"] == {"ok": f"{hub.endpoint}/{repo}"}
        assert {outcome.get("error") for name, outcome in push.items() if name != "ok"} == {"HubError"}
        where = f"to {repo} on {hub.endpoint} failed while"
        assert f"{where} uploading 6 files in one commit: the server answered HTTP 500 (Injected fault)" in \
            push["server error"]["message"]
        assert f"{where} uploading 6 files in one commit: RemoteProtocolError: Server disconnected" in \
            push["connection dropped"]["message"]
        assert "HTTP 403 (You don't have the rights" in push["read-only token"]["message"]
        assert f"{where} creating the repository: the server answered HTTP 401 (Invalid credentials" in \
            push["unknown token"]["message"]
        for name in ("read-only token", "unknown token"):
            assert "authorisation refused: check the token" in push[name]["message"]
        assert (f"on {closed} failed while creating the repository: ConnectionRefusedError"
                in push["connection refused"]["message"])
        assert all("Nothing local was changed" in outcome["message"]
                   for outcome in push.values() if "error" in outcome)
        assert report["after"] == report["before"]
        assert len(hub.server.commit_shas(repo)) == 2   # the failed attempts created nothing
        assert RELEASE | {"README.md"} <= set(hub.server.files(repo))

        assert download["ok"]["ok"] == sorted(RELEASE | {"README.md"})
        assert download["server error"]["error"] == "HubError" and (
            f"Downloading model.safetensors from {repo}@main on {hub.endpoint} (commit "
            in download["server error"]["message"]) and (
            "HTTP 500 (Injected fault)" in download["server error"]["message"])
        assert (f"Looking up {repo}@main on {closed} failed: ConnectionRefusedError"
                in download["connection refused"]["message"])
        assert "Looking up testuser/none@main" in download["no such repo"]["message"]
        assert download["no such repo"]["cause"] == "RepositoryNotFoundError"


# -------------------------------------------------------------------------------------------- examples/meta_train.py
_META_TRAIN = r"""
import runpy, sys
sys.argv = [%r, *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
""" % str(REPO_ROOT / "examples" / "meta_train.py")  # noqa: UP031


def test_meta_train_script_publishes_phi_with_its_card(hub, tmp_path):
    data, output, repo = tmp_path / "source", tmp_path / "output", "testuser/phi-meta-trained"
    data.mkdir()
    image_dataset(num_classes=8, per_class=20, size=16).to_parquet(str(data / "train.parquet"))
    proc = hub.run_python(_META_TRAIN, "--dataset", data, "--num-groups", "2", "--arch", "conv4", "--batch-size", "8",
                          "--image-size", "16", "--steps", "2", "--checkpoint-every", "0", "--output-dir", output,
                          "--push-to-hub", repo, env=_env_with_package(hub))
    assert f"Published φ with its model card to {hub.endpoint}/{repo}" in proc.stdout
    files = hub.server.files(repo)
    assert RELEASE | {"README.md"} <= set(files)
    assert files["model.safetensors"] == (output / "model.safetensors").read_bytes()
    assert not (output / "README.md").exists()
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == LIBRARY_NAME and card.data.license == "apache-2.0"
    record = json.loads((output / "meta_training.json").read_text())
    assert record["steps"] == 2 and record["source_dataset"] == str(data)
    for key, value in meta_training_facts(record).items():
        assert f"| `{key}` | {value} |" in card.text, key
    assert f'MetaPerturbModel.from_pretrained("{repo}")' in card.text and "MetaPerturbCallback" in card.text
    assert "Ryu, Shin, Lee, Hwang" in card.text and "No transfer results recorded" in card.text


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


_TRUNCATED = r'''
import sys
from pathlib import Path
from huggingface_hub import HfApi
from metaperturb_hf import MetaPerturbConfig, MetaPerturbModel
folder, repo = Path(sys.argv[1]), sys.argv[2]
MetaPerturbModel(MetaPerturbConfig()).save_pretrained(folder)
weights = folder / "model.safetensors"
weights.write_bytes(weights.read_bytes()[:100])
HfApi().create_repo(repo)
HfApi().upload_folder(repo_id=repo, folder_path=folder)
try:
    MetaPerturbModel.from_pretrained(repo)
except OSError as error:
    print(error)
'''


def test_a_truncated_weights_file_of_a_hub_repo_is_named_with_the_repo(hub, tmp_path):
    repo = "testuser/phi-truncated"
    proc = hub.run_python(_TRUNCATED, tmp_path / "phi", repo, cwd=tmp_path, env=_env_with_package(hub))
    assert proc.stdout.startswith(f"Cannot read model.safetensors of the hub repo {repo} ("), proc.stdout + proc.stderr
    assert "force_download=True" in proc.stdout
