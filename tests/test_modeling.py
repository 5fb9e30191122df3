"""The perturbation function: exact math against the authors' outputs, invariances, saving and bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

from metaperturb_hf import MetaPerturbConfig, MetaPerturbModel, convert_official_checkpoint, modeling_metaperturb


def call(phi, h, channels=None, noise=None, **kwargs):
    """Call φ with fresh statistics for h's channel count."""
    c = h.shape[1] if channels is None else channels
    mean, var = torch.zeros(c, 4), torch.ones(c, 4)
    return phi(h, mean, var, channel_norm=64, spatial_norm=32, noise=noise, **kwargs), mean, var


def test_has_exactly_82_parameters_with_small_normal_init():
    phi = MetaPerturbModel(MetaPerturbConfig())
    params = torch.cat([p.flatten() for p in phi.parameters()])
    assert params.numel() == 82
    assert 0.004 < params.std().item() < 0.02  # N(0, 0.01)


@pytest.mark.parametrize("case", range(4))
def test_matches_official_golden_outputs(case, official_checkpoint, official_golden, kernel):
    if kernel == "triton" and case == 0:
        pytest.skip("8 × 16 × 32 × 32 takes Triton's interpreter 20 s; cases 1 and 2 span several tiles too")
    phi = convert_official_checkpoint(official_checkpoint)
    phi.kernel = kernel
    golden = load_file(official_golden)
    g = {key.split(".", 1)[1]: value for key, value in golden.items() if key.startswith(f"case{case}.")}
    channel_norm, spatial_norm, kappa, clip = g["scalars"].tolist()
    mean, var = g["running_mean"].clone(), g["running_var"].clone()

    phi.train()
    out = phi(g["h"], mean, var, channel_norm, spatial_norm, noise_coeff=kappa, noise=g["eps"], clip_value=clip)
    torch.testing.assert_close(out, g["out_train"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean, g["running_mean_after_train"], atol=1e-5, rtol=1e-5)
    # The official code applies Bessel's correction twice to the running variance; ours once.
    batch = g["h"].shape[0]
    official_var = (g["running_var_after_train_official"] - 0.9 * g["running_var"]) / (batch / (batch - 1))
    torch.testing.assert_close(var, 0.9 * g["running_var"] + official_var, atol=1e-5, rtol=1e-4)

    phi.eval()
    out = phi(g["h"], g["running_mean"].clone(), g["running_var"].clone(), channel_norm, spatial_norm,
              noise_coeff=kappa, noise=g["eps"])
    torch.testing.assert_close(out, g["out_eval"], atol=1e-5, rtol=1e-5)


def test_channel_permutation_equivariance(perturbation):
    torch.manual_seed(1)
    h, eps = torch.randn(5, 12, 9, 9), torch.randn(5, 12, 9, 9)
    perm = torch.randperm(12)
    out, mean, _ = call(perturbation, h, noise=eps)
    out_perm, mean_perm, _ = call(perturbation, h[:, perm], noise=eps[:, perm])
    torch.testing.assert_close(out_perm, out[:, perm], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mean_perm, mean[perm])


@pytest.mark.parametrize("channels", [1, 2, 3, 16, 64, 512])
def test_one_phi_serves_any_channel_count(perturbation, channels):
    out, mean, var = call(perturbation, torch.randn(4, channels, 6, 6))
    assert out.shape == (4, channels, 6, 6) and torch.isfinite(out).all()
    assert mean.abs().sum() > 0 and not torch.equal(var, torch.ones_like(var))  # statistics were updated


def test_flat_mlp_features_are_one_by_one_maps(perturbation):
    h, eps = torch.randn(6, 20), torch.randn(6, 20)
    flat, _, _ = call(perturbation, h, noise=eps)
    as_map, _, _ = call(perturbation, h[:, :, None, None], noise=eps[:, :, None, None])
    assert flat.shape == (6, 20)
    torch.testing.assert_close(flat, as_map[:, :, 0, 0])


def test_zero_noise_coeff_is_identity_and_clamp_applies(perturbation):
    h = torch.randn(3, 4, 5, 5) * 50
    out, _, _ = call(perturbation, h, noise_coeff=0.0)
    torch.testing.assert_close(out, h)
    out, _, _ = call(perturbation, h.abs() * 100, clip_value=100.0)
    assert out.max() <= 100.0


def test_eval_uses_running_statistics_and_leaves_them_alone(perturbation):
    perturbation.eval()
    h, eps = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    mean, var = torch.rand(3, 4), torch.rand(3, 4)
    mean_before, var_before = mean.clone(), var.clone()
    a = perturbation(h, mean, var, 8, 8, noise=eps)
    b = perturbation(h[:2], mean, var, 8, 8, noise=eps[:2])  # no batch statistics: samples are independent
    torch.testing.assert_close(a[:2], b)
    assert torch.equal(mean, mean_before) and torch.equal(var, var_before)


def test_batch_of_one_in_training_is_finite_with_zero_variance(perturbation):
    out, mean, var = call(perturbation, torch.randn(1, 8, 4, 4))
    assert torch.isfinite(out).all() and torch.isfinite(var).all()
    torch.testing.assert_close(var, torch.full_like(var, 0.9))  # lerp of 1 towards a batch variance of 0


def test_expected_noise_is_deterministic_and_the_mean_of_the_noise(perturbation):
    perturbation.eval()
    h, mean, var = torch.randn(1, 3, 6, 6), torch.rand(3, 4), torch.rand(3, 4)
    single = perturbation(h, mean, var, 8, 8, expected_noise=True)
    torch.testing.assert_close(single, perturbation(h, mean, var, 8, 8, expected_noise=True))
    torch.manual_seed(0)  # in evaluation samples are independent, so one big batch holds many noise draws
    sampled = perturbation(h.expand(20000, -1, -1, -1), mean, var, 8, 8).mean(0, keepdim=True)
    torch.testing.assert_close(single, sampled, atol=0.02, rtol=0.02)


def test_noise_draws_are_standard_normal_in_the_layout_of_the_features_and_fixed_by_the_seed():
    mu = torch.zeros(8, 16, 32, 32).contiguous(memory_format=torch.channels_last)
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        draws.append(modeling_metaperturb._sample_noise(mu, modeling_metaperturb._noise_seed()))
    assert draws[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(draws[0], draws[1], atol=0, rtol=0)
    assert abs(draws[0].mean()) < 0.01 and abs(draws[0].std() - 1) < 0.01
    assert not torch.equal(draws[0], modeling_metaperturb._sample_noise(mu, modeling_metaperturb._noise_seed()))


def test_gradients_reach_phi_through_the_noise(perturbation):
    out, _, _ = call(perturbation, torch.randn(4, 3, 5, 5))
    out.pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in perturbation.parameters())


@pytest.mark.parametrize(
    "make_input, error, match",
    [
        (lambda: torch.randn(2, 3, 4), ValueError, "shape"),
        (lambda: torch.randint(0, 5, (2, 3, 4, 4)), TypeError, "floating point"),
        (lambda: torch.full((2, 3, 4, 4), float("nan")), modeling_metaperturb.NonFiniteFeaturesError, "NaN or Inf"),
        (lambda: torch.tensor([[[[float("inf")]]]]).expand(2, 3, 4, 4), modeling_metaperturb.NonFiniteFeaturesError,
         "NaN or Inf"),
    ],
)
def test_bad_hidden_states_raise_clear_errors(perturbation, make_input, error, match):
    with pytest.raises(error, match=match):
        call(perturbation, make_input(), channels=3)


def test_wrong_statistics_or_noise_shape_raise(perturbation):
    h = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"running_mean must have shape \(3, 4\)"):
        perturbation(h, torch.zeros(5, 4), torch.ones(3, 4), 8, 8)
    with pytest.raises(ValueError, match="noise must have the shape"):
        perturbation(h, torch.zeros(3, 4), torch.ones(3, 4), 8, 8, noise=torch.randn(2, 3, 4))


