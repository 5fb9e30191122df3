"""Reliability, files: damaged weights, bad configs, bad authors' checkpoints and damaged meta-training checkpoints.

Every case must end in a clear error with nothing half-loaded: no model is returned, a resumed trainer keeps every
value it had. `MetaPerturbModel.from_pretrained` refuses a file whose weights do not match φ exactly (transformers
alone would fill a missing weight at random and only print a report). A flipped bit in the data of a safetensors file
cannot be noticed (the format has no checksum) unless it makes a NaN/Inf.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_convert import official_like_state
from test_meta_training import trainer
from transformers import AutoConfig, AutoModel

from metaperturb_hf import MetaPerturbConfig, MetaPerturbModel, convert_official_checkpoint
from metaperturb_hf.convert import main as convert_main
from metaperturb_hf.loading import load_perturbation

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FIELDS = ["kernel_size", "num_stat_filters", "stat_momentum", "clip_value", "initializer_range"]
INT_FIELDS = {"kernel_size", "num_stat_filters"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved_phi(tmp_path_factory):
    torch.manual_seed(0)
    phi = MetaPerturbModel(MetaPerturbConfig(initializer_range=0.1))
    folder = tmp_path_factory.mktemp("phi")
    phi.save_pretrained(folder)
    return folder, {name: p.detach().clone() for name, p in phi.named_parameters()}


def copy_of(saved_phi, tmp_path, name="copy") -> Path:
    folder = tmp_path / name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(saved_phi[0], folder)
    return folder


def loads_identically_or_raises(loader, folder, original) -> str:
    """The invariant of a loader: the weights that were saved, or an exception; never other weights."""
    try:
        phi = loader(folder)
    except Exception as error:  # noqa: BLE001 - any clear refusal will do; its type is checked elsewhere
        return type(error).__name__
    for name, parameter in phi.named_parameters():
        assert torch.equal(parameter, original[name]), f"{loader.__qualname__} silently loaded other weights ({name})"
    return "identical"


# ------------------------------------------------------------------------------------------- damaged safetensors
@SETTINGS
@given(st.data())
def test_a_truncated_weights_file_is_refused_by_every_loader(saved_phi, tmp_path, data):
    folder = copy_of(saved_phi, tmp_path)
    weights = folder / "model.safetensors"
    content = weights.read_bytes()
    weights.write_bytes(content[: data.draw(st.integers(0, len(content) - 1), label="kept bytes")])
    for loader in (load_perturbation, MetaPerturbModel.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises(OSError, match=TRUNCATED_MESSAGE.format(re.escape(str(weights)))):
            loader(folder)


# The file, safetensors' reason, and what to do.
TRUNCATED_MESSAGE = (r"Cannot read {} \(.*(deserializ|header|incomplete|too small).*\): the file is truncated or "
                     r"damaged.*save_pretrained.*force_download=True")
REMOTE_CODE_LOAD = """
import sys
sys.modules["metaperturb_hf"] = None  # the package cannot be imported here
from transformers import AutoModel
try:
    AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
except Exception as error:
    print(type(error).__name__, error)
