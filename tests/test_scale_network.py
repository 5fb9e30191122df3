"""benchmarks/scale_network.py: the s it recomputes is the s that φ applies, and its descriptor sweep passes through
it."""

import math

import pytest
import torch
from script_loading import load_script

from metaperturb_hf import MetaPerturbConfig, MetaPerturbModel, add_perturbation
from metaperturb_hf.architectures import create_model


@pytest.fixture(scope="module")
def script():
    return load_script("benchmarks/scale_network.py")


def random_phi(seed: int) -> MetaPerturbModel:
    """A φ far from its N(0, 0.01) start, so that s is not ≈ 1/2 everywhere and the descriptors matter."""
    phi = MetaPerturbModel(MetaPerturbConfig())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in phi.parameters():
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    return phi


@pytest.mark.parametrize("shape", [(8, 5, 6, 7), (1, 3, 4, 4), (6, 9)])
def test_channel_scale_is_the_scale_phi_applies(script, shape):
    phi = random_phi(0).train()
    with torch.no_grad():  # no noise generator: μ = 0, and with ε = 0 the noise is z = softplus(0) = ln 2
        phi.identity_kernels.zero_()
        phi.mean_kernels.zero_()
    h = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    channels = shape[1]
    channel_norm, spatial_norm = 2.0 * channels, 9.0
    stats = torch.zeros(channels, 4), torch.ones(channels, 4)
    with torch.no_grad():
        output = phi(h, *stats, channel_norm, spatial_norm, noise=torch.zeros_like(h))
    h4, out4 = (h[:, :, None, None], output[:, :, None, None]) if h.dim() == 2 else (h, output)
    applied = (out4 / (h4 * math.log(2))).transpose(0, 1).reshape(channels, -1)  # (C, every b, y, x)

    features = script.statistics_features(h, phi.stat_kernels)
    size = shape[2] if len(shape) == 4 else 1
    s = script.channel_scale(phi.scale_weight, features, channels / channel_norm, size / spatial_norm)
    assert features.shape == (channels, 8)
    assert s.std() > 1e-3  # the statistics do matter for this φ (s differs by channel)
    torch.testing.assert_close(applied, s[:, None].expand_as(applied), atol=1e-6, rtol=0)
    if shape[0] == 1:
        assert (features[:, 4:] == 0).all()  # a batch of one: variance 0, as φ takes it


def test_site_scales_match_phi_and_the_sweep_passes_through_every_site(script):
    torch.manual_seed(0)
    model = add_perturbation(create_model("conv4", 5, image_size=16), random_phi(2), input_size=(3, 16, 16))
    images = torch.randn(6, 3, 16, 16)
    records = script.site_scales(model, images)
    assert [record["site"] for record in records] == [site.name for site in model.sites]
    assert "_perturb" not in vars(model)  # the recording hook is gone again
    descriptors = {(record["channel_descriptor"], record["size_descriptor"]) for record in records}
    assert len(descriptors) > 1
    w = model.perturbation.scale_weight
    for record in records:
        assert record["s"].shape == (record["channels"],)
        assert abs(record["s"].mean().item() - record["phi_mean_s"]) < 1e-6  # φ's own monitored mean s
        sweep = script.descriptor_sweep(w, record["features"], torch.tensor([0.0, record["channel_descriptor"]]),
                                        torch.tensor([record["size_descriptor"], 1.0]))
        assert sweep.shape == (2, 2)
        assert abs(sweep[0, 1].item() - record["s"].mean().item()) < 1e-6
        summary = script.site_summary(record, w)
        assert summary["s_min"] <= summary["s_q25"] <= summary["s_median"] <= summary["s_q75"] <= summary["s_max"]
        logit = summary["statistics_logit_mean"] + summary["descriptor_logit"]
        assert summary["s_min"] - 1e-6 <= torch.sigmoid(torch.tensor(logit)).item() <= summary["s_max"] + 1e-6


def test_weight_names_follow_the_documented_order(script):
    assert script.weight_names() == ["mean_1", "mean_2", "mean_3", "mean_4", "var_1", "var_2", "var_3", "var_4",
                                     "channel", "size"]
