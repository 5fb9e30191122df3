import pytest
import torch
from torch import nn

from metaperturb_hf.architectures import BasicBlock, WideBasicBlock, create_model, list_models

ALL_MODELS = list_models()


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _shortcut_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "shortcut")]


def test_registry_lists_every_network_of_the_paper():
    assert ALL_MODELS == sorted(
        ["conv4", "conv6", "vgg9", "resnet20", "resnet32", "resnet44", "resnet56", "wrn", "mlp"]
    )


@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize("name", ALL_MODELS)
def test_logits_shape(name, image_size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, image_size=image_size)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, image_size, image_size))
    assert type(logits) is torch.Tensor
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["conv4", "conv6", "mlp", "resnet20"])
def test_other_input_channels_and_sizes(name):
    model = create_model(name, num_classes=5, image_size=84, in_channels=1)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 84, 84)).shape == (2, 5)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=4)
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 3]))
    loss.backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_relu_module_runs_exactly_once_and_no_functional_relu(name, monkeypatch):
    model = create_model(name, num_classes=3)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert relus
    calls = {id(m): 0 for m in relus}
    for m in relus:
        m.register_forward_hook(lambda module, args, out: calls.__setitem__(id(module), calls[id(module)] + 1))
    functional_calls = []
    relu = nn.functional.relu
    monkeypatch.setattr(nn.functional, "relu", lambda *a, **k: functional_calls.append(1) or relu(*a, **k))

    model(torch.randn(2, 3, 32, 32))

    assert set(calls.values()) == {1}
    # nn.ReLU itself calls F.relu, so any extra call would be an activation outside a module.
    assert len(functional_calls) == len(relus)


@pytest.mark.parametrize(("name", "expected"), [("resnet20", 9), ("resnet32", 15), ("resnet44", 21), ("resnet56", 27)])
def test_resnet_residual_blocks(name, expected):
    model = create_model(name, num_classes=10)
    blocks = _shortcut_blocks(model)
    assert len(blocks) == expected
    assert all(isinstance(m, BasicBlock) for _, m in blocks)
    assert {n.split(".")[0] for n, _ in blocks} == {"layer1", "layer2", "layer3"}
    assert isinstance(model.stem, nn.Sequential)
    assert [type(m) for m in model.stem] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert isinstance(model.fc, nn.Linear)
    projecting = [n for n, m in blocks if len(m.shortcut)]
    assert projecting == ["layer2.0", "layer3.0"]


def test_resnet_block_output_is_its_last_activation_applied_to_the_sum():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10)
    block = model.layer2[0]
    seen = {}
    block.bn2.register_forward_hook(lambda m, a, out: seen.__setitem__("bn2", out))
    block.shortcut.register_forward_hook(lambda m, a, out: seen.__setitem__("shortcut", out))
    block.act2.register_forward_hook(lambda m, a, out: seen.update(act2_in=a[0], act2_out=out))
    block.register_forward_hook(lambda m, a, out: seen.__setitem__("block", out))

    model(torch.randn(2, 3, 32, 32))

    assert seen["block"] is seen["act2_out"]
    torch.testing.assert_close(seen["act2_in"], seen["bn2"] + seen["shortcut"])


def test_wrn_block_returns_the_sum_without_activation():
    torch.manual_seed(0)
    model = create_model("wrn", num_classes=10)
    outputs = []
    model.layer1[1].register_forward_hook(lambda m, a, out: outputs.append(out))
    model(torch.randn(2, 3, 32, 32))
    assert (outputs[0] < 0).any()


def test_wrn_depth_and_width_kwargs():
    model = create_model("wrn", num_classes=10, depth=16, widen_factor=2)
    blocks = _shortcut_blocks(model)
    assert len(blocks) == 6
    assert all(isinstance(m, WideBasicBlock) for _, m in blocks)
    assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels] == [32, 64]
    assert model.fc.in_features == 128
    assert len(_shortcut_blocks(create_model("wrn", num_classes=10, depth=28))) == 12


def test_wrn_dropout_kwarg():
    model = create_model("wrn", num_classes=10, dropout=0.3)
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.3}


def test_conv4_structure():
    model = create_model("conv4", num_classes=5)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 4
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 4
    assert not _shortcut_blocks(model)
    for block in model.features:
        assert [type(m) for m in block] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]
    assert isinstance(model.classifier, nn.Linear)


