"""Finding the sites of a classifier: the tensors of its forward pass that a perturbation multiplies.

A *site* is (docs/sites.md):

- plain networks (conv → norm → activation, MLPs): the input of every activation;
- residual networks: the tensor right after each block's residual addition (the input of the block's final
  activation when the block ends with one, as in ResNet; the block's output when it does not, as in ConvNeXt or
  pre-activation WRNs). Activations inside blocks and in the stem are not sites.

Sites are found from one probe forward pass, so they work with any module tree (the reference networks,
`transformers` CNNs, torchvision/timm ResNets, MLPs) without knowing its classes; a `PerturbationConfig` says which
of them to take (`site_wrapper.resolve_sites`).
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch
from torch import nn

from .classifier_io import eval_mode
from .perturbation_config import PerturbationConfig

# Modules treated as activations. transformers wraps its own (GELUActivation, ...) in `transformers.activations`.
ACTIVATION_TYPES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish)
# A module with one of these children is a residual block (ours, torchvision, timm, transformers
# ResNet/RegNet/ConvNeXt).
RESIDUAL_MARKERS = ("shortcut", "downsample", "drop_path")
# Activations inside gating branches (squeeze-excitation, attention) act on pooled vectors, not on features.
GATING_MODULE_PATTERN = re.compile(r"SqueezeExcit|SELayer|SEModule|SEBlock|Attention")


@dataclass(frozen=True)
class Site:
    """Where one perturbation is applied: the input or output of the `call_index`-th call of `module_name`."""

    name: str
    module_name: str
    position: str  # "input" of an activation or "output" of a block
    call_index: int
    channels: int
    spatial_size: int


def _is_activation(module: nn.Module) -> bool:
    return isinstance(module, ACTIVATION_TYPES) or type(module).__module__ == "transformers.activations"


def _residual_blocks(model: nn.Module) -> list[str]:
    """Innermost modules that carry a residual marker (a stage that holds blocks is not itself a block)."""
    marked = [
        name
        for name, module in model.named_modules()
        if name and any(isinstance(getattr(module, marker, None), nn.Module) for marker in RESIDUAL_MARKERS)
    ]
    return [name for name in marked if not any(other.startswith(name + ".") for other in marked)]


def _inside(name: str, ancestor: str) -> bool:
    return name.startswith(ancestor + ".")


@dataclass
class _Call:
    module_name: str
    call_index: int
    input: torch.Tensor | None
    output: torch.Tensor | None


def _trace_calls(model: nn.Module, example_inputs, module_names: set[str]) -> list[_Call]:
    """Run one forward pass in eval mode and record, in order, every call of the named modules; afterwards every
    submodule has its own train/eval flag back (`classifier_io.eval_mode`)."""
    modules = dict(model.named_modules())
    calls: list[_Call] = []
    counts: dict[str, int] = {}

    def recorder(name):
        def hook(module, args, output):
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            calls.append(_Call(name, counts.get(name, 0), first, output if isinstance(output, torch.Tensor) else None))
            counts[name] = counts.get(name, 0) + 1

        return hook

    handles = [modules[name].register_forward_hook(recorder(name)) for name in module_names]
    try:
        with eval_mode(model), torch.no_grad():
            _call_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _call_model(model: nn.Module, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _site_from_call(name: str, call: _Call, position: str) -> Site | None:
    tensor = call.input if position == "input" else call.output
    if tensor is None or tensor.dim() not in (2, 4):
        return None
    spatial = tensor.shape[2] if tensor.dim() == 4 else 1
    return Site(name, call.module_name, position, call.call_index, tensor.shape[1], spatial)


def find_sites(model: nn.Module, example_inputs) -> list[Site]:
    """All sites of `model` by the rules of docs/sites.md, in forward order."""
    modules = dict(model.named_modules())
    blocks = _residual_blocks(model)
    activations = {
        name
        for name, module in modules.items()
        if _is_activation(module)
        and not any(GATING_MODULE_PATTERN.search(type(modules[a]).__name__) for a in _ancestors(name))
    }
    calls = _trace_calls(model, example_inputs, activations | set(blocks))
    calls_per_module = {}
    for call in calls:
        calls_per_module[call.module_name] = calls_per_module.get(call.module_name, 0) + 1

    sites = []
    if blocks:
        for index, call in enumerate(calls):
            if call.module_name not in blocks:
                continue
            inner = [c for c in calls[:index] if _inside(c.module_name, call.module_name) and c.output is not None]
            last = inner[-1] if inner and inner[-1].module_name in activations else None
            if last is not None and last.output is call.output:
                site = _site_from_call(call.module_name, last, "input")
            else:
                site = _site_from_call(call.module_name, call, "output")
            sites.append(site)
    else:
        for call in calls:
            name = call.module_name
            if calls_per_module[name] > 1:
                name = f"{name}#{call.call_index}"
            sites.append(_site_from_call(name, call, "input"))
    return [site for site in sites if site is not None]


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def select_sites(sites: list[Site], config: PerturbationConfig) -> list[Site]:
    """Keep all sites, the bottom/top `num_sites`, or `num_sites` at each end ("top_bottom")."""
    count = config.num_sites
    if config.select == "all":
        return list(sites)
    if config.select == "bottom":
        return sites[:count]
    if config.select == "top":
        return sites[-count:]
    keep = set(range(count)) | set(range(len(sites) - count, len(sites)))
    return [site for index, site in enumerate(sites) if index in keep]


def match_sites(model: nn.Module, example_inputs, candidates: list[Site], sites) -> list[Site]:
    """Resolve a regex or a list of names against the detected sites, else against module outputs."""
    if isinstance(sites, str):
        pattern = re.compile(sites)
        chosen = [site for site in candidates if pattern.fullmatch(site.name)]
        if not chosen:
            names = [name for name, _ in model.named_modules() if name and pattern.fullmatch(name)]
            chosen = _output_sites(model, example_inputs, names)
    else:
        by_name = {site.name: site for site in candidates}
        others = [name for name in sites if name not in by_name]
        outputs = {site.name: site for site in _output_sites(model, example_inputs, others)}
        chosen = [by_name.get(name) or outputs[name] for name in sites]
    return chosen


def _output_sites(model: nn.Module, example_inputs, names: list[str]) -> list[Site]:
    """Sites at the outputs of explicitly named modules."""
    modules = dict(model.named_modules())
    unknown = [name for name in names if name not in modules]
    if unknown:
        raise ValueError(
            f"No site or module named {unknown} in {type(model).__name__}; "
            "see `find_sites(model, example_inputs)` or `model.named_modules()` for valid names."
        )
    calls = _trace_calls(model, example_inputs, set(names))
    sites = []
    for call in calls:
        site = _site_from_call(call.module_name, call, "output")
        if site is None:
            raise ValueError(
                f"Module '{call.module_name}' does not output a (B, C, H, W) or (B, C) tensor and cannot be a site."
            )
        if call.call_index == 0:
            sites.append(site)
    return sites


def unique_keys(names: list[str]) -> list[str]:
    """ModuleDict keys cannot hold dots: 'layer1.0' -> 'layer1_0', made unique if two names collide."""
    keys = []
    for name in names:
        key = re.sub(r"[^0-9A-Za-z_]", "_", name)
        while key in keys:
            key += "_"
        keys.append(key)
    return keys


def default_example_inputs(model: nn.Module, input_size: Sequence[int] | None = None) -> torch.Tensor:
    """A batch of two random images for the probe pass, in the dtype and on the device of the model's weights (a
    float64 or bfloat16 network refuses float32 inputs); channels from a transformers config when there is one."""
    if input_size is None:
        channels = getattr(getattr(model, "config", None), "num_channels", 3)
        input_size = (channels, 32, 32)
    weights = (tensor for tensor in chain(model.parameters(), model.buffers()) if tensor.is_floating_point())
    reference = next(weights, torch.empty(0))
    return torch.randn(2, *input_size, dtype=reference.dtype, device=reference.device)

