"""Plugging one φ into many classifiers: sites, statistics, gradients, saving, unwrapping, bad input."""

import copy

import pytest
import torch
from torch import nn
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    RegNetConfig,
    RegNetForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
)

from metaperturb_hf import PerturbedModel, add_perturbation, find_sites
from metaperturb_hf.architectures import create_model


def tiny_hf_resnet():
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 1], layer_type="basic", num_labels=5)
    return ResNetForImageClassification(config)


HF_MODELS = {
    "resnet": (tiny_hf_resnet, 3),
    "regnet": (lambda: RegNetForImageClassification(RegNetConfig(
        num_labels=5, hidden_sizes=[8, 16], depths=[1, 2], embedding_size=8, groups_width=8, layer_type="y")), 3),
    "convnext": (lambda: ConvNextForImageClassification(ConvNextConfig(
        patch_size=2, num_stages=2, hidden_sizes=[8, 16], depths=[1, 2], num_labels=5)), 3),
    "mobilenet_v2": (lambda: MobileNetV2ForImageClassification(MobileNetV2Config(
        num_labels=5, depth_multiplier=0.35, image_size=32)), 35),
}

REFERENCE_SITES = {"conv4": 4, "conv6": 6, "vgg9": 8, "resnet20": 9, "resnet32": 15, "wrn": 6, "mlp": 2}


@pytest.mark.parametrize("name, expected", REFERENCE_SITES.items())
def test_reference_networks_have_the_paper_sites(perturbation, name, expected):
    kwargs = {"depth": 16, "widen_factor": 1} if name == "wrn" else {}
    perturbed = add_perturbation(create_model(name, num_classes=7, **kwargs), perturbation)
    assert len(perturbed.sites) == expected
    x = torch.randn(4, 3, 32, 32)
    perturbed.train()
    assert perturbed(x).shape == (4, 7)


def test_resnet_sites_follow_the_residual_addition_and_skip_the_stem(perturbation):
    model = create_model("resnet20", num_classes=10)
    sites = add_perturbation(model, perturbation).sites
    assert [s.name for s in sites[:3]] == ["layer1.0", "layer1.1", "layer1.2"]
    assert all(s.position == "input" and s.module_name.endswith("act2") for s in sites)
    assert [s.channels for s in sites] == [16] * 3 + [32] * 3 + [64] * 3
    assert [s.spatial_size for s in sites] == [32] * 3 + [16] * 3 + [8] * 3


def test_norms_are_the_largest_channels_and_spatial_size(perturbation):
    perturbed = add_perturbation(create_model("resnet20", num_classes=10), perturbation)
    assert (perturbed.channel_norm, perturbed.spatial_norm) == (64.0, 32.0)
    conv4 = add_perturbation(create_model("conv4", num_classes=10, width=48), perturbation)
    assert (conv4.channel_norm, conv4.spatial_norm) == (48.0, 32.0)
    overridden = add_perturbation(create_model("conv4", num_classes=10), perturbation, channel_norm=512,
                                  spatial_norm=84)
    assert (overridden.channel_norm, overridden.spatial_norm) == (512.0, 84.0)


@pytest.mark.parametrize("family", HF_MODELS)
def test_transformers_cnns_are_perturbed_and_train(perturbation, family):
    build, expected = HF_MODELS[family]
    torch.manual_seed(0)
    model = build()
    perturbed = add_perturbation(model, perturbation)
    assert len(perturbed.sites) == expected
    perturbed.train()
    out = perturbed(pixel_values=torch.randn(4, 3, 32, 32), labels=torch.randint(0, 5, (4,)))
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in perturbation.parameters())  # φ frozen by default


def test_convnext_sites_are_block_outputs(perturbation):
    perturbed = add_perturbation(HF_MODELS["convnext"][0](), perturbation)
    assert all(s.position == "output" and s.module_name.endswith(s.name.split(".")[-1]) for s in perturbed.sites)


class ReusedReluBlock(nn.Module):
    """torchvision's BasicBlock calls one ReLU module twice; only the call after the addition is a site."""

    def __init__(self, channels):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


