"""benchmarks/graft_phi.py: the graft has one φ's scale network and the other's noise generator (or none)."""

from pathlib import Path

import pytest
import torch
from script_loading import load_script

from metaperturb_hf import MetaPerturbConfig, MetaPerturbModel, load_perturbation


@pytest.fixture(scope="module")
def script():
    return load_script("benchmarks/graft_phi.py")


def saved_phi(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    MetaPerturbModel(MetaPerturbConfig(initializer_range=1.0)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("noise_from", ["donor", "zero"])
def test_graft_takes_the_scale_network_of_one_and_the_noise_generator_of_the_other(script, tmp_path, noise_from):
    base, donor = saved_phi(tmp_path / "base", 0), saved_phi(tmp_path / "donor", 1)
    script.main(["--scale-from", str(base), "--noise-from", str(donor) if noise_from == "donor" else "zero",
                 "--output", str(tmp_path / "graft")])
    graft, scale, noise = (load_perturbation(path).state_dict() for path in (tmp_path / "graft", base, donor))
    for name in ("stat_kernels", "scale_weight"):
        torch.testing.assert_close(graft[name], scale[name], rtol=0, atol=0)
    for name in script.NOISE_GENERATOR:
        expected = noise[name] if noise_from == "donor" else torch.zeros_like(noise[name])
        torch.testing.assert_close(graft[name], expected, rtol=0, atol=0)
    assert set(graft) == set(scale)  # nothing else in φ


def test_noise_scale_shrinks_the_noise_generator_taken(script, tmp_path):
    base = saved_phi(tmp_path / "base", 0)
    script.main(["--scale-from", str(base), "--noise-from", str(base), "--noise-scale", "0.3",
                 "--output", str(tmp_path / "shrunk")])
    shrunk, original = (load_perturbation(path).state_dict() for path in (tmp_path / "shrunk", base))
    for name in script.NOISE_GENERATOR:
        torch.testing.assert_close(shrunk[name], 0.3 * original[name])
    torch.testing.assert_close(shrunk["scale_weight"], original["scale_weight"], rtol=0, atol=0)
    with pytest.raises(SystemExit):
        script.main(["--scale-from", str(base), "--noise-from", "zero", "--noise-scale", "0",
                     "--output", str(tmp_path / "bad")])


def test_flatten_noise_keeps_each_kernels_sum_and_drops_its_profile(script, tmp_path):
    base, donor = saved_phi(tmp_path / "base", 0), saved_phi(tmp_path / "donor", 1)
    script.main(["--scale-from", str(base), "--noise-from", str(donor), "--noise-scale", "0.5", "--flatten-noise",
                 "--output", str(tmp_path / "flat")])
    flat, noise = (load_perturbation(path).state_dict() for path in (tmp_path / "flat", donor))
    for name in script.NOISE_GENERATOR:
        torch.testing.assert_close(flat[name].sum(dim=(-2, -1)), 0.5 * noise[name].sum(dim=(-2, -1)))
        assert torch.equal(flat[name], flat[name][..., :1, :1].expand_as(flat[name]))  # every tap the same
    with pytest.raises(SystemExit):
        script.main(["--scale-from", str(base), "--noise-from", "zero", "--flatten-noise",
                     "--output", str(tmp_path / "bad")])


def test_set_edits_one_filter_or_weight_after_the_graft(script, tmp_path):
    base = saved_phi(tmp_path / "base", 0)
    script.main(["--scale-from", str(base), "--noise-from", str(base), "--set", "stat_kernels[3]=0.25",
                 "--set", "scale_weight[7]=0", "--output", str(tmp_path / "edited")])
    edited, original = (load_perturbation(path).state_dict() for path in (tmp_path / "edited", base))
    assert torch.equal(edited["stat_kernels"][3], torch.full_like(original["stat_kernels"][3], 0.25))
    torch.testing.assert_close(edited["stat_kernels"][:3], original["stat_kernels"][:3], rtol=0, atol=0)
    assert edited["scale_weight"][7] == 0
    keep = [i for i in range(10) if i != 7]
    torch.testing.assert_close(edited["scale_weight"][keep], original["scale_weight"][keep], rtol=0, atol=0)


@pytest.mark.parametrize("setting, complaint", [("scale_weight[10]=0", "10 entries"),
                                                ("bias[0]=1", "names a parameter"),
                                                ("scale_weight[0]=x", "not a number"),
                                                ("scale_weight=0", "NAME[INDEX]")])
def test_set_refuses_what_phi_does_not_have(script, tmp_path, capsys, setting, complaint):
    base = saved_phi(tmp_path / "base", 0)
    with pytest.raises(SystemExit):
        script.main(["--scale-from", str(base), "--noise-from", "zero", "--set", setting,
                     "--output", str(tmp_path / "bad")])
    assert complaint in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
