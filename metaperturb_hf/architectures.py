"""The classifiers of the MetaPerturb paper: Conv-4/6, VGG-9, CIFAR ResNets, a wide ResNet and an MLP.

They are plain `torch.nn.Module`s built by `create_model(name, num_classes, image_size, in_channels, **kwargs)`. Their
module structure follows fixed conventions, because code that inspects networks relies on them:

- every activation is its own `nn.ReLU()` instance, called once per forward;
- plain layers are `conv -> BatchNorm -> ReLU`, so the input of each ReLU is a BatchNorm output;
- every residual block has a child `shortcut` (an empty `nn.Sequential` for identity), and only residual blocks do;
- conv nets keep their blocks in `features` and their head in `classifier`; ResNets have `stem`, `layer1..3`, `fc`;
- every network carries `create_model_args`, the arguments that build it again (a saved perturbed model needs them).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BasicBlock",
    "ChannelPadShortcut",
    "ConvNet",
    "MLP",
    "ResNet",
    "WideBasicBlock",
    "WideResNet",
    "conv_bn_relu",
    "create_model",
    "list_models",
    "register_model",
]


@dataclass(frozen=True)
class _ModelEntry:
    build: Callable[..., nn.Module]
    min_image_size: int


_MODELS: dict[str, _ModelEntry] = {}


def register_model(name: str, *, min_image_size: int) -> Callable:
    """Register `build(num_classes, image_size, in_channels, **kwargs)` under `name`.

    `min_image_size` is the smallest input side the network's downsampling leaves at least one pixel for.
    """

    def decorator(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"Model {name!r} is already registered")
        _MODELS[name] = _ModelEntry(build, min_image_size)
        return build

    return decorator


# `create_model("hf:<checkpoint or config>")` builds a transformers image classifier.
TRANSFORMERS_PREFIX = "hf:"


def list_models() -> list[str]:
    """Names accepted by `create_model`, sorted."""
    return sorted(_MODELS)


def create_model(name: str, num_classes: int, image_size: int = 32, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build the network `name` for `in_channels x image_size x image_size` inputs and `num_classes` logits.

    `name` is one of `list_models()`, or `hf:` followed by a transformers checkpoint or config of an image classifier
    (hub id or folder; see `transformers_classifier`).
    """
    if name.startswith(TRANSFORMERS_PREFIX):
        return transformers_classifier(name[len(TRANSFORMERS_PREFIX):], num_classes)
    if name not in _MODELS:
        raise ValueError(f"Unknown model {name!r}; available models: {', '.join(list_models())}")
    entry = _MODELS[name]
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be at least 1, got {in_channels}")
    if image_size < entry.min_image_size:
        raise ValueError(
            f"image_size={image_size} is too small for {name}: its downsampling needs image_size >= "
            f"{entry.min_image_size}"
        )
    model = entry.build(num_classes, image_size, in_channels, **kwargs)
    model.apply(_init_weights)
    # What builds the same network again; a saved PerturbedModel rebuilds its classifier from it.
    model.create_model_args = {"name": name, "num_classes": num_classes, "image_size": image_size,
                               "in_channels": in_channels, **kwargs}
    return model


def transformers_classifier(name_or_path: str, num_classes: int) -> nn.Module:
    """A `transformers` image classifier with `num_classes` labels: the checkpoint's weights where it has them (a head
    of another size starts from scratch), the architecture of a config alone from scratch."""
    from transformers import AutoConfig, AutoModelForImageClassification

    config = AutoConfig.from_pretrained(name_or_path, num_labels=num_classes)
    try:
        return AutoModelForImageClassification.from_pretrained(name_or_path, config=config,
                                                               ignore_mismatched_sizes=True)
    except OSError:  # a config without weights
        return AutoModelForImageClassification.from_config(config)