def test_save_and_load_round_trip_through_automodel(perturbation, tmp_path):
    perturbation.save_pretrained(tmp_path)
    assert {"model.safetensors", "config.json", "modeling_metaperturb.py"} <= set(os.listdir(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModel"].endswith("MetaPerturbModel")
    for loaded in (MetaPerturbModel.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert isinstance(loaded, MetaPerturbModel)
        for (name, p), q in zip(perturbation.named_parameters(), loaded.parameters()):
            assert torch.equal(p, q), name


def test_config_that_does_not_match_the_weights_is_refused(perturbation, tmp_path):
    perturbation.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["kernel_size"] = 5
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="mismatched"):
        MetaPerturbModel.from_pretrained(tmp_path)


def test_invalid_config_values_are_refused():
    with pytest.raises(Exception, match="kernel_size must be a positive odd integer"):
        MetaPerturbConfig(kernel_size=4)
    with pytest.raises(Exception, match="kernel_size"):
        MetaPerturbConfig(kernel_size="3")
    with pytest.raises(Exception, match="noise_strength is the final κ and must lie in \\(0, 1\\]"):
        MetaPerturbConfig(noise_strength=1.5)


def test_noise_strength_round_trips_and_a_config_saved_before_it_loads_at_full_strength(tmp_path):
    MetaPerturbModel(MetaPerturbConfig(noise_strength=0.5)).save_pretrained(tmp_path)
    assert MetaPerturbModel.from_pretrained(tmp_path).config.noise_strength == 0.5
    config = json.loads((tmp_path / "config.json").read_text())
    del config["noise_strength"]  # as the first releases wrote it
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert MetaPerturbModel.from_pretrained(tmp_path).config.noise_strength == 1.0
    del config["clip_value"]  # every other field stays required
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lacks \\['clip_value'\\]"):
        MetaPerturbModel.from_pretrained(tmp_path)


REMOTE_CODE_SCRIPT = """
import sys, torch
sys.modules["metaperturb_hf"] = None  # the package cannot be imported here
from transformers import AutoModel
phi = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(phi).__module__.startswith("transformers_modules"), type(phi).__module__
data = torch.load(sys.argv[2])
out = phi(data["h"], data["mean"], data["var"], 16.0, 8.0, noise_coeff=0.7, noise=data["eps"])
torch.save(out, sys.argv[3])
"""


def test_trust_remote_code_loads_without_the_package(perturbation, tmp_path):
    model_dir = tmp_path / "phi"
    perturbation.save_pretrained(model_dir)
    h, eps = torch.randn(2, 5, 8, 8), torch.randn(2, 5, 8, 8)
    mean, var = torch.rand(5, 4), torch.rand(5, 4)
    torch.save({"h": h, "eps": eps, "mean": mean, "var": var}, tmp_path / "inputs.pt")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": ""}
    subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_SCRIPT, str(model_dir), str(tmp_path / "inputs.pt"),
         str(tmp_path / "out.pt")],
        check=True, cwd=tmp_path, env=env, capture_output=True,
    )
    expected = perturbation.eval()(h, mean, var, 16.0, 8.0, noise_coeff=0.7, noise=eps)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected)
