"""One transfer experiment, by method name: build the classifier, regularize it, train it, evaluate it.

The transfer script, the benchmark grid and the quick start all go through `run_transfer`, so a number in any table
comes from the same code path.
"""

import logging
import os
from pathlib import Path

import torch
from torch import nn

from .architectures import create_model
from .data import BatchSampler, ImageTensors
from .evaluation import evaluate, normalized_batches
from .injection import FITTED, MATCHED, SINGLE_PASS_BLEND_WEIGHTS, PerturbedModel, add_perturbation
from .modeling_metaperturb import MetaPerturbModel, NonFiniteFeaturesError
from .regularizers import REGULARIZERS, add_regularizer
from .single_pass_fitting import FIT_STEPS
from .site_wrapper import SiteWrapper
from .transfer import TransferConfig, train_classifier

logger = logging.getLogger(__name__)

METHODS = ("none", "metaperturb", *REGULARIZERS, "finetune")
# Training batches the single pass's BatchNorm statistics are re-estimated on after training (all, when fewer).
CALIBRATION_BATCHES = 50
# Augmented training batches, drawn with the run's seed + CHOICE_SEED_OFFSET (not the fit's), on which the single
# pass's candidates are compared with MC: a classifier fits them less closely than its plain training images, and on
# saved runs they chose better on two of 12 and never worse (benchmarks/single_pass_choice.py).
CHOICE_BATCHES = 20
CHOICE_SEED_OFFSET = 1000


def save_state_dict(model: nn.Module, path: str | Path) -> None:
    """torch.save under a temporary name, then rename: a killed run never leaves a truncated file at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(model.state_dict(), partial)
    os.replace(partial, path)


def build_classifier(arch: str, num_classes: int, image_size: int, seed: int,
                     init_from: str | None = None) -> nn.Module:
    """A freshly initialised reference network, or one whose body starts from a source-trained state dict.

    The network is put in channels-last memory format: on CPU its convolutions and φ's depthwise stencils are faster
    in it, and φ needs no layout conversions (same math, same results up to float rounding).
    """
    torch.manual_seed(seed)
    model = create_model(arch, num_classes, image_size=image_size)
    if init_from:
        state = torch.load(init_from, map_location="cpu", weights_only=True)
        if any(key.startswith("perturbation.") for key in state):  # a saved MetaPerturb run: its classifier's keys
            state = {key[len("model."):]: value for key, value in state.items() if key.startswith("model.")}
        own = model.state_dict()
        body = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}  # the head is re-learned
        if len(body) < len(own) // 2:
            raise ValueError(f"{init_from} does not fit {arch}: only {len(body)} of {len(own)} tensors match.")
        model.load_state_dict(body, strict=False)
    return model.to(memory_format=torch.channels_last)


def apply_method(model: nn.Module, method: str, image_size: int, perturbation: MetaPerturbModel | None = None,
                 placement: dict | None = None) -> nn.Module:
    """Wrap `model` for `method`; "none" and "finetune" train it as it is. `placement` (PerturbationConfig's `select`
    and `num_sites`, e.g. {"select": "top", "num_sites": 6}) says which sites MetaPerturb takes; all by default."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose from {', '.join(METHODS)}.")
    if method == "metaperturb":
        if perturbation is None:
            raise ValueError("method 'metaperturb' needs a perturbation function (--perturbation PATH_OR_REPO).")
        return add_perturbation(model, perturbation, input_size=(3, image_size, image_size), **(placement or {}))
    if method in REGULARIZERS:
        return add_regularizer(model, method, input_size=(3, image_size, image_size))
    return model