def _init_weights(module: nn.Module) -> None:
    """He initialisation for convolutions feeding ReLUs; BatchNorm starts as the identity; Linear keeps its default."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """A 3x3 convolution that keeps the size at stride 1; bias-free by default (a following BatchNorm makes a bias
    redundant in training; the authors' Conv-4/6 carry one, which shifts only BatchNorm's running mean)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=bias)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """A bias-free 1x1 convolution: the projection shortcut of residual blocks."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


def conv_bn_relu(in_channels: int, out_channels: int, pool: bool = False, bias: bool = False) -> nn.Sequential:
    """`conv3x3 -> BatchNorm2d -> ReLU`, then `MaxPool2d(2)` when `pool`: the plain layer of every conv net here."""
    layers = [conv3x3(in_channels, out_channels, bias=bias), nn.BatchNorm2d(out_channels), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """A stack of conv-BN-ReLU(-pool) blocks and one linear classifier: Conv-4, Conv-6 and VGG-9.

    With `global_pool` the final map is averaged (any input size works); otherwise it is flattened, as the few-shot
    Conv nets do, and `num_features` must be channels x height x width of that map.
    """

    def __init__(self, blocks: Sequence[nn.Module], num_features: int, num_classes: int, global_pool: bool):
        super().__init__()
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1) if global_pool else nn.Identity()
        self.classifier = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def _few_shot_conv_net(
    num_blocks: int, num_pools: int, num_classes: int, image_size: int, in_channels: int, width: int, conv_bias: bool
) -> ConvNet:
    if width < 1:
        raise ValueError(f"width must be at least 1, got {width}")
    blocks = [
        conv_bn_relu(in_channels if i == 0 else width, width, pool=i < num_pools, bias=conv_bias)
        for i in range(num_blocks)
    ]
    final_size = image_size // 2**num_pools
    return ConvNet(blocks, width * final_size * final_size, num_classes, global_pool=False)


@register_model("conv4", min_image_size=2**4)
def conv4(
    num_classes: int, image_size: int, in_channels: int, width: int = 32, conv_bias: bool = False
) -> ConvNet:
    """Conv-4: four pooled conv blocks of `width` channels. `conv_bias=True` adds the authors' convolution bias."""
    return _few_shot_conv_net(4, 4, num_classes, image_size, in_channels, width, conv_bias)


@register_model("conv6", min_image_size=2**4)
def conv6(
    num_classes: int, image_size: int, in_channels: int, width: int = 32, conv_bias: bool = False
) -> ConvNet:
    """Conv-6: six conv blocks of `width` channels; only the first four pool, so small inputs still fit.
    `conv_bias=True` adds the authors' convolution bias."""
    return _few_shot_conv_net(6, 4, num_classes, image_size, in_channels, width, conv_bias)


VGG9_CONFIG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


@register_model("vgg9", min_image_size=2**5)
def vgg9(num_classes: int, image_size: int, in_channels: int) -> ConvNet:
    """VGG-9: eight conv-BN-ReLU layers (`VGG9_CONFIG`, "M" = max-pool) and one linear classifier."""
    blocks, channels = [], in_channels
    for width in VGG9_CONFIG:
        if width == "M":
            blocks[-1].append(nn.MaxPool2d(2))
        else:
            blocks.append(conv_bn_relu(channels, width))
            channels = width
    return ConvNet(blocks, channels, num_classes, global_pool=True)


class ChannelPadShortcut(nn.Module):
    """He et al.'s option-A shortcut: subsample by `stride` and zero-pad the new channels, half on each side.

    It has no parameters, so a ResNet-20 has the paper's 0.27 M (the authors' networks use it).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"an option-A shortcut only adds channels, got {in_channels} -> {out_channels}")
        self.stride = stride
        self.pad_before = (out_channels - in_channels) // 2
        self.pad_after = out_channels - in_channels - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad_before, self.pad_after))


SHORTCUT_TYPES = ("A", "B")


class BasicBlock(nn.Module):
    """The post-activation residual block of He et al. (2016): its output is that of `act2`, applied after the add.

    The shortcut is the identity or, when the shape changes, option A (`ChannelPadShortcut`: subsampling and zero
    channels, the authors' and the paper's choice) or option B (a strided 1x1 conv + BN).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        if shortcut not in SHORTCUT_TYPES:
            raise ValueError(f"shortcut must be one of {SHORTCUT_TYPES}, got {shortcut!r}")
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = nn.ReLU()
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            if shortcut == "A":
                self.shortcut = nn.Sequential(ChannelPadShortcut(in_channels, out_channels, stride))
            else:
                self.shortcut = nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.act2(out)


