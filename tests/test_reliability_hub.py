"""Reliability, hub: server errors (500, 404) and dropped connections at every step of a push and of a download.

test_hub.py already fails the upload commit (500, dropped), the weights' download (500), a closed port, bad tokens
and a missing repo. Here the other steps fail, one at a time, each followed by the same call again:

- push (`push_perturbation_folder`): creating the repo, preupload (the commit is test_hub.py's); a failed LFS batch
  or LFS upload is retried by the client itself, which is checked too;
- download (`download_repo`, then `loading.load_perturbation`): the repo lookup (500, dropped), a file's
  metadata (404, dropped), its content (404; a dropped one is resumed by the client itself).

What holds: every failure is a `HubError` naming the step or file, the repository, the endpoint and the reason; the
folder being pushed is byte-identical afterwards and a failed push creates no commit; a failed download leaves the
hub cache with complete files only and an earlier revision in it untouched; the retry succeeds and gives back
exactly the pushed weights.

The faults have to change between calls of one client process, so the emulator (hub_server.HubServer, whose
`fail_next` injects them) runs inside the subprocess that runs the client (huggingface_hub reads HF_ENDPOINT when it
is imported, so the client cannot run in this process; see test_hub.py).
"""

import json
import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO_ROOT = TESTS.parent

_DRIVER = r'''
import hashlib, json, os, sys
from pathlib import Path
from hub_server import HubServer, git_blob_sha1, hub_env

root = Path(sys.argv[1])
server = HubServer(lfs_patterns=["*.safetensors"]).start()
os.environ.update(hub_env(server.endpoint, root / "hf_home"))

import torch
from metaperturb_hf import MetaPerturbConfig, MetaPerturbModel
from metaperturb_hf.hub import download_repo, push_perturbation_folder
from metaperturb_hf.loading import load_perturbation

cache = root / "hf_home" / "hub"


def digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def attempt(call):
    try:
        return {"ok": call()}
    except Exception as error:
        return {"error": type(error).__name__, "message": str(error)}


def with_fault(method, path, status, times, call):
    """`call` with the fault armed, then again without it: (first outcome, requests it failed, retry outcome)."""
    server.clear_faults()
    server.fail_next(method, path, status=status, times=times)
    seen = len(server.requests)
    first = attempt(call)
    failed = [f"{r.method} {r.path} -> {r.fault}" for r in server.requests[seen:] if r.fault]
    server.clear_faults()
    return first, failed, attempt(call)


def incomplete_blobs():
    """Cached blobs whose content does not hash to their name (the client names blobs by their etag)."""
    bad = []
    for blob in cache.glob("models--*/blobs/*"):
        if blob.suffix == ".incomplete":
            continue
        data = blob.read_bytes()
        if blob.name not in (hashlib.sha256(data).hexdigest(), git_blob_sha1(data)):
            bad.append(str(blob))
    return bad


def make_phi(shift):
    torch.manual_seed(0)
    phi = MetaPerturbModel(MetaPerturbConfig(initializer_range=0.1))
    with torch.no_grad():
        for parameter in phi.parameters():
            parameter.add_(shift)
    return phi


report = {"upload": {}, "download": {}}

# ------------------------------------------------------------------------------------------------------ uploads
folder = root / "output"
make_phi(0.0).save_pretrained(folder)
(folder / "meta_training.json").write_text(json.dumps({"steps": 2, "num_tasks": 2}))
before = digest(folder)
UPLOADS = [  # the LFS upload first: once the object is stored, later pushes skip it
    ("lfs upload dropped once", "PUT", r"^/_lfs/[0-9a-f]{64}$", "drop", 1),
    ("create repo 500", "POST", r"^/api/repos/create$", 500, 1),
    ("preupload 404", "POST", r"/preupload/", 404, 1),
    ("lfs batch 500 once", "POST", r"\.git/info/lfs/objects/batch$", 500, 1),
]
for index, (name, method, path, status, times) in enumerate(UPLOADS):
    repo = f"testuser/upload-{index}"
    first, failed, retry = with_fault(method, path, status, times, lambda: push_perturbation_folder(folder, repo))
    files = server.files(repo) if ("model", repo) in server.repos else {}
    report["upload"][name] = {
        "first": first, "failed": failed, "retry": retry,
        "commits": len(server.commit_shas(repo)) if files else 0,
        "same_bytes": all(files.get(p) == (folder / p).read_bytes() for p in ("config.json", "model.safetensors")),
    }
report["folder_intact"] = digest(folder) == before

# ---------------------------------------------------------------------------------------------------- downloads
repo = "testuser/phi-dl"
old = make_phi(0.0)
old.push_to_hub(repo)
old_path = download_repo(repo)
old_files = digest(old_path)
DOWNLOADS = [
    ("lookup 500", "GET", r"^/api/models/testuser/phi-dl(/revision/.*)?$", 500, 1),
    ("lookup dropped", "GET", r"^/api/models/testuser/phi-dl(/revision/.*)?$", "drop", 1),
    ("metadata dropped", "HEAD", r"/resolve/[0-9a-f]{40}/model\.safetensors$", "drop", 1),
    ("metadata 404", "HEAD", r"/resolve/[0-9a-f]{40}/model\.safetensors$", 404, 1),
    ("content 404", "GET", r"/resolve/[0-9a-f]{40}/model\.safetensors$", 404, 1),
    ("content dropped once", "GET", r"/resolve/[0-9a-f]{40}/model\.safetensors$", "drop", 1),
]
for index, (name, method, path, status, times) in enumerate(DOWNLOADS):
    new = make_phi(0.1 * (index + 1))  # a new revision each time: a cached file is never downloaded again
    new.push_to_hub(repo, commit_message=name)
    first, failed, retry = with_fault(method, path, status, times, lambda: str(download_repo(repo)))
    outcome = {"first": first, "failed": failed, "retry": {k: v for k, v in retry.items() if k != "ok"},
               "incomplete_blobs": incomplete_blobs(), "old_revision_intact": digest(old_path) == old_files}
    if "ok" in retry:
        loaded = load_perturbation(retry["ok"])
        outcome["retry_weights"] = all(torch.equal(p, q) for p, q in zip(loaded.parameters(), new.parameters()))
    report["download"][name] = outcome
old_loaded = load_perturbation(old_path)
report["old_revision_loads"] = all(torch.equal(p, q) for p, q in zip(old_loaded.parameters(), old.parameters()))
report["endpoint"] = server.endpoint
report["unhandled"] = [repr(r) for r in server.unhandled]
server.stop()
print("REPORT=" + json.dumps(report))
'''


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    import subprocess

    root = tmp_path_factory.mktemp("hub_faults")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _DRIVER, str(root)], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT=")]
    assert proc.returncode == 0 and lines, f"driver failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("REPORT="):])