def test_a_relu_module_called_twice_is_perturbed_only_after_the_addition(perturbation):
    # `downsample=None` is how torchvision marks blocks without projection; give the marker a module.
    block = ReusedReluBlock(4)
    block.downsample = nn.Identity()
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), block, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    perturbed = add_perturbation(model, perturbation)
    (site,) = perturbed.sites
    assert (site.module_name, site.call_index) == ("1.relu", 1)
    seen = []
    original = perturbed._perturb
    perturbed._perturb = lambda s, k, h: seen.append(h.clone()) or original(s, k, h)
    perturbed.eval()
    x = torch.randn(2, 3, 8, 8)
    perturbed(x)
    perturbed(x)
    assert len(seen) == 2  # once per forward, the counters reset between calls
    expected = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(model[0](x)))))) + model[0](x)
    torch.testing.assert_close(seen[0], expected)


def test_mlp_and_flat_features(perturbation):
    model = create_model("mlp", num_classes=3, hidden_sizes=(32, 16))
    perturbed = add_perturbation(model, perturbation)
    assert [(s.channels, s.spatial_size) for s in perturbed.sites] == [(32, 1), (16, 1)]
    perturbed.train()
    assert perturbed(torch.randn(5, 3, 32, 32)).shape == (5, 3)


def test_site_selection_modes(perturbation):
    model = create_model("resnet20", num_classes=10)
    names = [s.name for s in find_sites(model, torch.randn(2, 3, 32, 32))]
    bottom = add_perturbation(model, perturbation, select="bottom", num_sites=2)
    assert [s.name for s in bottom.sites] == names[:2]
    bottom.unwrap()
    top = add_perturbation(model, perturbation, select="top", num_sites=3)
    assert [s.name for s in top.sites] == names[-3:]
    top.unwrap()
    both = add_perturbation(model, perturbation, select="top_bottom", num_sites=1)
    assert [s.name for s in both.sites] == [names[0], names[-1]]
    both.unwrap()
    regex = add_perturbation(model, perturbation, sites=r"layer3\..*")
    assert [s.name for s in regex.sites] == names[-3:]
    regex.unwrap()
    listed = add_perturbation(model, perturbation, sites=["layer2.1", "fc"])
    assert [(s.name, s.position) for s in listed.sites] == [("layer2.1", "input"), ("fc", "output")]


def test_statistics_are_buffers_and_phi_appears_once(perturbation):
    model = create_model("conv4", num_classes=5)
    perturbed = add_perturbation(model, perturbation)
    keys = list(perturbed.state_dict())
    assert sum(k.startswith("perturbation.") for k in keys) == 4
    assert [k for k in keys if k.startswith("site_statistics.")] == [
        f"site_statistics.features_{i}_2.running_{s}" for i in range(4) for s in ("mean", "var")
    ]
    assert {k[len("model."):] for k in keys if k.startswith("model.")} == set(model.state_dict())
    perturbed.train()
    perturbed(torch.randn(8, 3, 32, 32))
    stats = perturbed.site_statistics["features_0_2"]
    assert stats.running_mean.shape == (32, 4) and stats.running_mean.abs().sum() > 0


