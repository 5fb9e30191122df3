"""Plugging one shared perturbation function φ into a classifier's sites (as PEFT's `get_peft_model` plugs in an
adapter): `add_perturbation` and the `PerturbedModel` it returns, which trains, predicts (MC or a single pass),
saves and loads like a PEFT model. Where φ goes is `sites`; how it is attached, `site_wrapper`.
"""

import json
import logging
import tempfile
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, replace
from itertools import islice
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .classifier_io import eval_mode, logits_of, model_inputs, repeat_chunks
from .classifier_saving import load_classifier, save_classifier
from .hub import local_folder, upload_files
from .loading import load_perturbation
from .modeling_metaperturb import MetaPerturbModel, NonFiniteFeaturesError
from .moment_matching import match_single_pass_statistics
from .perturbation_config import PerturbationConfig
from .single_pass_fitting import fit_single_pass_statistics
from .single_pass_statistics import RUNNING_STATISTICS, SinglePassStatistics, running_norms
from .site_wrapper import SiteWrapper, refuse_wrapped, resolve_sites
from .sites import Site, unique_keys

SITES_CONFIG_NAME = "perturbation_sites.json"
SITES_WEIGHTS_NAME = "perturbation_sites.safetensors"
SINGLE_PASS_WEIGHTS_NAME = "single_pass_statistics.safetensors"
# The blends of statistics from training (0) and re-estimated under the single pass (1) that
# `choose_single_pass_statistics` tries.
SINGLE_PASS_BLEND_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
# The keys of the moment-matched statistics and of those fitted to MC among the single pass's candidates
# (`single_pass_candidates`).
MATCHED = "matched"
FITTED = "fitted"
# κ counts as the calibrated one within this (its stored copy may have been cast to a lower precision with the model).
NOISE_COEFF_TOLERANCE = 1e-3
PERTURBATION_FOLDER = "perturbation"

logger = logging.getLogger(__name__)


