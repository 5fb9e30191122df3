"""Finding the sites of a classifier and plugging one shared perturbation function into them.

A *site* is a tensor in the forward pass that the perturbation multiplies (docs/sites.md):

- plain networks (conv → norm → activation, MLPs): the input of every activation;
- residual networks: the tensor right after each block's residual addition (the input of the block's final
  activation when the block ends with one, as in ResNet; the block's output when it does not, as in ConvNeXt or
  pre-activation WRNs). Activations inside blocks and in the stem are not sites.

Sites are found from one probe forward pass, so they work with any module tree (the reference networks,
`transformers` CNNs, torchvision/timm ResNets, MLPs) without knowing its classes; a `PerturbationConfig` says which
of them to take. A perturbation is attached with forward hooks: the wrapped model's module tree and its state-dict
keys stay untouched, and `unwrap()` removes it.
"""

import json
import re
import tempfile
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from itertools import chain, islice
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .classifier_io import eval_mode, logits_of, repeat_chunks
from .classifier_saving import load_classifier, save_classifier
from .hub import local_folder, upload_files
from .loading import load_perturbation
from .modeling_metaperturb import MetaPerturbModel, NonFiniteFeaturesError
from .moment_matching import match_single_pass_statistics
from .perturbation_config import PerturbationConfig

# Modules treated as activations. transformers wraps its own (GELUActivation, ...) in `transformers.activations`.
ACTIVATION_TYPES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish)
# A module with one of these children is a residual block (ours, torchvision, timm, transformers ResNet/RegNet/ConvNeXt).
RESIDUAL_MARKERS = ("shortcut", "downsample", "drop_path")
# Activations inside gating branches (squeeze-excitation, attention) act on pooled vectors, not on features.
GATING_MODULE_PATTERN = re.compile(r"SqueezeExcit|SELayer|SEModule|SEBlock|Attention")

SITES_CONFIG_NAME = "perturbation_sites.json"
SITES_WEIGHTS_NAME = "perturbation_sites.safetensors"
SINGLE_PASS_WEIGHTS_NAME = "single_pass_statistics.safetensors"
# The buffers of a norm layer that the single-pass mode keeps its own copy of.
RUNNING_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
# The blends of statistics from training (0) and re-estimated under the single pass (1) that
# `choose_single_pass_statistics` tries.
SINGLE_PASS_BLEND_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
# The key of the moment-matched statistics among the single pass's candidates (`single_pass_candidates`).
MATCHED = "matched"
# κ counts as the calibrated one within this (its stored copy may have been cast to a lower precision with the model).
NOISE_COEFF_TOLERANCE = 1e-3
PERTURBATION_FOLDER = "perturbation"


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


def _select(sites: list[Site], config: PerturbationConfig) -> list[Site]:
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


def _match_sites(model: nn.Module, example_inputs, candidates: list[Site], sites) -> list[Site]:
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


class SiteStatistics(nn.Module):
    """Running mean and variance of one site's channel statistics; they belong to the target model."""

    def __init__(self, channels: int, num_stat_filters: int):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels, num_stat_filters))
        self.register_buffer("running_var", torch.ones(channels, num_stat_filters))


class _ModuleSitesHook:
    """One hook per (module, position): counts that module's calls once per forward and handles the calls that are sites.

    One counter per module matters when a module holds several sites (a shared ReLU called twice): a hook per site
    would advance the count once per site and call. A class rather than a closure, so wrappers deep-copy and pickle.
    """

    def __init__(self, owner: "SiteWrapper", module_name: str, position: str):
        self.owner, self.slot = owner, (module_name, position)
        self.sites: dict[int, tuple[Site, str]] = {}

    def _site_of_this_call(self):
        counts = self.owner._call_counts
        index = counts.get(self.slot, 0)
        counts[self.slot] = index + 1
        return self.sites.get(index)

    def before(self, module, args):
        hit = self._site_of_this_call()
        if hit is None:
            return None
        return (self.owner._perturb(*hit, args[0]),) + tuple(args[1:])

    def after(self, module, args, output):
        hit = self._site_of_this_call()
        return None if hit is None else self.owner._perturb(*hit, output)


class _ResetCallCounts:
    """Forward pre-hook on the wrapped model's root: a new forward starts counting calls from zero."""

    def __init__(self, owner: "SiteWrapper"):
        self.owner = owner

    def __call__(self, module, args, kwargs=None):
        self.owner._call_counts.clear()