def test_gradients_reach_the_model_and_phi_when_trainable(perturbation):
    model = create_model("resnet20", num_classes=4)
    perturbed = add_perturbation(model, perturbation, trainable=True)
    perturbed.train()
    nn.functional.cross_entropy(perturbed(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in perturbation.parameters())
    assert model.stem[0].weight.grad.abs().sum() > 0


def test_perturbation_changes_outputs_and_noise_coeff_zero_restores_them(perturbation):
    torch.manual_seed(0)
    model = create_model("conv4", num_classes=5).eval()
    x = torch.randn(3, 3, 32, 32)
    plain = model(x)
    perturbed = add_perturbation(model, perturbation).eval()
    assert not torch.allclose(perturbed(x), plain)
    perturbed.set_noise_coeff(0.0)
    torch.testing.assert_close(perturbed(x), plain)
    with pytest.raises(ValueError, match=r"noise_coeff must lie in \[0, 1\]"):
        perturbed.set_noise_coeff(1.5)


def test_mean_mode_is_deterministic_and_predict_proba_averages(perturbation):
    perturbed = add_perturbation(create_model("conv4", num_classes=5), perturbation).eval()
    x = torch.randn(3, 3, 32, 32)
    assert not torch.equal(perturbed(x), perturbed(x))  # samples noise, as the authors do
    probs = perturbed.predict_proba(x, num_samples=5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    perturbed.set_noise_mode("mean")
    torch.testing.assert_close(perturbed(x), perturbed(x))
    torch.testing.assert_close(perturbed.predict_proba(x, num_samples=7), perturbed(x).softmax(-1))


def test_unwrap_restores_the_original_model(perturbation):
    model = create_model("resnet20", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    before, keys = model(x), list(model.state_dict())
    perturbed = add_perturbation(model, perturbation)
    original = perturbed.unwrap()
    assert original is model and list(original.state_dict()) == keys
    torch.testing.assert_close(original(x), before)
    with pytest.raises(RuntimeError, match="unwrapped"):
        perturbed(x)


def test_plain_module_state_dict_round_trip(perturbation):
    perturbed = add_perturbation(create_model("conv4", num_classes=5), perturbation)
    perturbed.train()
    perturbed(torch.randn(8, 3, 32, 32))
    state = copy.deepcopy(perturbed.state_dict())
    fresh = add_perturbation(create_model("conv4", num_classes=5), type(perturbation)(perturbation.config))
    fresh.load_state_dict(state)
    perturbed.eval(), fresh.eval()
    perturbed.set_noise_mode("mean"), fresh.set_noise_mode("mean")
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(fresh(x), perturbed(x))


def test_transformers_model_round_trips_through_save_pretrained(perturbation, tmp_path):
    model = tiny_hf_resnet()
    perturbed = add_perturbation(model, perturbation)
    perturbed.train()
    perturbed(pixel_values=torch.randn(8, 3, 32, 32))
    perturbed.save_pretrained(tmp_path)
    loaded = PerturbedModel.from_pretrained(tmp_path)
    assert loaded.sites == perturbed.sites
    x = torch.randn(3, 3, 32, 32)
    for m in (perturbed, loaded):
        m.eval()
    torch.manual_seed(5)
    a = perturbed(pixel_values=x).logits
    torch.manual_seed(5)
    b = loaded(pixel_values=x).logits
    torch.testing.assert_close(a, b)


def test_deepcopy_keeps_a_working_independent_copy(perturbation):
    perturbed = add_perturbation(create_model("conv4", num_classes=5), perturbation)
    clone = copy.deepcopy(perturbed)
    clone.train()
    clone(torch.randn(4, 3, 32, 32))
    assert clone.site_statistics["features_0_2"].running_mean.abs().sum() > 0
    assert perturbed.site_statistics["features_0_2"].running_mean.abs().sum() == 0


def test_site_errors_name_the_site(perturbation):
    perturbed = add_perturbation(create_model("conv4", num_classes=5), perturbation).train()
    x = torch.randn(2, 3, 32, 32)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="site 'features.0.2'.*NaN"):
        perturbed(x)
    with pytest.raises((ValueError, TypeError, RuntimeError), match="channel|dtype|Half|float"):
        perturbed(torch.randn(2, 3, 32, 32).half())


def test_a_channel_count_the_site_was_not_built_for_is_named(perturbation):
    model = create_model("mlp", num_classes=3, hidden_sizes=(8,))
    perturbed = add_perturbation(model, perturbation)
    model.features[0][0] = nn.Linear(3 * 32 * 32, 6)  # the site now sees 6 channels instead of 8
    model.features[0][1] = nn.BatchNorm1d(6)
    model.classifier = nn.Linear(6, 3)
    with pytest.raises(ValueError, match=r"site 'features.0.2'.*\(6, 4\) for 6 channels"):
        perturbed.train()(torch.randn(2, 3, 32, 32))


def test_a_network_without_sites_is_refused_with_advice(perturbation):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4))
    with pytest.raises(ValueError, match="No perturbation site found in Sequential.*sites="):
        add_perturbation(model, perturbation)
    with pytest.raises(ValueError, match="No site or module named"):
        add_perturbation(model, perturbation, sites=["nothing"])
    assert len(add_perturbation(model, perturbation, sites=["1"]).sites) == 1