"""


def test_a_truncated_weights_file_is_named_with_the_code_a_saved_folder_carries(saved_phi, tmp_path):
    """trust_remote_code without the package: the message comes from the modeling file saved beside the weights."""
    folder = copy_of(saved_phi, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", REMOTE_CODE_LOAD, str(folder)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert re.match("OSError " + TRUNCATED_MESSAGE.format(re.escape(str(weights))), result.stdout), (
        result.stdout + result.stderr)


@SETTINGS
@given(st.data())
def test_a_corrupted_header_never_loads_other_weights_through_the_package_loader(saved_phi, tmp_path, data):
    folder = copy_of(saved_phi, tmp_path)
    weights = folder / "model.safetensors"
    content = bytearray(weights.read_bytes())
    header_end = 8 + int.from_bytes(content[:8], "little")
    position = data.draw(st.integers(0, header_end - 1), label="byte")
    content[position] = data.draw(st.integers(0, 255).filter(lambda b: b != content[position]), label="new value")
    weights.write_bytes(bytes(content))
    loads_identically_or_raises(load_perturbation, folder, saved_phi[1])


def test_transformers_from_pretrained_refuses_a_renamed_weight(saved_phi, tmp_path):
    folder = copy_of(saved_phi, tmp_path)
    state = load_file(folder / "model.safetensors")
    state["scale_weighx"] = state.pop("scale_weight")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    assert loads_identically_or_raises(MetaPerturbModel.from_pretrained, folder, saved_phi[1]) != "identical"


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda s: s.pop("scale_weight"), r"missing_keys.*scale_weight"),
        (lambda s: s.update(scale_weighx=s.pop("scale_weight")), r"scale_weighx"),
        (lambda s: s.update(extra=torch.zeros(3)), r"unexpected_keys.*extra"),
        (lambda s: s.update(scale_weight=s["scale_weight"].to(torch.int32)), r"stores \{'scale_weight': 'I32'\}"),
        (lambda s: s["stat_kernels"].__setitem__((0, 0, 1, 1), float("nan")), r"NaN or Inf in \['stat_kernels'\]"),
        (lambda s: s.update(stat_kernels=s["stat_kernels"].reshape(1, 4, 3, 3).contiguous()), r"mismatch|size"),
    ],
    ids=["missing", "renamed", "extra", "integers", "nan", "reshaped"],
)
def test_the_package_loader_refuses_weights_that_do_not_fit(saved_phi, tmp_path, damage, match):
    folder = copy_of(saved_phi, tmp_path)
    state = load_file(folder / "model.safetensors")
    damage(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises((ValueError, RuntimeError), match=match):
        load_perturbation(folder)


def test_a_missing_weights_file_is_named(saved_phi, tmp_path):
    folder = copy_of(saved_phi, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(OSError, match="model.safetensors"):
        load_perturbation(folder)


# --------------------------------------------------------------------------------------------------- bad configs
def write_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


CONFIG_LOADERS = [MetaPerturbModel.from_pretrained, AutoModel.from_pretrained, MetaPerturbConfig.from_pretrained,
                  AutoConfig.from_pretrained, load_perturbation]


@pytest.mark.parametrize("field", FIELDS)
def test_a_config_missing_a_field_is_refused(saved_phi, tmp_path, field):
    folder = copy_of(saved_phi, tmp_path)
    write_config(folder, lambda config: config.pop(field))
    for loader in CONFIG_LOADERS:
        with pytest.raises(ValueError, match=rf"lacks \['{field}'\]"):
            loader(folder)


@pytest.mark.parametrize("key, hint", [("kernal_size", "kernel_size"), ("stat_momentun", "stat_momentum"),
                                       ("colour", None)])
def test_a_config_with_an_unknown_field_is_refused_with_a_hint(saved_phi, tmp_path, key, hint):
    folder = copy_of(saved_phi, tmp_path)
    write_config(folder, lambda config: config.update({key: 5}))
    expected = rf"unknown field\(s\) '{key}'" + (rf" \(did you mean '{hint}'\?\)" if hint else "")
    for loader in CONFIG_LOADERS:
        with pytest.raises(ValueError, match=expected):
            loader(folder)


def wrong_values(field: str):
    """JSON values of a type the field does not take (an int field refuses floats and booleans too)."""
    anything_else = st.text(max_size=3) | st.none() | st.lists(st.integers(), max_size=2) | st.booleans() | \
        st.dictionaries(st.text(max_size=2), st.integers(), max_size=1)
    return anything_else | st.floats(allow_nan=False, allow_infinity=False) if field in INT_FIELDS else anything_else


@SETTINGS
@given(st.data())
def test_a_config_field_of_the_wrong_type_is_refused_and_named(saved_phi, tmp_path, data):
    field = data.draw(st.sampled_from(FIELDS), label="field")
    value = data.draw(wrong_values(field), label="value")
    folder = copy_of(saved_phi, tmp_path)
    write_config(folder, lambda config: config.update({field: value}))
    for loader in (MetaPerturbModel.from_pretrained, AutoConfig.from_pretrained):
        with pytest.raises(Exception, match=rf"field '{field}'"):
            loader(folder)


@pytest.mark.parametrize("field, value, match", [
    ("kernel_size", 4, "positive odd integer"), ("num_stat_filters", 0, "at least 1"),
    ("stat_momentum", 1.5, r"lie in \(0, 1\]"), ("stat_momentum", float("nan"), r"lie in \(0, 1\]"),
    ("clip_value", -1.0, "positive"),
])
def test_a_config_value_out_of_range_is_refused(saved_phi, tmp_path, field, value, match):
    folder = copy_of(saved_phi, tmp_path)
    write_config(folder, lambda config: config.update({field: value}))
    with pytest.raises(Exception, match=match):
        MetaPerturbModel.from_pretrained(folder)


def test_a_config_of_another_model_type_is_refused_by_the_package_classes(saved_phi, tmp_path):
    folder = copy_of(saved_phi, tmp_path)
    write_config(folder, lambda config: config.update(model_type="resnet"))
    for loader in (MetaPerturbModel.from_pretrained, MetaPerturbConfig.from_pretrained, load_perturbation):
        with pytest.raises(ValueError, match="model_type 'resnet', not 'metaperturb'"):
            loader(folder)
    # AutoModel follows the model_type it reads (a ResNet here): what the folder says it is, not a MetaPerturb φ.
    assert type(AutoConfig.from_pretrained(folder)).__name__ == "ResNetConfig"


@pytest.mark.parametrize("text, match", [("{not json", "not a valid JSON file"), ("[1, 2]", "must be a JSON object"),
                                         ("", "not a valid JSON file")])
def test_a_config_that_is_not_a_json_object_is_refused(saved_phi, tmp_path, text, match):
    folder = copy_of(saved_phi, tmp_path)
    (folder / "config.json").write_text(text)
    with pytest.raises((OSError, ValueError), match=match):
        MetaPerturbModel.from_pretrained(folder)


# ------------------------------------------------------------------------------------ the authors' checkpoint (.pth)
OFFICIAL_SHAPES = {"kernel": (4, 1, 3, 3), "phi_1.w_identity": (1, 1, 3, 3), "phi_1.w_all": (1, 1, 3, 3),
                   "phi_2.w_identity": (1, 1, 3, 3), "phi_2.w_all": (1, 1, 3, 3), "fc.weight": (1, 10)}


@SETTINGS
@given(st.sampled_from(sorted(OFFICIAL_SHAPES)), st.lists(st.integers(1, 12), min_size=1, max_size=4))
def test_an_authors_tensor_of_any_other_shape_is_refused_even_with_as_many_values(tmp_path, key, shape):
    if tuple(shape) == OFFICIAL_SHAPES[key]:
        shape = [*shape, 1]
    state = official_like_state()
    state[key] = torch.randn(shape)
    torch.save(state, tmp_path / "phi.pth")
    with pytest.raises(ValueError, match=rf"'{key}' has shape \({', '.join(map(str, shape))},?\), expected"):
        convert_official_checkpoint(tmp_path / "phi.pth")


SAME_COUNT_SHAPES = [("kernel", (36,)), ("kernel", (1, 4, 3, 3)), ("kernel", (4, 3, 3)), ("fc.weight", (10,)),
                     ("fc.weight", (10, 1)), ("phi_1.w_identity", (3, 3)), ("phi_2.w_all", (9,))]


@pytest.mark.parametrize("key, shape", SAME_COUNT_SHAPES)
def test_an_authors_tensor_transposed_or_flattened_is_refused(tmp_path, key, shape):
    """Used to be reshaped silently into place: as many values, but not in the authors' layout."""
    state = official_like_state()
    state[key] = state[key].reshape(shape)
    torch.save(state, tmp_path / "phi.pth")
    with pytest.raises(ValueError, match=rf"'{key}' has shape .*expected {re.escape(str(OFFICIAL_SHAPES[key]))}"):
        convert_official_checkpoint(tmp_path / "phi.pth")


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda s: s.update({"extra.weight": torch.zeros(1)}), r"unexpected keys \['extra.weight'\]"),
        (lambda s: s.update(kernel=torch.ones(4, 1, 3, 3, dtype=torch.int64)), "dtype torch.int64"),
        (lambda s: s["fc.weight"].__setitem__((0, 3), float("nan")), "NaN or Inf"),
        (lambda s: s["kernel"].__setitem__((1, 0, 0, 0), float("-inf")), "NaN or Inf"),
        (lambda s: s.update({"fc.weight": 1.0}), "does not hold a state dict of tensors"),
    ],
    ids=["extra-key", "integer-tensor", "nan", "inf", "not-a-tensor"],
)
def test_an_authors_checkpoint_that_is_not_a_trained_phi_is_refused(tmp_path, change, match):
    state = official_like_state()
    change(state)
    torch.save(state, tmp_path / "phi.pth")
    with pytest.raises(ValueError, match=match):
        convert_official_checkpoint(tmp_path / "phi.pth")


