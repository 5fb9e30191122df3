r"""Which label-free signal chooses the single pass's statistics best? Saved runs evaluated once more.

The single pass keeps the candidate statistics whose prediction agrees most often with MC (ties: the lowest
cross-entropy to MC's softmax). On the plain training images, which it chose by until 7 December 2026, a classifier
that has memorised them (CIFAR-10 with 50 per class) gives every good candidate full agreement and the tie-break
decides. This script makes the candidates of `evaluate_single_pass` for a run saved with `examples/transfer.py
--save-model` and records every candidate's test accuracy beside four signals that could choose among them:
  - "train": agreement and cross-entropy with MC-10 on the unaugmented training images (the earlier choice);
  - "train_augmented": the same on augmented training batches drawn with another seed than the fit's (the choice of
    `evaluate_single_pass` now: `CHOICE_BATCHES`, `CHOICE_SEED_OFFSET`);
  - "test_inputs": the same on the test images (transductive: the images, not their labels);
  - "train_augmented_labels": accuracy against the labels on as many further augmented training batches.
One JSON line per run; `--report RECORDS` prints each signal's choice and its test accuracy against MC-10 and the
best candidate.

    python benchmarks/single_pass_choice.py --model benchmarks/saved_runs/cifar10_s1.pt \
        --dataset ../shared/data/cifar10_32 --train-per-class 50 --seed 1
    python benchmarks/single_pass_choice.py --report benchmarks/results/single_pass_choice.jsonl
"""

import argparse
import json
import statistics
from pathlib import Path

import torch
from single_pass_saved import (  # this folder is on sys.path as a script
    ROOT,
    add_run_arguments,
    load_saved_run,
    parse_run_arguments,
)

from metaperturb_hf.data import BatchSampler
from metaperturb_hf.evaluation import evaluate, normalized_batches
from metaperturb_hf.methods import (
    CALIBRATION_BATCHES,
    CHOICE_BATCHES,
    CHOICE_SEED_OFFSET,
    choice_batches,
    evaluate_candidates,
    make_single_pass_candidates,
)
from metaperturb_hf.modeling_metaperturb import NonFiniteFeaturesError

AGREEMENT_SIGNALS = ("train", "train_augmented", "test_inputs")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "single_pass_choice.jsonl"))
    args = parse_run_arguments(parser, argv, report)
    if args is None:
        return
    model, train, test = load_saved_run(args)
    record = {"run": args.label or Path(args.model).stem, **measure(model, train, test, args.seed, args.batch_size)}
    print(json.dumps(record))
    with open(args.output, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def measure(model, train, test, seed: int, batch_size: int) -> dict:
    """Every candidate's test accuracy, MC-10's, and each signal's agreements, cross-entropies and choice."""
    model.set_noise_mode("mean")
    candidates, _ = make_single_pass_candidates(model, train, batch_size, 10, seed)
    calibrated = model.single_pass_statistics
    accuracy = {str(key): record["accuracy"] for key, record in evaluate_candidates(model, candidates, test).items()}
    torch.manual_seed(0)
    model.set_noise_mode("sample")
    mc10 = evaluate(model, test, num_samples=10)["accuracy"]
    model.set_noise_mode("mean")

    signal_batches = {"train": list(normalized_batches(train, batch_size))[:CALIBRATION_BATCHES],
                      "train_augmented": choice_batches(train, batch_size, seed),
                      "test_inputs": list(normalized_batches(test, batch_size))[:CHOICE_BATCHES]}
    signals = {}
    for name, batches in signal_batches.items():
        torch.manual_seed(123)  # MC-10 draws of the same seed for every signal
        choice = model.choose_single_pass_statistics(batches, 10, None, candidates=candidates)
        model.single_pass_statistics = calibrated
        signals[name] = {"agreement": {str(k): v for k, v in choice["agreements"].items()},
                         "cross_entropy": {str(k): v for k, v in choice["cross_entropies"].items()},
                         "chosen": str(choice["weight"])}
    labelled = BatchSampler(train, seed=seed + 2 * CHOICE_SEED_OFFSET)
    batches = [labelled.next_batch(batch_size) for _ in range(CHOICE_BATCHES)]
    label_accuracy = {}
    with torch.no_grad():
        for key, candidate in candidates.items():
            model.single_pass_statistics = candidate
            try:
                correct = sum((model.predict_proba(images).argmax(-1) == labels).sum().item()
                              for images, labels in batches)
                label_accuracy[str(key)] = correct / sum(len(labels) for _, labels in batches)
            except NonFiniteFeaturesError:  # never chosen, as in choose_single_pass_statistics
                label_accuracy[str(key)] = None
    model.single_pass_statistics = calibrated
    usable = {key: value for key, value in label_accuracy.items() if value is not None}
    signals["train_augmented_labels"] = {"accuracy": label_accuracy, "chosen": max(usable, key=usable.get)}
    return {"mc10": mc10, "accuracy_by_weight": accuracy, "signals": signals}


def report(records: list[dict]) -> str:
    """Per run and signal: the chosen candidate and MC-10 minus its test accuracy; then per signal the mean loss
    against the best candidate and the runs within 1 point of MC-10. A candidate that breaks the single pass on the
    test images (accuracy None) counts as 0 % where a signal chooses it."""
    names = [*AGREEMENT_SIGNALS, "train_augmented_labels"]
    lines = ["Test accuracy % of the single pass with the candidate each signal chooses (`benchmarks/"
             "single_pass_choice.py`), as MC-10 − that accuracy in points (the chosen candidate in brackets):", "",
             "| run | MC-10 | best candidate | " + " | ".join(names) + " |", "|---" * (3 + len(names)) + "|"]
    regrets, within = {name: [] for name in names}, dict.fromkeys(names, 0)
    for record in sorted(records, key=lambda r: r["run"]):
        accuracy = {key: value or 0.0 for key, value in record["accuracy_by_weight"].items()}
        best = max(accuracy, key=accuracy.get)
        cells = [record["run"], f"{100 * record['mc10']:.2f}", f"{100 * accuracy[best]:.2f} ({best})"]
        for name in names:
            chosen = record["signals"][name]["chosen"]
            shortfall = round(100 * (record["mc10"] - accuracy[chosen]), 2)
            regrets[name].append(100 * (accuracy[best] - accuracy[chosen]))
            within[name] += shortfall <= 1
            cells.append(f"{shortfall:+.2f} ({chosen})")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| signal | mean points below the best candidate | runs within 1 point of MC-10 |", "|---|---|---|"]
    lines += [f"| {name} | {statistics.mean(regrets[name]):.2f} | {within[name]} of {len(records)} |"
              for name in names]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
