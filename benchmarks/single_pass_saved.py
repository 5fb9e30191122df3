"""Evaluate a saved MetaPerturb run again: MC-10 and the single pass with every candidate statistics of today's code.

The single pass's candidates change (the "fitted" statistics came after most grid runs); a run saved with
`examples/transfer.py --save-model PATH` is evaluated again without training it again. Appends one JSON line: the
run's MC-10 accuracy, the chosen single pass, every candidate's test accuracy and agreement with MC on the training
images, and the seconds the single pass's statistics took. `--report RECORDS` prints them as a Markdown table.

    python examples/transfer.py --dataset ../shared/data/omniglot_bg_small_32 --arch resnet20 --method metaperturb \
        --perturbation hub_cards/metaperturb-tin-full-resnet20-gated --steps 1500 --seeds 0 --save-model run.pt
    python benchmarks/single_pass_saved.py --model run.pt --dataset ../shared/data/omniglot_bg_small_32 \
        --seed 0 --perturbation hub_cards/metaperturb-tin-full-resnet20-gated
"""

import argparse
import json
import time
from pathlib import Path

import torch

from metaperturb_hf import load_perturbation
from metaperturb_hf.data import load_image_dataset, subsample_per_class, to_tensors
from metaperturb_hf.evaluation import evaluate
from metaperturb_hf.methods import apply_method, build_classifier, evaluate_single_pass
from metaperturb_hf.transfer import resolve_noise_strength

ROOT = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a MetaPerturb run's state dict (transfer.py --save-model)")
    parser.add_argument("--dataset", help="the run's target: a Parquet folder with train/test splits")
    parser.add_argument("--train-per-class", type=int, help="as the run had it (e.g. 50 for CIFAR-10)")
    parser.add_argument("--seed", type=int, help="the run's seed (its training subset and batches)")
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--perturbation", default=str(ROOT / "hub_cards" / "metaperturb-tin-full-resnet20-gated"))
    parser.add_argument("--noise-strength", type=float, help="the run's κ (default: φ's released strength)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--label", help="the run's name in the record (default: the model file's name)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "single_pass_saved.jsonl"))
    parser.add_argument("--report", metavar="RECORDS", help="print the records of this file as a table, and stop")
    args = parser.parse_args()
    if args.report:
        print(report([json.loads(line) for line in Path(args.report).read_text().splitlines() if line.strip()]))
        return
    if args.model is None or args.dataset is None or args.seed is None:
        parser.error("--model, --dataset and --seed name the run to evaluate (or --report RECORDS)")

    train, test = (to_tensors(load_image_dataset(args.dataset, split)) for split in ("train", "test"))
    if args.train_per_class:
        train = subsample_per_class(train, args.train_per_class, args.seed)
    image_size = train.images.shape[-1]
    phi = load_perturbation(args.perturbation)
    model = apply_method(build_classifier(args.arch, len(train.class_names), image_size, args.seed), "metaperturb",
                         image_size, phi)
    model.load_state_dict(torch.load(args.model, weights_only=True))
    model.set_noise_coeff(resolve_noise_strength(model, args.noise_strength))
    model.eval()

    torch.manual_seed(args.seed)
    record = {"run": args.label or Path(args.model).stem, "dataset": Path(args.dataset).name, "arch": args.arch,
              "seed": args.seed, "noise_strength": model.noise_coeff,
              "mc10": evaluate(model, test, num_samples=10)["accuracy"]}
    start = time.perf_counter()
    single_pass = evaluate_single_pass(model, train, test, args.batch_size, 10, args.seed)
    record |= {"single_pass_seconds": round(time.perf_counter() - start, 1), "single_pass": single_pass["accuracy"],
               **{key: single_pass[key] for key in ("single_pass_weight", "accuracy_by_weight", "agreement_by_weight")}}
    record["shortfall"] = record["mc10"] - record["single_pass"]
    print(json.dumps(record))
    with open(args.output, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def report(records: list[dict]) -> str:
    """One row per run: MC-10, the chosen single pass, the matched and fitted candidates, the shortfall below MC."""
    def percent(value):
        return "–" if value is None else f"{100 * value:.2f}"

    lines = ["Test accuracy % of one saved run each (`benchmarks/run_single_pass_saved.sh`); shortfall = MC-10 − "
             "single pass, in points:", "",
             "| run | MC-10 | single pass (chosen) | chosen | matched | fitted | shortfall |", "|---|---|---|---|---|---|---|"]
    for record in sorted(records, key=lambda r: r["run"]):
        candidates = record["accuracy_by_weight"]
        lines.append(f"| {record['run']} | {percent(record['mc10'])} | {percent(record['single_pass'])} | "
                     f"{record['single_pass_weight']} | {percent(candidates.get('matched'))} | "
                     f"{percent(candidates.get('fitted'))} | {100 * record['shortfall']:+.2f} |")
    within = sum(record["shortfall"] <= 0.01 for record in records)
    lines += ["", f"Within 1 point of MC-10: {within} of {len(records)} runs."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