def first_error_message(outcome: dict) -> str:
    """The HubError message of a scenario's first call, after checking that its fault fired and was a HubError."""
    assert outcome["failed"], f"the fault never fired: {outcome}"
    assert outcome["first"].get("error") == "HubError", outcome["first"]
    return outcome["first"]["message"]


UPLOAD_REASONS = {
    "create repo 500": ("creating the repository", "HTTP 500 (Injected fault)"),
    "preupload 404": ("uploading 6 files in one commit", "HTTP 404 (Injected fault)"),
}


@pytest.mark.parametrize("name", sorted(UPLOAD_REASONS))
def test_a_push_failing_at_any_step_says_which_and_the_retry_succeeds(report, name):
    outcome = report["upload"][name]
    step, reason = UPLOAD_REASONS[name]
    message = first_error_message(outcome)
    assert f"on {report['endpoint']} failed while {step}" in message and reason in message, message
    assert "testuser/upload-" in message and "Nothing local was changed" in message
    assert "ok" in outcome["retry"], outcome["retry"]
    assert outcome["commits"] == 2 and outcome["same_bytes"]   # initial commit + the retry's: the failure made none


@pytest.mark.parametrize("name", ["lfs upload dropped once", "lfs batch 500 once"])
def test_a_failed_lfs_request_is_retried_by_the_client_itself(report, name):
    """huggingface_hub retries LFS requests with backoff (1, 2, 4, 8, 8 s): one failure costs a second, not the
    push."""
    outcome = report["upload"][name]
    assert outcome["failed"] and "ok" in outcome["first"] and outcome["commits"] == 2 and outcome["same_bytes"]


def test_failed_pushes_leave_the_folder_byte_identical(report):
    assert report["folder_intact"]
    assert report["unhandled"] == []


DOWNLOAD_REASONS = {
    "lookup 500": ("Looking up testuser/phi-dl@main", "HTTP 500 (Injected fault)"),
    "lookup dropped": ("Looking up testuser/phi-dl@main", "Server disconnected"),
    "metadata dropped": ("Downloading model.safetensors from testuser/phi-dl@main", "Server disconnected"),
    "metadata 404": ("Downloading model.safetensors from testuser/phi-dl@main", "HTTP 404 (Injected fault)"),
    "content 404": ("Downloading model.safetensors from testuser/phi-dl@main", "HTTP 404 (Injected fault)"),
}


@pytest.mark.parametrize("name", sorted(DOWNLOAD_REASONS))
def test_a_download_failing_at_any_step_says_which_keeps_the_cache_sound_and_the_retry_succeeds(report, name):
    outcome = report["download"][name]
    what, reason = DOWNLOAD_REASONS[name]
    message = first_error_message(outcome)
    assert what in message and f"on {report['endpoint']}" in message and reason in message, message
    assert outcome["incomplete_blobs"] == [] and outcome["old_revision_intact"]
    assert outcome["retry"] == {} and outcome["retry_weights"], outcome


def test_a_dropped_download_is_resumed_by_the_client_itself(report):
    """The client retries a dropped content download 5 times, a second apart, before it gives up (not tried: 5 s)."""
    outcome = report["download"]["content dropped once"]
    assert outcome["failed"] and "ok" in outcome["first"] and outcome["retry_weights"]
    assert outcome["incomplete_blobs"] == [] and outcome["old_revision_intact"]


def test_the_earlier_revision_in_the_cache_still_loads_after_all_the_failures(report):
    assert report["old_revision_loads"]