def evaluate_single_pass(model: PerturbedModel, train: ImageTensors, test: ImageTensors, batch_size: int,
                         mc_samples: int = 10, seed: int = 0) -> dict:
    """`evaluate` of the single pass with the statistics `choose_single_pass_statistics` gives it, and every other
    candidate's accuracy beside it.

    The single pass is calibrated on unaugmented training batches; its candidate statistics are the blends with the
    statistics from training, those matched to the moments of the noise-averaged features ("matched") and those
    fitted to MC on augmented training batches drawn with `seed` ("fitted", `single_pass_fitting`); the one
    (`single_pass_weight`) whose single pass agrees most often with MC-`mc_samples` on `CHOICE_BATCHES` augmented
    training batches drawn with `seed + CHOICE_SEED_OFFSET` (`agreement_by_weight`), and among equals whose softmax is
    closest to MC's (`cross_entropy_by_weight`), is kept.
    `accuracy_by_weight` is the test accuracy of every candidate, so that `uncalibrated_accuracy` (weight 0),
    `calibrated_accuracy` (weight 1), `matched_accuracy` and `fitted_accuracy` are four of them.
    `noise_off_calibrated_accuracy`: the classifier alone (κ = 0, the cost of a plain forward) with statistics
    calibrated at κ = 0. A candidate with which the single pass gives NaN or Inf has accuracy None. Where the
    calibration itself overflows (a φ whose expected noise makes residual features grow from block to block; unlike
    training, the calibration has no clamp), the statistics from training are the only candidate and
    `calibration_batches` is 0. The model is left in "mean" mode with the chosen statistics, at the κ it came with.
    """
    model.set_noise_mode("mean")
    kappa = model.noise_coeff
    model.set_noise_coeff(0.0)
    model.calibrate_single_pass(normalized_batches(train, batch_size), CALIBRATION_BATCHES)
    noise_off = evaluate(model, test)["accuracy"]
    model.set_noise_coeff(kappa)
    candidates, used = make_single_pass_candidates(model, train, batch_size, mc_samples, seed)
    by_candidate = evaluate_candidates(model, candidates, test)
    choice = model.choose_single_pass_statistics(choice_batches(train, batch_size, seed), max(2, mc_samples),
                                                 candidates=candidates)
    accuracy = {key: record["accuracy"] for key, record in by_candidate.items()}
    return {**by_candidate[choice["weight"]], "single_pass_weight": choice["weight"],
            "agreement_by_weight": {str(key): value for key, value in choice["agreements"].items()},
            "cross_entropy_by_weight": {str(key): value for key, value in choice["cross_entropies"].items()},
            "accuracy_by_weight": {str(key): value for key, value in accuracy.items()},
            "uncalibrated_accuracy": accuracy[0.0], "calibrated_accuracy": accuracy.get(1.0),
            "matched_accuracy": accuracy.get(MATCHED), "fitted_accuracy": accuracy.get(FITTED),
            "noise_off_calibrated_accuracy": noise_off,
            "calibration_batches": used}


def make_single_pass_candidates(model: PerturbedModel, train: ImageTensors, batch_size: int, mc_samples: int = 10,
                                seed: int = 0) -> tuple[dict, int]:
    """Calibrate the single pass at the model's κ and make the candidates `evaluate_single_pass` chooses among:
    (candidates, calibration batches used). Where the calibration overflows, the statistics from training are the
    only candidate and 0 batches were used."""
    try:
        used = model.calibrate_single_pass(normalized_batches(train, batch_size), CALIBRATION_BATCHES)
        weights, match_moments = SINGLE_PASS_BLEND_WEIGHTS, True
        augmented = BatchSampler(train, seed=seed)
        fit_batches = (augmented.next_batch(batch_size)[0] for _ in range(FIT_STEPS))
    except NonFiniteFeaturesError as error:  # no calibrated, matched or fitted statistics; those from training remain
        logger.warning("The single pass keeps the statistics from training, its calibration overflowed: %s", error)
        used, weights, match_moments, fit_batches = 0, (0.0,), False, None
    candidates = model.single_pass_candidates(normalized_batches(train, batch_size), max(2, mc_samples),
                                              CALIBRATION_BATCHES, weights, match_moments, fit_batches)
    return candidates, used