def is_wrapped(model: nn.Module) -> bool:
    """Whether a perturbation or regularizer is attached to `model` (its root carries our reset hook)."""
    return any(isinstance(hook, _ResetCallCounts) for hook in model._forward_pre_hooks.values())


class SiteWrapper(nn.Module):
    """Hooks a classifier at its sites and hands every site tensor to `_perturb`; the tree and keys stay untouched.

    State-dict keys: `model.*` (the wrapped model's, unchanged) plus whatever a subclass registers.
    """

    def __init__(self, model: nn.Module, sites: Sequence[Site]):
        super().__init__()
        self.model = model
        self.sites = list(sites)
        self.site_keys = _unique_keys([site.name for site in self.sites])
        self._call_counts: dict = {}
        self._handles = [model.register_forward_pre_hook(_ResetCallCounts(self))]
        self._unwrapped = False
        modules = dict(model.named_modules())
        hooks: dict[tuple[str, str], _ModuleSitesHook] = {}
        for site, key in zip(self.sites, self.site_keys):
            slot = (site.module_name, site.position)
            if slot not in hooks:
                hooks[slot] = hook = _ModuleSitesHook(self, *slot)
                module = modules[site.module_name]
                register = module.register_forward_pre_hook if site.position == "input" else module.register_forward_hook
                self._handles.append(register(hook.before if site.position == "input" else hook.after))
            hooks[slot].sites[site.call_index] = (site, key)

    def forward(self, *args, **kwargs):
        if self._unwrapped:  # a flag, not the handles: torch.compile cannot trace a list of hook handles
            raise RuntimeError(f"This {type(self).__name__} was unwrapped; use the model that unwrap() returned.")
        return self.model(*args, **kwargs)

    def _perturb(self, site: Site, key: str, hidden_states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def unwrap(self) -> nn.Module:
        """Remove the hooks and return the original model (same keys, same outputs)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._unwrapped = True
        return self.model


def _running_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The norm layers of `model` that normalise with running statistics in evaluation (BatchNorm and the like)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._NormBase)
        and module.track_running_stats
        and module.running_mean is not None
    ]


class SinglePassStatistics(nn.Module):
    """The classifier's norm statistics as re-estimated under the single pass, and the κ they were estimated at.

    Keys: `noise_coeff` and `norms.<norm layer>.{running_mean, running_var, num_batches_tracked}`.
    """

    def __init__(self, norms: list[tuple[str, nn.Module]], noise_coeff: float):
        super().__init__()
        self.register_buffer("noise_coeff", torch.tensor(float(noise_coeff), dtype=torch.float64))
        self.kappa = float(noise_coeff)  # a Python copy: reading the buffer on a GPU would synchronise every forward
        self.register_load_state_dict_post_hook(_remember_kappa)
        self.norms = nn.ModuleDict()
        for key, (_, norm) in zip(_unique_keys([name for name, _ in norms]), norms):
            statistics = nn.Module()
            for name in RUNNING_STATISTICS:
                statistics.register_buffer(name, torch.zeros_like(getattr(norm, name)))
            statistics.running_var.fill_(1.0)  # reset_running_stats' starting point
            self.norms[key] = statistics


def _remember_kappa(store: SinglePassStatistics, incompatible_keys) -> None:
    store.kappa = float(store.noise_coeff)


class PerturbedModel(SiteWrapper):
    r"""
    A classifier whose sites are perturbed by one shared `MetaPerturbModel`.

    The forward takes what the wrapped model takes. State-dict keys: `model.*` (unchanged wrapped keys),
    `perturbation.*` (φ, once) and `site_statistics.<site>.running_{mean,var}`; once the single pass is calibrated,
    also `single_pass_statistics.*`. `perturbation_config` is the `PerturbationConfig` it was placed by (the noise
    mode lives there); `channel_norm` and `spatial_norm` the C_norm and H_norm it uses. Saved and loaded as PEFT
    saves adapters: `save_pretrained`, `from_pretrained` (a folder or a hub repo id), `push_to_hub`.

    Noise modes in evaluation: `"sample"` draws fresh noise as the authors' code does (average several passes with
    `predict_proba`); `"mean"` is a deterministic single pass that replaces the noise z by its expectation
    E_ε[softplus(μ + ε)] (8-node Gauss–Hermite), i.e. the mean multiplicative perturbation, not the average of the
    softmax over samples.

    The classifier's BatchNorm statistics were gathered in training under sampled noise, and the single pass feeds
    its norms other activations. `calibrate_single_pass` re-estimates them under the single pass and keeps them as
    that mode's own: from then on, a forward in "mean" mode (φ in eval, at the calibrated κ) normalises with them,
    and every other forward with the classifier's own statistics, which training and MC use and which stay as they
    were. `choose_single_pass_statistics` then keeps, among blends of them with the statistics from training and the
    statistics matched to the moments of the noise-averaged features (`moment_matching`), the candidate whose single
    pass agrees most often with MC on training images.
    """

    def __init__(
        self,
        model: nn.Module,
        perturbation: MetaPerturbModel,
        sites: list[Site],
        config: PerturbationConfig | None = None,
    ):
        super().__init__(model, sites)
        self.perturbation = perturbation
        # Not `config`: transformers code (Trainer, classifier_io) reads a model's `config` as the classifier's.
        self.perturbation_config = config if config is not None else PerturbationConfig()
        # C_norm and H_norm: the config's, else the largest among the chosen sites (docs/sites.md).
        channel_norm, spatial_norm = self.perturbation_config.channel_norm, self.perturbation_config.spatial_norm
        self.channel_norm = float(max(s.channels for s in self.sites)) if channel_norm is None else channel_norm
        self.spatial_norm = float(max(s.spatial_size for s in self.sites)) if spatial_norm is None else spatial_norm
        self.noise_coeff = 1.0
        num_filters = perturbation.config.num_stat_filters
        self.site_statistics = nn.ModuleDict(
            {key: SiteStatistics(site.channels, num_filters) for key, site in zip(self.site_keys, self.sites)}
        )
        self.single_pass_statistics: SinglePassStatistics | None = None  # set by calibrate_single_pass

    def forward(self, *args, **kwargs):
        if not self._uses_single_pass_statistics():
            return super().forward(*args, **kwargs)
        with self._norm_statistics(self.single_pass_statistics):
            return super().forward(*args, **kwargs)

    def _uses_single_pass_statistics(self) -> bool:
        """Whether this forward is the calibrated single pass: "mean" mode, φ in eval, at the calibrated κ."""
        store = self.single_pass_statistics
        return (
            store is not None
            and self.noise_mode == "mean"
            and not self.perturbation.training
            and abs(self.noise_coeff - store.kappa) < NOISE_COEFF_TOLERANCE
        )

    @contextmanager
    def _norm_statistics(self, store: SinglePassStatistics):
        """Let the classifier's norm layers read and update `store`'s buffers for the duration; then their own again."""
        norms = _running_norms(self.model)
        keys = _unique_keys([name for name, _ in norms])
        if list(store.norms) != keys:
            raise RuntimeError(
                f"The single-pass statistics are for the norm layers {list(store.norms)}, but the classifier now has "
                f"{keys}; calibrate_single_pass again."
            )
        own = [{name: norm._buffers[name] for name in RUNNING_STATISTICS} for _, norm in norms]
        try:
            for key, (_, norm) in zip(keys, norms):
                norm._buffers.update(store.norms[key]._buffers)
            yield
        finally:
            for (_, norm), buffers in zip(norms, own):
                norm._buffers.update(buffers)

    @property
    def single_pass_calibrated(self) -> bool:
        return self.single_pass_statistics is not None

    @torch.no_grad()
    def calibrate_single_pass(self, batches: Iterable, num_batches: int | None = None) -> int:
        r"""
        Re-estimate the classifier's BatchNorm statistics under the single pass ("mean" mode) and keep them as that
        mode's own; returns the number of batches used.

        Run it after training, on training data. As `torch.optim.swa_utils.update_bn`: the statistics start from
        their reset values and average the batches equally (momentum None), the norm layers in training mode and
        everything else, φ included, in eval at the current κ (the statistics are used at that κ only; at κ = 0 the
        single pass is the classifier alone, φ skipped, with statistics estimated without noise). The classifier's
        own statistics (training and MC use them) and φ's site statistics are not changed. Calibrating again
        replaces the previous calibration.

        Args:
            batches: an iterable of normalised image tensors, `(images, labels, ...)` tuples or lists (the first
                element is the input), or dicts of keyword inputs (`"labels"`/`"label"` are left out).
            num_batches: use at most this many batches (default: all; then `batches` must be finite).
        """
        if num_batches is not None and (isinstance(num_batches, bool) or int(num_batches) != num_batches
                                        or num_batches < 1):
            raise ValueError(f"num_batches must be an integer >= 1 or None (all batches), got {num_batches!r}.")
        norms = _running_norms(self.model)
        if not norms:
            raise ValueError(
                f"{type(self.model).__name__} has no BatchNorm layer with running statistics: its single pass uses "
                "no statistics gathered under noise and needs no calibration."
            )
        store = SinglePassStatistics(norms, self.noise_coeff)
        store.to(norms[0][1].running_mean.device)
        momenta = [norm.momentum for _, norm in norms]
        mode, used = self.noise_mode, 0
        try:
            with eval_mode(self), self._norm_statistics(store):
                self.noise_mode = "mean"
                for _, norm in norms:
                    norm.train()
                    norm.momentum = None  # cumulative average over the calibration batches
                for batch in batches:
                    if num_batches is not None and used >= num_batches:
                        break
                    args, kwargs = _model_inputs(batch, norms[0][1].running_mean.device)
                    super().forward(*args, **kwargs)
                    used += 1
        finally:
            self.noise_mode = mode
            for (_, norm), momentum in zip(norms, momenta):
                norm.momentum = momentum
        if used == 0:
            raise ValueError("calibrate_single_pass got no batches: the data loader or iterable is empty.")
        self.single_pass_statistics = store
        return used

    def single_pass_blend(self, weight: float) -> SinglePassStatistics | None:
        """The statistics (1 − weight) · the classifier's own (from training) + weight · the single pass's calibrated
        ones, at the calibration's κ; None for weight 0 (the single pass then normalises with the classifier's own)."""
        calibrated = self.single_pass_statistics
        if calibrated is None:
            raise ValueError("single_pass_blend needs a calibration: call calibrate_single_pass(batches) first.")
        if weight == 0.0:
            return None
        if weight == 1.0:
            return calibrated
        norms = _running_norms(self.model)
        blend = SinglePassStatistics(norms, calibrated.kappa).to(calibrated.noise_coeff.device)
        for (_, norm), own, mixed in zip(norms, calibrated.norms.values(), blend.norms.values(), strict=True):
            for name in ("running_mean", "running_var"):
                getattr(mixed, name).copy_(torch.lerp(getattr(norm, name), getattr(own, name), weight))
            mixed.num_batches_tracked.copy_(own.num_batches_tracked)
        return blend

    def single_pass_candidates(self, batches: Iterable, num_samples: int = 10, num_batches: int | None = None,
                               weights: Sequence[float] = SINGLE_PASS_BLEND_WEIGHTS,
                               match_moments: bool = True) -> dict:
        """The statistics `choose_single_pass_statistics` chooses among: the blend `single_pass_blend(a)` for every a
        in `weights` (keyed by a) and, with `match_moments`, those of `match_single_pass_statistics` on `batches`
        (keyed "matched"). Call it after `calibrate_single_pass`."""
        if self.single_pass_statistics is None:
            raise ValueError("The single pass's candidate statistics start from a calibration: call "
                             "calibrate_single_pass(batches) first.")
        weights = sorted({float(a) for a in weights}, reverse=True)
        if not weights or not all(0.0 <= a <= 1.0 for a in weights):
            raise ValueError(f"weights must be blend weights in [0, 1], at least one, got {weights!r}.")
        candidates = {}
        if match_moments:
            candidates[MATCHED] = match_single_pass_statistics(self, batches, num_samples, num_batches)
        return candidates | {a: self.single_pass_blend(a) for a in weights}

    @torch.no_grad()
    def choose_single_pass_statistics(self, batches: Iterable, num_samples: int = 10, num_batches: int | None = None,
                                      weights: Sequence[float] = SINGLE_PASS_BLEND_WEIGHTS, match_moments: bool = True,
                                      candidates: dict | None = None) -> dict:
        r"""
        Give the single pass the candidate statistics (`single_pass_candidates`) whose single pass agrees most often
        with the model's own Monte-Carlo prediction (top-1 class of the softmax averaged over `num_samples` draws)
        on `batches`: the blends `(1 − a) · from training + a · calibrated` (running mean and variance of every norm
        layer) for a in `weights`, and with `match_moments` the statistics matched to the moments of the
        noise-averaged features ("matched", `moment_matching`). a = 1 keeps the calibration, a = 0 drops it (the
        single pass then normalises with the classifier's own statistics); ties go to "matched", then to the larger a.

        Why candidates: the statistics from training hold the variance that the noise added, which the single pass
        lacks; re-estimated under it they restore the feature scale in a plain chain (Conv4), but in a residual
        network they also rescale every branch against the identity path, which they leave unchanged. The matched
        statistics aim at what MC averages; agreement with MC on training images, which needs neither labels nor
        test data, picks among them. Call it after `calibrate_single_pass`, on training batches (the kinds of batches
        that takes; at most `num_batches` of them, held in memory), or pass the `candidates` already made from them.
        A candidate with which the single pass gives NaN or Inf (a network whose features the expected noise
        blows up) is not chosen and its agreement is None; `NonFiniteFeaturesError` when that leaves none.
        Returns the agreement (fraction of images) of every candidate and the chosen one's key (`weight`).
        """
        if self.single_pass_statistics is None:
            raise ValueError("choose_single_pass_statistics chooses among statistics that start from a calibration: "
                             "call calibrate_single_pass(batches) first.")
        if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 2:
            raise ValueError(f"num_samples must be an integer >= 2 (the MC draws to agree with), got {num_samples!r}.")
        batches = list(islice(batches, num_batches))
        if not batches:
            raise ValueError("choose_single_pass_statistics got no batches: the data loader or iterable is empty.")
        if candidates is None:
            candidates = self.single_pass_candidates(batches, num_samples, None, weights, match_moments)
        calibrated, mode = self.single_pass_statistics, self.noise_mode
        device = next(iter(calibrated.buffers())).device
        agreements, images = dict.fromkeys(candidates, 0), 0
        try:
            with eval_mode(self):
                for batch in batches:
                    args, kwargs = _model_inputs(batch, device)
                    self.noise_mode = "sample"
                    reference = self.predict_proba(*args, num_samples=num_samples, **kwargs).argmax(-1)
                    self.noise_mode = "mean"
                    for key, statistics in candidates.items():
                        if agreements[key] is None:
                            continue
                        self.single_pass_statistics = statistics
                        prediction = self._finite_prediction(args, kwargs)
                        agreements[key] = None if prediction is None else (
                            agreements[key] + (prediction.argmax(-1) == reference).sum().item())
                    images += len(reference)
        finally:
            self.noise_mode, self.single_pass_statistics = mode, calibrated
        usable = [key for key in candidates if agreements[key] is not None]
        if not usable:
            raise NonFiniteFeaturesError(
                "Every candidate statistics gives the single pass NaN or Inf features: the expected noise breaks this "
                "network whatever its normalisation. Predict with noise samples instead (set_noise_mode('sample'))."
            )
        chosen = max(usable, key=lambda key: agreements[key])  # the first maximum: "matched", then larger a
        self.single_pass_statistics = candidates[chosen]
        return {"agreements": {key: None if count is None else count / images for key, count in agreements.items()},
                "weight": chosen}

    def _finite_prediction(self, args, kwargs) -> torch.Tensor | None:
        """The single pass's probabilities, or None where its features or its output are NaN or Inf."""
        try:
            probabilities = self.predict_proba(*args, **kwargs)
        except NonFiniteFeaturesError:
            return None
        return probabilities if torch.isfinite(probabilities).all() else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A state dict with single-pass statistics gives an uncalibrated model a place to load them into."""
        if self.single_pass_statistics is None and any(
            key.startswith(prefix + "single_pass_statistics.") for key in state_dict
        ):
            self.single_pass_statistics = SinglePassStatistics(_running_norms(self.model), self.noise_coeff)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _perturb(self, site: Site, key: str, hidden_states: torch.Tensor) -> torch.Tensor:
        stats = self.site_statistics[key]
        phi = self.perturbation
        if self.noise_coeff == 0.0 and not phi.training:  # the identity; in training φ still updates its statistics
            return hidden_states
        try:
            return phi(
                hidden_states,
                stats.running_mean,
                stats.running_var,
                self.channel_norm,
                self.spatial_norm,
                noise_coeff=self.noise_coeff,
                clip_value=phi.config.clip_value if phi.training else None,
                expected_noise=self.noise_mode == "mean" and not phi.training,
            )
        except (ValueError, TypeError) as error:
            raise type(error)(f"At perturbation site '{site.name}' ({site.channels} channels): {error}") from error

    def set_noise_coeff(self, noise_coeff: float) -> None:
        """Set κ: 0 switches the perturbation off, 1 applies it fully (annealed from 0 to 1 in transfer)."""
        if not 0.0 <= float(noise_coeff) <= 1.0:
            raise ValueError(f"noise_coeff must lie in [0, 1], got {noise_coeff}.")
        self.noise_coeff = float(noise_coeff)

    @property
    def noise_mode(self) -> str:
        """Evaluation noise: "sample" (as the authors) or "mean" (deterministic single pass); kept in the config."""
        return self.perturbation_config.noise_mode

    @noise_mode.setter
    def noise_mode(self, mode: str) -> None:
        self.perturbation_config = replace(self.perturbation_config, noise_mode=mode)  # validated there

    def set_noise_mode(self, mode: str) -> None:
        """Evaluation noise: "sample" (as the authors) or "mean" (deterministic single pass)."""
        self.noise_mode = mode

    @torch.no_grad()
    def predict_proba(self, *args, num_samples: int = 1, **kwargs) -> torch.Tensor:
        """Softmax averaged over `num_samples` noise draws (one pass in "mean" mode), in the current train/eval mode.

        The draws run as copies of the inputs stacked along the batch dimension (`classifier_io.repeat_chunks`):
        every tensor argument whose first dimension is the batch is repeated.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}.")
        passes = 1 if self.noise_mode == "mean" and not self.perturbation.training else num_samples
        tensors = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor) and value.dim()]
        batch = len(tensors[0]) if tensors else 1

        def stacked(value, copies):
            if isinstance(value, torch.Tensor) and value.dim() and len(value) == batch and copies > 1:
                return value.repeat(copies, *([1] * (value.dim() - 1)))
            return value

        total = 0.0
        for copies in repeat_chunks(batch, passes):
            output = self(*(stacked(a, copies) for a in args), **{k: stacked(v, copies) for k, v in kwargs.items()})
            total = total + logits_of(output).float().softmax(dim=-1).view(copies, batch, -1).sum(0)
        return total / passes

    def save_pretrained(self, save_directory: str | Path) -> None:
        """
        Save everything `from_pretrained` needs: the classifier (`classifier_saving`: a `transformers` model
        through its own `save_pretrained`, any other module as a safetensors state dict), φ in `perturbation/`, the
        config (`perturbation_config.json`, the noise mode included), the sites, their statistics and, once
        calibrated, the single pass's statistics.
        """
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_classifier(self.model, directory)
        self.perturbation.save_pretrained(directory / PERTURBATION_FOLDER)
        self.perturbation_config.save_pretrained(directory)
        (directory / SITES_CONFIG_NAME).write_text(json.dumps({"sites": [asdict(site) for site in self.sites]},
                                                              indent=2))
        save_file({name: tensor.contiguous() for name, tensor in self.site_statistics.state_dict().items()},
                  directory / SITES_WEIGHTS_NAME)
        single_pass_file = directory / SINGLE_PASS_WEIGHTS_NAME
        if self.single_pass_statistics is not None:
            save_file({name: tensor.contiguous() for name, tensor in self.single_pass_statistics.state_dict().items()},
                      single_pass_file)
        elif single_pass_file.exists():  # an earlier, calibrated save into the same folder
            single_pass_file.unlink()

    def push_to_hub(self, repo_id: str, *, private: bool = False, token: str | None = None,
                    commit_message: str = "Upload classifier trained with MetaPerturb") -> str:
        """Upload what `save_pretrained` writes to `repo_id` in one commit (the repo is created if needed); returns
        the repo's URL. A failure raises `hub.HubError` naming the step."""
        with tempfile.TemporaryDirectory() as directory:
            self.save_pretrained(directory)
            root = Path(directory)
            files = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
            return upload_files(files, repo_id, f"the perturbed {type(self.model).__name__}", commit_message,
                                private, token)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path, model: nn.Module | None = None, *,
                        revision: str | None = None, token: str | None = None) -> "PerturbedModel":
        """
        Load what `save_pretrained` wrote, from a local folder or a hub repo id (`revision`, `token` for the hub).

        `model`: the classifier to load the saved classifier weights into. Not needed for a `transformers` model
        (built by `AutoModelForImageClassification`) or a reference network (`create_model`); needed for any other
        module, as `PeftModel.from_pretrained` needs the base model. It comes back in eval mode (as from
        transformers' `from_pretrained`), φ frozen.
        """
        directory = local_folder(path_or_repo_id, revision, token)
        layout_file = directory / SITES_CONFIG_NAME
        if not layout_file.is_file():
            raise FileNotFoundError(f"{layout_file} not found: {directory} was not written by PerturbedModel.save_pretrained.")
        if model is not None:
            _refuse_wrapped(model)
        config = PerturbationConfig.from_pretrained(directory)
        classifier = load_classifier(directory, model)
        perturbation = load_perturbation(directory / PERTURBATION_FOLDER).requires_grad_(False)
        sites = [Site(**site) for site in json.loads(layout_file.read_text())["sites"]]
        perturbed = cls(classifier, perturbation, sites, config)
        perturbed.site_statistics.load_state_dict(load_file(directory / SITES_WEIGHTS_NAME))
        single_pass_file = directory / SINGLE_PASS_WEIGHTS_NAME
        if single_pass_file.is_file():
            state = load_file(single_pass_file)
            store = SinglePassStatistics(_running_norms(classifier), float(state["noise_coeff"]))
            store.load_state_dict(state)
            perturbed.single_pass_statistics = store
        return perturbed.eval()