def test_conv6_width_kwarg_and_pooling():
    model = create_model("conv6", num_classes=5, width=64)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6
    assert {c.out_channels for c in convs} == {64}
    assert [isinstance(block[-1], nn.MaxPool2d) for block in model.features] == [True] * 4 + [False] * 2
    assert model.classifier.in_features == 64 * 2 * 2
    assert create_model("conv4", num_classes=5).features[0][0].out_channels == 32


def test_vgg9_has_eight_conv_layers_and_one_linear():
    model = create_model("vgg9", num_classes=10)
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == [
        64, 128, 256, 256, 512, 512, 512, 512
    ]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 1
    for block in model.features:
        assert [type(m) for m in block[:3]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]


def test_mlp_hidden_sizes_kwarg():
    model = create_model("mlp", num_classes=10, hidden_sizes=(64, 32, 16))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3072, 64), (64, 32), (32, 16), (16, 10)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 3


def _conv(c_in, c_out, k):
    return c_in * c_out * k * k


def _bn(c):
    return 2 * c


@pytest.mark.parametrize(("shortcut", "expected"), [("A", 269_722), ("B", 272_474)])
def test_resnet20_parameter_count_is_exact(shortcut, expected):
    def block(c_in, c_out):
        projection = _conv(c_in, c_out, 1) + _bn(c_out) if c_in != c_out and shortcut == "B" else 0
        return _conv(c_in, c_out, 3) + _bn(c_out) + _conv(c_out, c_out, 3) + _bn(c_out) + projection

    stem = _conv(3, 16, 3) + _bn(16)
    stages = sum(block(c_in, c_out) + 2 * block(c_out, c_out) for c_in, c_out in [(16, 16), (16, 32), (32, 64)])
    fc = 64 * 10 + 10
    model = create_model("resnet20", num_classes=10, shortcut=shortcut)
    assert _num_params(model) == stem + stages + fc == expected


def test_conv4_and_mlp_parameter_counts_are_exact():
    conv4 = _conv(3, 32, 3) + _bn(32) + 3 * (_conv(32, 32, 3) + _bn(32)) + (32 * 2 * 2) * 5 + 5
    assert _num_params(create_model("conv4", num_classes=5)) == conv4
    mlp = (3072 * 256 + 256 + _bn(256)) + (256 * 256 + 256 + _bn(256)) + 256 * 10 + 10
    assert _num_params(create_model("mlp", num_classes=10)) == mlp


@pytest.mark.parametrize(
    ("name", "published"),
    # He et al. (2016) Table 6 and Zagoruyko & Komodakis (2016); 1x1 projections add a few thousand to ResNets.
    [("resnet32", 0.46e6), ("resnet44", 0.66e6), ("resnet56", 0.85e6), ("wrn", 2.7e6), ("vgg9", 9.2e6)],
)
def test_parameter_counts_match_published_sizes(name, published):
    assert _num_params(create_model(name, num_classes=10)) == pytest.approx(published, rel=0.03)


def test_unknown_name_lists_available_models():
    with pytest.raises(ValueError, match="Unknown model 'resnet18'") as excinfo:
        create_model("resnet18", num_classes=10)
    for name in ALL_MODELS:
        assert name in str(excinfo.value)


@pytest.mark.parametrize(("name", "too_small", "minimum"), [("conv4", 8, 16), ("conv6", 15, 16), ("vgg9", 16, 32)])
def test_too_small_image_raises_with_minimum(name, too_small, minimum):
    with pytest.raises(ValueError, match=rf"image_size={too_small} is too small for {name}.*>= {minimum}"):
        create_model(name, num_classes=10, image_size=too_small)
    model = create_model(name, num_classes=10, image_size=minimum)
    assert model(torch.randn(2, 3, minimum, minimum)).shape == (2, 10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(name="conv4", num_classes=0), "num_classes must be at least 1, got 0"),
        (dict(name="conv4", num_classes=2, in_channels=0), "in_channels must be at least 1"),
        (dict(name="conv6", num_classes=2, width=0), "width must be at least 1"),
        (dict(name="wrn", num_classes=2, depth=15), "WRN depth must be 6n\\+4"),
        (dict(name="wrn", num_classes=2, dropout=1.0), "dropout must be in"),
        (dict(name="mlp", num_classes=2, hidden_sizes=(8, 0)), "hidden_sizes must all be at least 1"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model(**kwargs)


def test_initialisation():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10)
    conv = model.layer3[1].conv1  # 64 -> 64, 3x3: kaiming fan_out std = sqrt(2 / (64 * 9))
    assert conv.weight.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.05)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