def evaluate_candidates(model: PerturbedModel, candidates: dict, test: ImageTensors) -> dict:
    """`evaluate` of the single pass with each candidate statistics ({"accuracy": None} where they break it); the
    model's own single-pass statistics are left as they were."""
    calibrated, records = model.single_pass_statistics, {}
    for key, statistics in candidates.items():
        model.single_pass_statistics = statistics
        try:
            records[key] = evaluate(model, test)
        except NonFiniteFeaturesError:
            # these statistics break the single pass; choose_single_pass_statistics skips them
            records[key] = {"accuracy": None}
        model.single_pass_statistics = calibrated
    return records


def choice_batches(train: ImageTensors, batch_size: int, seed: int = 0) -> list:
    """The augmented training batches on which `evaluate_single_pass` compares its candidates with MC."""
    held_out = BatchSampler(train, seed=seed + CHOICE_SEED_OFFSET)
    return [held_out.next_batch(batch_size) for _ in range(CHOICE_BATCHES)]


def run_transfer(
    method: str,
    arch: str,
    train: ImageTensors,
    test: ImageTensors,
    config: TransferConfig,
    perturbation: MetaPerturbModel | None = None,
    mc_samples: int = 10,
    init_from: str | None = None,
    progress: bool = False,
    save_model: str | None = None,
    placement: dict | None = None,
    device: str | torch.device | None = None,
) -> list[dict]:
    """Train one (method, arch, seed) run and return its evaluation records (two for MetaPerturb: MC and single pass,
    or MC alone, with a warning, where every single-pass candidate gives NaN or Inf).

    MetaPerturb's single pass uses the statistics `evaluate_single_pass` chooses (calibrated or from training); its
    record also holds the accuracy with each and that of the classifier alone calibrated without noise.
    `save_model` writes the trained network's state dict there (atomically), e.g. a source network for the
    "finetune" baseline; for MetaPerturb the whole `PerturbedModel.state_dict()` (φ, site and single-pass
    statistics included), which `add_perturbation` + `load_state_dict` restore and `init_from` also accepts.
    `placement` chooses MetaPerturb's sites (`apply_method`). `device` is where it trains and is evaluated (default:
    the CPU); records of a run elsewhere name it.
    """
    image_size = train.images.shape[-1]
    if method == "finetune" and not init_from:
        raise ValueError("method 'finetune' needs the source-trained network to start from (--init-from STATE_DICT).")
    model = build_classifier(arch, len(train.class_names), image_size, config.seed, init_from)
    model = apply_method(model, method, image_size, perturbation, placement)
    result = train_classifier(model, train, config, device=device, progress=progress)
    base = {"method": method, "arch": arch, "seed": config.seed, "steps": config.steps,
            "train_images": len(train), "train_seconds": round(result["train_seconds"], 1)}
    if method == "metaperturb" and result["noise_strength"] != 1.0:  # runs at full strength recorded as before
        base["noise_strength"] = result["noise_strength"]
    if device is not None and torch.device(device).type != "cpu":
        base["device"] = str(device)
    records = [{**base, **evaluate(model, test, num_samples=mc_samples if method == "metaperturb" else 1)}]
    if method == "metaperturb":
        try:
            single_pass = evaluate_single_pass(model, train, test, config.batch_size, mc_samples, config.seed)
        except NonFiniteFeaturesError as error:  # the MC record stands; only the single pass is unusable
            logger.warning("No single-pass record for this run: %s", error)
        else:
            records.append({**base, "method": "metaperturb_single_pass", **single_pass})
    if save_model:  # a MetaPerturb run whole; a regularized network without its wrapper
        unwrapped = isinstance(model, SiteWrapper) and not isinstance(model, PerturbedModel)
        save_state_dict(model.model if unwrapped else model, save_model)
    return records