def _stage(block: Callable[..., nn.Module], num_blocks: int, in_channels: int, out_channels: int, stride: int):
    """`num_blocks` residual blocks; only the first changes width and stride."""
    blocks = [block(in_channels, out_channels, stride)]
    blocks += [block(out_channels, out_channels, 1) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class ResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016): 16-channel stem, three stages of 16/32/64 channels, avg pool, Linear.

    `shortcut` is "A" (parameter-free, as in the paper and the authors' code) or "B" (1x1 projection).
    """

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, shortcut: str = "A"):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2 with n >= 1, got {depth}")
        num_blocks = (depth - 2) // 6

        def block(block_in: int, block_out: int, stride: int) -> BasicBlock:
            return BasicBlock(block_in, block_out, stride, shortcut)

        self.stem = conv_bn_relu(in_channels, 16)
        self.layer1 = _stage(block, num_blocks, 16, 16, stride=1)
        self.layer2 = _stage(block, num_blocks, 16, 32, stride=2)
        self.layer3 = _stage(block, num_blocks, 32, 64, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(out).flatten(1))


def _resnet_builder(depth: int) -> Callable[..., ResNet]:
    def build(num_classes: int, image_size: int, in_channels: int, shortcut: str = "A") -> ResNet:
        return ResNet(depth, num_classes, in_channels, shortcut)

    build.__name__ = build.__qualname__ = f"resnet{depth}"
    build.__doc__ = f"ResNet-{depth} for CIFAR-sized inputs; `shortcut` \"A\" (default, the paper's) or \"B\"."
    return build


for _depth in (20, 32, 44, 56):
    register_model(f"resnet{_depth}", min_image_size=2**2)(_resnet_builder(_depth))
del _depth


class WideBasicBlock(nn.Module):
    """The pre-activation block of Zagoruyko & Komodakis (2016): BN-ReLU-conv twice, returning the sum itself.

    A projecting shortcut (1x1 conv, when the shape changes) reads the pre-activated input, as in the original code;
    the identity shortcut reads the raw input.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.act1 = nn.ReLU()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(conv1x1(in_channels, out_channels, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        out = self.conv2(self.dropout(self.act2(self.bn2(self.conv1(pre)))))
        return out + self.shortcut(pre if len(self.shortcut) else x)


class WideResNet(nn.Module):
    """WRN-`depth`-`widen_factor`: 16-channel conv stem, three stages of 16k/32k/64k channels, BN-ReLU, pool,
    Linear."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be at least 1, got {widen_factor}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        num_blocks = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]

        def block(in_channels: int, out_channels: int, stride: int) -> WideBasicBlock:
            return WideBasicBlock(in_channels, out_channels, stride, dropout)

        self.stem = conv3x3(in_channels, 16)
        self.layer1 = _stage(block, num_blocks, 16, widths[0], stride=1)
        self.layer2 = _stage(block, num_blocks, widths[0], widths[1], stride=2)
        self.layer3 = _stage(block, num_blocks, widths[1], widths[2], stride=2)
        self.bn = nn.BatchNorm2d(widths[2])
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(self.act(self.bn(out))).flatten(1))


@register_model("wrn", min_image_size=2**2)
def wrn(
    num_classes: int, image_size: int, in_channels: int, depth: int = 16, widen_factor: int = 4, dropout: float = 0.0
) -> WideResNet:
    """WRN-16-4 by default."""
    return WideResNet(depth, widen_factor, num_classes, in_channels, dropout)


class MLP(nn.Module):
    """A fully connected net on the flattened image: Linear-BN-ReLU per hidden layer, then a linear classifier."""

    def __init__(self, in_features: int, hidden_sizes: Sequence[int], num_classes: int):
        super().__init__()
        sizes = [in_features, *hidden_sizes]
        self.features = nn.Sequential(
            *(
                nn.Sequential(nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.ReLU())
                for n_in, n_out in zip(sizes, sizes[1:])
            )
        )
        self.classifier = nn.Linear(sizes[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x.flatten(1)))


@register_model("mlp", min_image_size=1)
def mlp(num_classes: int, image_size: int, in_channels: int, hidden_sizes: Sequence[int] = (256, 256)) -> MLP:
    """A two-hidden-layer MLP of 256 units by default."""
    if any(size < 1 for size in hidden_sizes):
        raise ValueError(f"hidden_sizes must all be at least 1, got {tuple(hidden_sizes)}")
    return MLP(in_channels * image_size * image_size, hidden_sizes, num_classes)
