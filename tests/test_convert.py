"""Converting the authors' checkpoint: safe loading, exact weights, clear refusals."""

import pickle
import subprocess
import sys

import pytest
import torch

from metaperturb_hf import MetaPerturbModel, convert_official_checkpoint


def official_like_state():
    torch.manual_seed(0)
    return {
        "kernel": torch.randn(4, 1, 3, 3),
        "phi_1.w_identity": torch.randn(1, 1, 3, 3),
        "phi_1.w_all": torch.randn(1, 1, 3, 3),
        "phi_2.w_identity": torch.randn(1, 1, 3, 3),
        "phi_2.w_all": torch.randn(1, 1, 3, 3),
        "fc.weight": torch.randn(1, 10),
    }


def test_every_official_tensor_lands_in_its_place(tmp_path):
    state = official_like_state()
    torch.save(state, tmp_path / "phi.pth")
    phi = convert_official_checkpoint(tmp_path / "phi.pth")
    assert torch.equal(phi.identity_kernels[0, 0], state["phi_1.w_identity"][0, 0])
    assert torch.equal(phi.identity_kernels[1, 0], state["phi_2.w_identity"][0, 0])
    assert torch.equal(phi.mean_kernels[0, 0], state["phi_1.w_all"][0, 0])
    assert torch.equal(phi.mean_kernels[1, 0], state["phi_2.w_all"][0, 0])
    assert torch.equal(phi.stat_kernels, state["kernel"])
    assert torch.equal(phi.scale_weight, state["fc.weight"][0])


def test_command_line_writes_a_loadable_folder(official_checkpoint, tmp_path):
    subprocess.run(
        [sys.executable, "-m", "metaperturb_hf.convert", str(official_checkpoint), str(tmp_path / "out")],
        check=True, capture_output=True,
    )
    loaded = MetaPerturbModel.from_pretrained(tmp_path / "out")
    reference = convert_official_checkpoint(official_checkpoint)
    for p, q in zip(loaded.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_missing_key_is_named(tmp_path):
    state = official_like_state()
    del state["kernel"]
    torch.save(state, tmp_path / "phi.pth")
    with pytest.raises(ValueError, match=r"missing keys \['kernel'\]"):
        convert_official_checkpoint(tmp_path / "phi.pth")


def test_wrong_shape_is_named(tmp_path):
    state = official_like_state()
    state["fc.weight"] = torch.randn(1, 12)
    torch.save(state, tmp_path / "phi.pth")
    with pytest.raises(ValueError, match="'fc.weight' has shape"):
        convert_official_checkpoint(tmp_path / "phi.pth")


class Exploit:
    def __reduce__(self):
        return (open, ("metaperturb-pwned", "w"))


def test_a_pickle_with_code_is_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the exploit would create its file here
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"kernel": Exploit()}, f)
    with pytest.raises(ValueError, match="cannot be read safely|not a plain tensor"):
        convert_official_checkpoint(tmp_path / "evil.pth")
    assert not (tmp_path / "metaperturb-pwned").exists()


def test_a_pickle_that_is_not_a_state_dict_is_refused(tmp_path):
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        convert_official_checkpoint(tmp_path / "list.pth")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint at"):
        convert_official_checkpoint(tmp_path / "nothing.pth")