def _model_inputs(batch, device) -> tuple[tuple, dict]:
    """Positional and keyword inputs for one calibration batch, on `device`."""
    if isinstance(batch, dict):
        return (), {k: _to(v, device) for k, v in batch.items() if k not in ("labels", "label")}
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("A calibration batch is an empty tuple or list; expected (images, labels, ...).")
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(
            f"A calibration batch must be an image tensor, an (images, labels, ...) tuple or a dict of model inputs, "
            f"got {type(batch).__name__}."
        )
    return (_to(batch, device),), {}


def _to(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _unique_keys(names: list[str]) -> list[str]:
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


def _refuse_wrapped(model: nn.Module) -> None:
    if is_wrapped(model):
        raise ValueError(
            f"This {type(model).__name__} already carries a perturbation or regularizer; call unwrap() on it first."
        )


def resolve_sites(
    model: nn.Module,
    config: PerturbationConfig,
    *,
    example_inputs=None,
    input_size: Sequence[int] | None = None,
) -> list[Site]:
    """The sites a wrapper attaches to by `config`: detected, matched by name or pattern, then selected."""
    _refuse_wrapped(model)
    if example_inputs is None:
        example_inputs = default_example_inputs(model, input_size)
    detected = find_sites(model, example_inputs)
    if config.sites == "auto":
        if not detected:
            raise ValueError(
                f"No perturbation site found in {type(model).__name__}: it has no activation modules (nn.ReLU, ...) "
                "and no residual blocks. Pass sites=[...] with the names of modules whose outputs to perturb."
            )
        chosen = detected
    else:
        chosen = _match_sites(model, example_inputs, detected, config.sites)
        if not chosen:
            raise ValueError(f"sites={config.sites!r} matched no site or module of {type(model).__name__}.")
    return _select(chosen, config)


def add_perturbation(
    model: nn.Module,
    perturbation: MetaPerturbModel,
    config: PerturbationConfig | None = None,
    *,
    example_inputs=None,
    input_size: Sequence[int] | None = None,
    trainable: bool = False,
    **config_fields,
) -> PerturbedModel:
    r"""
    Plug `perturbation` into `model` and return the wrapped model (as PEFT's `get_peft_model`).

    Args:
        model: any classifier (reference network, `transformers` CNN, torchvision/timm ResNet, MLP).
        perturbation: the shared φ. It is frozen unless `trainable=True` (meta-training).
        config: where φ goes and how it runs (`PerturbationConfig`: sites, select, num_sites, channel_norm,
            spatial_norm, noise_mode); or give those fields as keywords instead, e.g. `select="top", num_sites=2`.
            Giving both is refused.
        example_inputs: what to call the model with for the probe pass (a tensor, or a dict of keyword inputs);
            defaults to a random batch of `input_size` (C, H, W), 3×32×32 unless the model's config says otherwise.
    """
    if not isinstance(perturbation, nn.Module) or getattr(getattr(perturbation, "config", None), "model_type", None) != "metaperturb":
        raise TypeError(f"perturbation must be a MetaPerturbModel, got {type(perturbation).__name__}.")
    config = PerturbationConfig.build(config, **config_fields)
    chosen = resolve_sites(model, config, example_inputs=example_inputs, input_size=input_size)
    perturbation.requires_grad_(trainable)
    return PerturbedModel(model, perturbation, chosen, config)
