"""The baseline regularizers: they train, perturb only in training, sit at MetaPerturb's sites and unwrap cleanly."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaperturb_hf.architectures import create_model
from metaperturb_hf.regularizers import REGULARIZERS, add_regularizer
from metaperturb_hf.sites import find_sites

NAMES = ["dropout", "dropblock", "manifold_mixup", "info_dropout"]
NOISY = ["dropout", "dropblock", "info_dropout"]
# Strong settings so "it perturbs" is unmistakable on a batch of 8.
STRONG = {"dropout": {"p": 0.5}, "dropblock": {"drop_prob": 0.5}, "info_dropout": {}, "manifold_mixup": {}}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_transformers_resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5)
    return ResNetForImageClassification(config)


def build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return tiny_transformers_resnet() if arch == "hf_resnet" else create_model(arch, num_classes=5)


def call(model, images):
    is_hf = hasattr(getattr(model, "config", None), "num_labels")
    output = model(pixel_values=images) if is_hf else model(images)
    return output.logits if hasattr(output, "logits") else output


@pytest.fixture
def batch():
    torch.manual_seed(1)
    return torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))


def test_the_registry_holds_the_four_baselines():
    assert sorted(REGULARIZERS) == sorted(NAMES)


@pytest.mark.parametrize("arch", ["conv4", "resnet20", "mlp", "hf_resnet"])
@pytest.mark.parametrize("name", NAMES)
def test_each_regularizer_trains(name, arch, batch):
    images, labels = batch
    model = build(arch)
    reg = add_regularizer(model, name)
    assert [s.name for s in reg.sites] == [s.name for s in find_sites(model, images[:2])]  # MetaPerturb's sites
    params = [*model.parameters(), *reg.regularizer_parameters()]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    reg.train()
    for _ in range(3):
        loss = reg.training_loss(images, labels)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, params) if p.grad is not None)
    assert any(not torch.equal(b, p) for b, p in zip(before, params))


@pytest.mark.parametrize("arch", ["conv4", "resnet20", "mlp", "hf_resnet"])
@pytest.mark.parametrize("name", NAMES)
def test_eval_is_exactly_the_unwrapped_model_and_train_perturbs(name, arch, batch):
    images, _ = batch
    model = build(arch).eval()
    with torch.no_grad():
        expected = call(model, images)
        reg = add_regularizer(model, name, **STRONG[name]).eval()
        assert torch.equal(call(reg, images), expected)
        if name in NOISY:
            # Train mode (BatchNorm on batch statistics) with and without the regularizer: the outputs must differ.
            clean = call(copy.deepcopy(reg).unwrap().train(), images)
            torch.manual_seed(3)
            assert not torch.allclose(call(reg.train(), images), clean)


def test_unwrap_restores_keys_and_outputs(batch):
    images, _ = batch
    model = build("resnet20").eval()
    keys = list(model.state_dict())
    with torch.no_grad():
        expected = model(images)
        reg = add_regularizer(model, "info_dropout")
        assert any(key.startswith("alpha_layers.") for key in reg.state_dict())
        restored = reg.unwrap()
        assert restored is model and list(restored.state_dict()) == keys
        assert not model._forward_hooks and not model._forward_pre_hooks
        assert torch.equal(restored.eval()(images), expected)
    with pytest.raises(RuntimeError, match="unwrapped"):
        reg(images)
    add_regularizer(model, "dropout").unwrap()  # a model can be wrapped again once unwrapped


def test_unknown_name_and_double_wrapping_are_refused():
    model = build("conv4")
    with pytest.raises(ValueError, match="dropblock.*info_dropout.*manifold_mixup"):
        add_regularizer(model, "cutout")
    add_regularizer(model, "dropout")
    with pytest.raises(ValueError, match="unwrap"):
        add_regularizer(model, "dropblock")


def capture_site(reg, index=0):
    """The tensor at site `index` after the regularizer acted on it (hooks run in registration order)."""
    site = reg.sites[index]
    assert site.position == "input"
    seen = []
    module = dict(reg.model.named_modules())[site.module_name]
    handle = module.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    return seen, handle


def test_dropblock_drops_whole_blocks_at_a_site(batch):
    images, _ = batch
    block = 3
    reg = add_regularizer(build("conv4"), "dropblock", drop_prob=0.5, block_size=block).train()
    seen, handle = capture_site(reg)  # the first conv's BN output: 32 channels of 32×32, nonzero almost surely
    with torch.no_grad():
        reg(images)
    handle.remove()
    dropped = (seen[0] == 0).float()
    assert 0.2 < dropped.mean() < 0.6
    assert in_whole_blocks(dropped, block)
    assert not in_whole_blocks((torch.rand_like(dropped) < 0.4).float(), block)  # what plain dropout would give


def in_whole_blocks(dropped: torch.Tensor, block: int) -> bool:
    """Whether every dropped unit lies in a block×block window that is dropped entirely."""
    full_windows = -F.max_pool2d(-dropped, block, stride=1)
    return torch.equal(F.max_pool2d(F.pad(full_windows, (block - 1,) * 4), block, stride=1), dropped)


def test_dropblock_rescales_by_the_kept_fraction_and_schedules():
    torch.manual_seed(0)
    reg = add_regularizer(build("conv4"), "dropblock", drop_prob=0.1).train()
    key = reg.site_keys[0]
    ones = torch.ones(8, 16, 32, 32)
    out = reg.regularize(key, ones)
    assert out.mean().item() == pytest.approx(1.0, abs=1e-5)  # expectation kept
    assert 0.05 < (out == 0).float().mean() < 0.15  # about drop_prob of the units dropped
    reg.set_drop_prob(0.0)
    assert torch.equal(reg.regularize(key, ones), ones)
    flat = torch.ones(64, 256)
    reg.set_drop_prob(0.5)
    assert 0.4 < (reg.regularize(key, flat) == 0).float().mean() < 0.6  # flat features: plain dropout
    with pytest.raises(ValueError):
        reg.set_drop_prob(1.0)


@pytest.mark.parametrize("arch", ["conv4", "hf_resnet"])
def test_manifold_mixup_loss_is_the_lambda_mix(arch, batch):
    images, labels = batch
    reg = add_regularizer(build(arch), "manifold_mixup").train()
    modules = dict(reg.model.named_modules())
    seen_layers = set()
    for seed in range(8):
        torch.manual_seed(seed)
        with torch.no_grad():
            loss = reg.training_loss(images, labels)
        layer, lam, perm = reg.last_mix
        seen_layers.add(layer)
        assert 0.0 < lam < 1.0 and sorted(perm.tolist()) == list(range(8))
        with torch.no_grad():
            if layer == "input":
                logits = call(reg, lam * images + (1 - lam) * images[perm])
            else:
                site = next(s for s in reg.sites if s.name == layer)
                mix = lambda mod, args, lam=lam, perm=perm: (lam * args[0] + (1 - lam) * args[0][perm],)  # noqa: E731
                handle = modules[site.module_name].register_forward_pre_hook(mix)
                logits = call(reg, images)
                handle.remove()
        expected = lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, labels[perm])
        torch.testing.assert_close(loss, expected)
        # Deterministic under the global seed.
        torch.manual_seed(seed)
        with torch.no_grad():
            assert torch.equal(reg.training_loss(images, labels), loss)
    assert "input" in seen_layers and len(seen_layers) > 1
    with torch.no_grad():  # a plain forward never mixes
        torch.testing.assert_close(call(reg, images), call(copy.deepcopy(reg).unwrap(), images))


def test_information_dropout_kl_is_positive_and_learned(batch):
    images, labels = batch
    model = build("conv4")
    reg = add_regularizer(model, "info_dropout", beta=0.5).train()
    params = reg.regularizer_parameters()
    assert len(params) == 2 * len(reg.sites)
    assert not any(p is q for p in params for q in model.parameters())
    reg(images)
    kl = reg.kl_term()
    assert kl.item() > 0
    kl.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    torch.manual_seed(5)
    loss = reg.training_loss(images, labels)
    torch.manual_seed(5)  # the same noise again: the loss is CE + beta * KL of one pass
    expected = F.cross_entropy(call(reg, images), labels) + 0.5 * reg.kl_term()
    torch.testing.assert_close(loss, expected)
    # Eval applies no noise and leaves no KL term behind.
    reg.eval()
    reg(images)
    assert reg.kl_term().item() == 0.0


def test_information_dropout_alpha_is_bounded_on_maps_and_flat_features():
    reg = add_regularizer(build("mlp"), "info_dropout")
    assert all(isinstance(layer, nn.Linear) for layer in reg.alpha_layers.values())
    log_alpha = reg.log_alpha(reg.site_keys[0], 100 * torch.randn(8, 256))
    assert log_alpha.shape == (8, 256)
    assert log_alpha.exp().max() <= 0.701 + 1e-6 and log_alpha.exp().min() >= 0.001 - 1e-9
    conv_reg = add_regularizer(build("conv4"), "info_dropout")
    assert all(isinstance(layer, nn.Conv2d) for layer in conv_reg.alpha_layers.values())


def test_deepcopy_gives_an_independent_working_copy(batch):
    images, labels = batch
    reg = add_regularizer(build("resnet20"), "dropblock")
    twin = copy.deepcopy(reg)
    twin.unwrap()
    assert torch.isfinite(reg.training_loss(images, labels))


def test_a_module_with_two_sites_perturbs_each_call_once():
    class SharedReLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second, self.act, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.act(self.second(self.act(self.first(x)))))

    reg = add_regularizer(SharedReLU(), "dropout", example_inputs=torch.randn(2, 4))
    assert [s.call_index for s in reg.sites] == [0, 1]
    calls = []
    reg.regularize = lambda key, h: calls.append(key) or h
    reg.train()(torch.randn(3, 4))
    assert calls == list(reg.site_keys)


def test_drop_block_2d_drops_whole_blocks_and_keeps_the_expected_mass():
    from metaperturb_hf.regularization_ops import drop_block_2d

    torch.manual_seed(0)
    x = torch.ones(64, 4, 12, 12)
    out = drop_block_2d(x, drop_prob=0.2, block_size=3)
    dropped = out == 0
    assert 0.1 < dropped.float().mean() < 0.3
    # Every dropped unit lies in a dropped 3×3 block: eroding the mask by a 3×3 window leaves one behind for each.
    blocks = -F.max_pool2d(-dropped.float(), 3, stride=1)
    assert torch.equal(F.max_pool2d(F.pad(blocks, (2,) * 4), 3, stride=1).bool(), dropped)
    torch.testing.assert_close(out.mean(), torch.tensor(1.0))  # rescaled by the kept fraction of the batch
    assert drop_block_2d(x, 0.0, 3) is x