@pytest.mark.parametrize(
    "content",
    [b"", b"\x80\x04garbage", b"PK\x03\x04 not really a zip", b"not a pickle at all"],
    ids=["empty", "broken-pickle", "broken-zip", "text"],
)
def test_a_file_that_is_no_checkpoint_is_refused(tmp_path, content):
    (tmp_path / "phi.pth").write_bytes(content)
    with pytest.raises(ValueError, match="cannot be read safely|not a plain tensor"):
        convert_official_checkpoint(tmp_path / "phi.pth")


@pytest.mark.parametrize("obj", [None, torch.zeros(3), {"kernel": {"nested": torch.zeros(1)}}, "state", (1, 2)],
                         ids=["none", "tensor", "nested-dict", "string", "tuple"])
def test_a_pickle_that_is_not_a_state_dict_is_refused(tmp_path, obj):
    torch.save(obj, tmp_path / "phi.pth")
    with pytest.raises(ValueError, match="does not hold a state dict of tensors"):
        convert_official_checkpoint(tmp_path / "phi.pth")


def test_a_truncated_authors_checkpoint_is_refused(tmp_path):
    torch.save(official_like_state(), tmp_path / "phi.pth")
    content = (tmp_path / "phi.pth").read_bytes()
    for kept in (0, 10, len(content) // 2, len(content) - 1):
        (tmp_path / "cut.pth").write_bytes(content[:kept])
        with pytest.raises(ValueError, match="cannot be read safely|not a plain tensor"):
            convert_official_checkpoint(tmp_path / "cut.pth")


def test_the_command_line_refuses_a_bad_checkpoint_with_a_message_and_writes_nothing(tmp_path, capsys):
    state = official_like_state()
    state["fc.weight"] = state["fc.weight"].reshape(10, 1)
    torch.save(state, tmp_path / "phi.pth")
    with pytest.raises(SystemExit) as exit_info:
        convert_main([str(tmp_path / "phi.pth"), str(tmp_path / "out")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("metaperturb-convert: error: ") and "'fc.weight' has shape (10, 1), expected (1, 10)" in err
    assert "Nothing was written" in err and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ damaged meta-training checkpoints
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A meta-training run of 2 steps (4 tasks) with one checkpoint."""
    root = tmp_path_factory.mktemp("run")
    trainer(root, steps=2, checkpoint_every=2).train()
    return root / "out" / "checkpoints" / "checkpoint-2"


def snapshot(t) -> dict:
    """Every value a resume could change, copied."""
    return {
        "step": t.step,
        "phi": [p.detach().clone() for p in t.phi.parameters()],
        "phi_optimizer": json.dumps(t.phi_optimizer.state_dict()["param_groups"]),
        "phi_optimizer_state": [v.clone() for s in t.phi_optimizer.state_dict()["state"].values()
                                for v in s.values() if torch.is_tensor(v)],
        "learners": [{k: v.clone() for k, v in learner.model.state_dict().items()} for learner in t.learners],
        "generators": [learner.noise_generator.get_state().clone() for learner in t.learners],
        "batches": [json.dumps(learner.train_batches.state_dict(), default=str) for learner in t.learners],
    }


def assert_unchanged(before: dict, after: dict) -> None:
    assert before["step"] == after["step"]
    assert before["phi_optimizer"] == after["phi_optimizer"] and before["batches"] == after["batches"]
    for key in ("phi", "phi_optimizer_state", "generators"):
        assert len(before[key]) == len(after[key]) and all(torch.equal(a, b) for a, b in zip(before[key], after[key]))
    for a, b in zip(before["learners"], after["learners"]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def reshape_last_task(folder: Path) -> None:
    """Task 3's classifier from another network: fails after φ, its optimizer and tasks 0-2 were applied."""
    state = torch.load(folder / "task-3.pt", weights_only=True)
    first = next(iter(state["model"]))
    state["model"][first] = torch.zeros(1, *state["model"][first].shape)
    torch.save(state, folder / "task-3.pt")


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda c: truncate(c / "task-2.pt"), r"Cannot read .*task-2\.pt"),
        (lambda c: truncate(c / "trainer_state.pt"), r"Cannot read .*trainer_state\.pt"),
        (lambda c: truncate(c / "perturbation" / "model.safetensors"), r"Cannot read .*perturbation.*header"),
        (lambda c: (c / "task-1.pt").unlink(), r"Cannot read .*task-1\.pt"),
        (lambda c: torch.save([1, 2], c / "trainer_state.pt"), "is not a trainer state"),
        (lambda c: write_config(c / "perturbation", lambda config: config.pop("clip_value")),
         r"lacks \['clip_value'\]"),
        (reshape_last_task, r"(?s)does not fit this run .*size mismatch.*nothing was restored"),
    ],
    ids=["truncated-task", "truncated-trainer-state", "truncated-phi", "missing-task", "not-a-trainer-state",
         "phi-config-missing-field", "task-of-another-network"],
)
def test_resuming_from_a_damaged_checkpoint_restores_nothing(checkpoint, tmp_path, damage, match):
    copy = tmp_path / "checkpoint-2"
    shutil.copytree(checkpoint, copy)
    damage(copy)
    fresh = trainer(tmp_path / "fresh", steps=4)
    fresh.step = 1  # distinguishable from the checkpoint's step 2
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=match):
        fresh.resume(copy)
    assert_unchanged(before, snapshot(fresh))
    # The undamaged checkpoint still resumes, and then everything comes from it.
    assert fresh.resume(checkpoint) == 2
    assert torch.equal(fresh.phi.scale_weight, load_perturbation(checkpoint / "perturbation").scale_weight)