def test_a_model_cannot_be_perturbed_twice(perturbation):
    model = create_model("conv4", num_classes=5)
    first = add_perturbation(model, perturbation)
    with pytest.raises(ValueError, match="already carries a perturbation or regularizer.*unwrap"):
        add_perturbation(model, perturbation)
    first.unwrap()
    assert len(add_perturbation(model, perturbation).sites) == 4


def test_only_a_metaperturb_model_is_accepted():
    with pytest.raises(TypeError, match="MetaPerturbModel"):
        add_perturbation(create_model("conv4", num_classes=5), nn.Linear(2, 2))


def test_one_module_holding_two_sites_perturbs_both_calls(perturbation):
    """A plain network that reuses one ReLU: both of its calls are sites, each with its own statistics."""

    class SharedRelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.head = nn.Linear(12, 6), nn.Linear(6, 6), nn.Linear(6, 2)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.head(self.act(self.fc2(self.act(self.fc1(x)))))

    perturbed = add_perturbation(SharedRelu(), perturbation, example_inputs=torch.randn(2, 12))
    assert [(s.name, s.call_index) for s in perturbed.sites] == [("act#0", 0), ("act#1", 1)]
    perturbed.train()
    perturbed(torch.randn(4, 12))
    for key in perturbed.site_keys:
        assert perturbed.site_statistics[key].running_mean.abs().sum() > 0


def test_predict_proba_stacks_the_draws_of_keyword_inputs(perturbation, monkeypatch):
    """With the noise pinned to 0 every draw is the same pass, so 7 draws in chunks of 2 must equal one pass."""
    from metaperturb_hf import classifier_io, modeling_metaperturb

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=4)
    perturbed = add_perturbation(ResNetForImageClassification(config), perturbation).eval()
    x = torch.randn(3, 3, 32, 32)
    monkeypatch.setattr(modeling_metaperturb, "_sample_noise", lambda mu, seed: torch.zeros_like(mu))
    perturbation.kernel = "eager"  # the eager path's noise is the one pinned
    monkeypatch.setattr(classifier_io, "MAX_REPEATED_BATCH", 6)  # 2 copies per pass
    passes = []
    perturbed.register_forward_pre_hook(lambda module, args, kwargs: passes.append(len(kwargs["pixel_values"])),
                                        with_kwargs=True)
    probs = perturbed.predict_proba(pixel_values=x, num_samples=7)
    assert passes == [6, 6, 6, 3]
    with torch.no_grad():
        torch.testing.assert_close(probs, perturbed(pixel_values=x).logits.softmax(-1))


def test_finding_sites_gives_every_module_its_own_train_eval_flag_back(perturbation):
    """The probe pass runs in eval mode; a BatchNorm the user froze in eval mode stays so, and the rest trains."""
    model = create_model("resnet20", num_classes=10).train()
    frozen = model.layer2[0].bn1.eval()
    add_perturbation(model, perturbation)
    assert not frozen.training
    assert all(module.training for module in model.modules() if module is not frozen)
    evaluated = create_model("conv4", num_classes=5).eval()
    evaluated.features[1][1].train()
    add_perturbation(evaluated, perturbation)
    assert [m for m in evaluated.modules() if m.training] == [evaluated.features[1][1]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_probe_pass_runs_in_the_dtype_of_the_network(perturbation, dtype):
    model = create_model("resnet20", num_classes=10).to(dtype)
    perturbed = add_perturbation(model, perturbation).to(dtype)  # no example_inputs: the default probe batch
    assert len(perturbed.sites) == 9
    output = perturbed.train()(torch.randn(4, 3, 32, 32, dtype=dtype))
    assert output.dtype == dtype and torch.isfinite(output).all()