class SiteStatistics(nn.Module):
    """Running mean and variance of one site's channel statistics; they belong to the target model."""

    def __init__(self, channels: int, num_stat_filters: int):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels, num_stat_filters))
        self.register_buffer("running_var", torch.ones(channels, num_stat_filters))


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
    were. `choose_single_pass_statistics` then keeps, among blends of them with the statistics from training, the
    statistics matched to the moments of the noise-averaged features (`moment_matching`) and those fitted to MC's
    softmax (`single_pass_fitting`), the candidate whose single pass agrees most often with MC on training images
    (augmented ones: `methods.evaluate_single_pass`).
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
        """Let the classifier's norm layers read and update `store`'s buffers for the duration; then their own
        again."""
        norms = running_norms(self.model)
        keys = unique_keys([name for name, _ in norms])
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
        norms = running_norms(self.model)
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
                    args, kwargs = model_inputs(batch, norms[0][1].running_mean.device)
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
        """The statistics (1 − weight) · the classifier's own (from training) + weight · the single pass's
        calibrated ones, at the calibration's κ; None for weight 0 (the single pass then normalises with the
        classifier's own)."""
        calibrated = self.single_pass_statistics
        if calibrated is None:
            raise ValueError("single_pass_blend needs a calibration: call calibrate_single_pass(batches) first.")
        if weight == 0.0:
            return None
        if weight == 1.0:
            return calibrated
        norms = running_norms(self.model)
        blend = SinglePassStatistics(norms, calibrated.kappa).to(calibrated.noise_coeff.device)
        for (_, norm), own, mixed in zip(norms, calibrated.norms.values(), blend.norms.values(), strict=True):
            for name in ("running_mean", "running_var"):
                getattr(mixed, name).copy_(torch.lerp(getattr(norm, name), getattr(own, name), weight))
            mixed.num_batches_tracked.copy_(own.num_batches_tracked)
        return blend

    def single_pass_candidates(self, batches: Iterable, num_samples: int = 10, num_batches: int | None = None,
                               weights: Sequence[float] = SINGLE_PASS_BLEND_WEIGHTS,
                               match_moments: bool = True, fit_batches: Iterable | None = None) -> dict:
        """The statistics `choose_single_pass_statistics` chooses among: the blend `single_pass_blend(a)` for every a
        in `weights` (keyed by a), with `match_moments` those of `match_single_pass_statistics` on `batches` (keyed
        "matched") and, given `fit_batches` (e.g. augmented training batches), those of `fit_single_pass_statistics`
        on them, started from the matched statistics where there are any (keyed "fitted"; left out, with a warning,
        where the single pass overflows). Call it after `calibrate_single_pass`."""
        if self.single_pass_statistics is None:
            raise ValueError("The single pass's candidate statistics start from a calibration: call "
                             "calibrate_single_pass(batches) first.")
        weights = sorted({float(a) for a in weights}, reverse=True)
        if not weights or not all(0.0 <= a <= 1.0 for a in weights):
            raise ValueError(f"weights must be blend weights in [0, 1], at least one, got {weights!r}.")
        candidates = {}
        if match_moments:
            candidates[MATCHED] = match_single_pass_statistics(self, batches, num_samples, num_batches)
        if fit_batches is not None:
            try:
                candidates[FITTED] = fit_single_pass_statistics(self, fit_batches, candidates.get(MATCHED),
                                                                num_samples)
            except NonFiniteFeaturesError as error:
                logger.warning("No fitted single-pass statistics: %s", error)
        return candidates | {a: self.single_pass_blend(a) for a in weights}

    @torch.no_grad()
    def choose_single_pass_statistics(self, batches: Iterable, num_samples: int = 10, num_batches: int | None = None,
                                      weights: Sequence[float] = SINGLE_PASS_BLEND_WEIGHTS, match_moments: bool = True,
                                      fit_batches: Iterable | None = None, candidates: dict | None = None) -> dict:
        r"""
        Give the single pass the candidate statistics (`single_pass_candidates`) whose single pass agrees most often
        with the model's own Monte-Carlo prediction (top-1 class of the softmax averaged over `num_samples` draws)
        on `batches`: the blends `(1 − a) · from training + a · calibrated` (running mean and variance of every
        norm layer) for a in `weights`, and with `match_moments` the statistics matched to the moments of the
        noise-averaged features ("matched", `moment_matching`), and given `fit_batches` those fitted to MC on them
        ("fitted", `single_pass_fitting`). a = 1 keeps the calibration, a = 0 drops it (the single pass then
        normalises with the classifier's own statistics). Among candidates that agree equally often, the one whose
        softmax is closest to MC's (the lowest cross-entropy to it on the same batches) is kept; then "matched",
        "fitted", the larger a.

        Why candidates: the statistics from training hold the variance that the noise added, which the single pass
        lacks; re-estimated under it they restore the feature scale in a plain chain (Conv4), but in a residual
        network they also rescale every branch against the identity path, which they leave unchanged. The matched
        statistics aim at what MC averages, the fitted ones at what it predicts; agreement with MC on training
        images, which needs neither labels nor test data, picks among them. Call it after `calibrate_single_pass`, on
        training batches (the kinds of batches that takes; at most `num_batches` of them, held in memory), augmented
        ones for preference: on plain images that the network has memorised every good candidate agrees with MC on
        all of them. `candidates` already made may be passed.
        A candidate with which the single pass gives NaN or Inf (a network whose features the expected noise
        blows up) is not chosen and its agreement is None; `NonFiniteFeaturesError` when that leaves none.
        Returns the agreement (fraction of images) and the cross-entropy to MC (per image) of every candidate and the
        chosen one's key (`weight`).
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
            candidates = self.single_pass_candidates(batches, num_samples, None, weights, match_moments, fit_batches)
        calibrated, mode = self.single_pass_statistics, self.noise_mode
        device = next(iter(calibrated.buffers())).device
        agreements, cross_entropies, images = dict.fromkeys(candidates, 0), dict.fromkeys(candidates, 0.0), 0
        try:
            with eval_mode(self):
                for batch in batches:
                    args, kwargs = model_inputs(batch, device)
                    self.noise_mode = "sample"
                    reference = self.predict_proba(*args, num_samples=num_samples, **kwargs)
                    self.noise_mode = "mean"
                    for key, statistics in candidates.items():
                        if agreements[key] is None:
                            continue
                        self.single_pass_statistics = statistics
                        prediction = self._finite_prediction(args, kwargs)
                        if prediction is None:
                            agreements[key] = cross_entropies[key] = None
                            continue
                        agreements[key] += (prediction.argmax(-1) == reference.argmax(-1)).sum().item()
                        cross_entropies[key] -= (reference * prediction.clamp_min(1e-12).log()).sum().item()
                    images += len(reference)
        finally:
            self.noise_mode, self.single_pass_statistics = mode, calibrated
        usable = [key for key in candidates if agreements[key] is not None]
        if not usable:
            raise NonFiniteFeaturesError(
                "Every candidate statistics gives the single pass NaN or Inf features: the expected noise breaks this "
                "network whatever its normalisation. Predict with noise samples instead (set_noise_mode('sample'))."
            )
        # The most agreement; among equals the softmax closest to MC's; then the first: "matched", "fitted", larger a.
        chosen = max(usable, key=lambda key: (agreements[key], -cross_entropies[key]))
        self.single_pass_statistics = candidates[chosen]
        return {"agreements": {key: None if count is None else count / images for key, count in agreements.items()},
                "cross_entropies": {key: None if total is None else total / images
                                    for key, total in cross_entropies.items()},
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
            self.single_pass_statistics = SinglePassStatistics(running_norms(self.model), self.noise_coeff)
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
            raise FileNotFoundError(f"{layout_file} not found: {directory} was not written by "
                                    "PerturbedModel.save_pretrained.")
        if model is not None:
            refuse_wrapped(model)
        config = PerturbationConfig.from_pretrained(directory)
        classifier = load_classifier(directory, model)
        perturbation = load_perturbation(directory / PERTURBATION_FOLDER).requires_grad_(False)
        sites = [Site(**site) for site in json.loads(layout_file.read_text())["sites"]]
        perturbed = cls(classifier, perturbation, sites, config)
        perturbed.site_statistics.load_state_dict(load_file(directory / SITES_WEIGHTS_NAME))
        single_pass_file = directory / SINGLE_PASS_WEIGHTS_NAME
        if single_pass_file.is_file():
            state = load_file(single_pass_file)
            store = SinglePassStatistics(running_norms(classifier), float(state["noise_coeff"]))
            store.load_state_dict(state)
            perturbed.single_pass_statistics = store
        return perturbed.eval()


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
    if (not isinstance(perturbation, nn.Module)
            or getattr(getattr(perturbation, "config", None), "model_type", None) != "metaperturb"):
        raise TypeError(f"perturbation must be a MetaPerturbModel, got {type(perturbation).__name__}.")
    config = PerturbationConfig.build(config, **config_fields)
    chosen = resolve_sites(model, config, example_inputs=example_inputs, input_size=input_size)
    perturbation.requires_grad_(trainable)
    return PerturbedModel(model, perturbation, chosen, config)
