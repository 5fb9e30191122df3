"""The authors' ResNet-20 and Conv-4, converted, compute their function with the perturbation in place.

The golden file holds the authors' weights, an input, every site's input and injected ε in call order, and the
logits of three forward passes (float64): eval without perturbation, train with perturbation (clip 100), eval with
perturbation and running statistics.
"""

import pytest
import torch
from conftest import REFERENCE
from safetensors.torch import load_file

from metaperturb_hf import add_perturbation, convert_official_checkpoint, convert_official_classifier
from metaperturb_hf.architectures import ChannelPadShortcut, create_model

NETWORKS_GOLDEN = REFERENCE / "official_networks_golden.safetensors"
CASES = {"resnet20": "resnet20", "conv4_32": "conv4_32"}


@pytest.fixture(scope="module")
def networks_golden():
    if not NETWORKS_GOLDEN.is_file():
        pytest.skip(f"the network golden outputs are not at {NETWORKS_GOLDEN} (set METAPERTURB_SHARED to ../shared)")
    return load_file(NETWORKS_GOLDEN)


def _case(golden, case):
    prefix = case + "."
    return {key[len(prefix):]: value for key, value in golden.items() if key.startswith(prefix)}


def _subtree(case, name):
    prefix = name + "."
    return {key[len(prefix):]: value for key, value in case.items() if key.startswith(prefix)}


def _converted_network(case, arch):
    weights = {key: value.double() if value.is_floating_point() else value for key, value in
               _subtree(case, "weights").items()}
    model = convert_official_classifier(weights, arch, num_classes=case["logits_plain_eval"].shape[1])
    return model.double()


def _inject(phi, noises, seen_inputs):
    """Make φ take its ε from `noises` in call order and record each site's input, as the golden run did."""
    forward = type(phi).forward.__get__(phi)
    draws = iter(noises)

    def forward_with_golden_noise(hidden_states, *args, **kwargs):
        seen_inputs.append(hidden_states.detach().clone())
        return forward(hidden_states, *args, noise=next(draws).to(hidden_states.dtype), **kwargs)

    phi.forward = forward_with_golden_noise


@pytest.mark.parametrize("case_name", list(CASES))
def test_converted_network_matches_the_authors_network(case_name, networks_golden, official_checkpoint):
    case = _case(networks_golden, case_name)
    model = _converted_network(case, CASES[case_name])
    x = case["x"].double()
    num_sites = sum(1 for key in case if key.endswith(".eps") and key.startswith("site"))

    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), case["logits_plain_eval"], atol=1e-5, rtol=1e-5)

    phi = convert_official_checkpoint(official_checkpoint).double()
    perturbed = add_perturbation(model, phi, example_inputs=x).double()
    assert len(perturbed.sites) == num_sites
    assert perturbed.channel_norm == case["channel_norm_factor"].item()
    assert perturbed.spatial_norm == case["spatial_norm_factor"].item()

    seen = []
    _inject(phi, [case[f"site{i}.eps"] for i in range(num_sites)], seen)
    perturbed.train()
    with torch.no_grad():
        logits = perturbed(x)
    assert len(seen) == num_sites
    for i, site_input in enumerate(seen):
        torch.testing.assert_close(site_input.float(), case[f"site{i}.input"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, case["logits_train_perturbed"], atol=1e-5, rtol=1e-5)

    batch = x.shape[0]
    for i, key in enumerate(perturbed.site_keys):
        stats = perturbed.site_statistics[key]
        torch.testing.assert_close(stats.running_mean, case[f"running_mean_after.site{i}"], atol=1e-5, rtol=1e-5)
        # The authors apply Bessel's correction twice to the running variance; ours once.
        official_update = (case[f"running_var_after.site{i}"] - 0.9) / (batch / (batch - 1))
        torch.testing.assert_close(stats.running_var, 0.9 + official_update, atol=1e-5, rtol=1e-5)
    ours_bn = {key: value for key, value in model.state_dict().items() if "running" in key}
    theirs_bn = convert_official_classifier(
        {**_subtree(case, "weights"), **_subtree(case, "bn_after_train")}, CASES[case_name],
        num_classes=case["logits_plain_eval"].shape[1],
    ).double().state_dict()
    for key, value in ours_bn.items():
        torch.testing.assert_close(value, theirs_bn[key], atol=1e-5, rtol=1e-5)

    # Evaluation reads the running statistics: give it the authors' (their variance corrected twice) to compare.
    for i, key in enumerate(perturbed.site_keys):
        perturbed.site_statistics[key].running_var.copy_(case[f"running_var_after.site{i}"])
    seen.clear()
    _inject(phi, [case[f"site{i}.eps_eval"] for i in range(num_sites)], seen)
    perturbed.eval()
    with torch.no_grad():
        torch.testing.assert_close(perturbed(x), case["logits_eval_perturbed"], atol=1e-5, rtol=1e-5)


def test_option_a_is_the_default_resnet_shortcut():
    model = create_model("resnet20", num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == 269_722  # the paper's 0.27 M
    pads = [m for m in model.modules() if isinstance(m, ChannelPadShortcut)]
    assert len(pads) == 2
    x = torch.randn(2, 16, 8, 8)
    out = pads[0](x)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()
    assert sum(p.numel() for p in create_model("resnet20", num_classes=10, shortcut="B").parameters()) > 269_722


def _authors_conv4_state(num_classes):
    """A Conv-4 state dict under the authors' key names (conv_layers.j.conv/bn, fc)."""
    ours = create_model("conv4", num_classes=num_classes, conv_bias=True).state_dict()
    names = {"0": "conv", "1": "bn"}
    authors = {}
    for key, value in ours.items():
        parts = key.split(".")
        if parts[0] == "features":
            authors[".".join(["conv_layers", parts[1], names[parts[2]], *parts[3:]])] = value
        else:
            authors[key.replace("classifier.", "fc.")] = value
    return ours, authors


def test_converter_maps_every_authors_key_and_skips_their_perturbation():
    ours, authors = _authors_conv4_state(5)
    authors["conv_layers.0.perturb.kernel"] = torch.zeros(4, 1, 3, 3)
    model = convert_official_classifier(authors, "conv4_32", num_classes=5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, ours[key]), key


def test_converter_refuses_foreign_keys_and_wrong_heads():
    _, authors = _authors_conv4_state(5)
    with pytest.raises(ValueError, match="not part of the authors' conv4_32"):
        convert_official_classifier({**authors, "classifier.weight": torch.zeros(5, 128)}, "conv4_32", num_classes=5)
    with pytest.raises(ValueError, match="outputs, not num_classes=7"):
        convert_official_classifier(authors, "conv4_32", num_classes=7)
    with pytest.raises(ValueError, match="No converter"):
        convert_official_classifier(authors, "vgg9", num_classes=5)
