r"""Evaluate a saved MetaPerturb run again: MC-10 and the single pass with every candidate statistics of today's code.

The single pass's candidates change (the "fitted" statistics came after most grid runs); a run saved with
`examples/transfer.py --save-model PATH` is evaluated again without training it again. Appends one JSON line: the run's
MC-10 accuracy (the mean over --mc-draw-seeds draws of the noise, each listed) and MC-1, -2 and -5, the chosen single
pass, every candidate's test accuracy and agreement with MC on the training images, and the seconds the single pass's
statistics took. `--report RECORDS` prints them as a Markdown table.

    python examples/transfer.py --dataset ../shared/data/omniglot_bg_small_32 --arch resnet20 --method metaperturb \
        --perturbation hub_cards/metaperturb-tin-full-resnet20-gated --steps 1500 --seeds 0 --save-model run.pt
    python benchmarks/single_pass_saved.py --model run.pt --dataset ../shared/data/omniglot_bg_small_32 \
        --seed 0 --perturbation hub_cards/metaperturb-tin-full-resnet20-gated
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from metaperturb_hf import load_perturbation
from metaperturb_hf.data import load_image_dataset, subsample_per_class, to_tensors
from metaperturb_hf.evaluation import evaluate
from metaperturb_hf.methods import apply_method, build_classifier, evaluate_single_pass
from metaperturb_hf.transfer import resolve_noise_strength

ROOT = Path(__file__).resolve().parents[1]
MC_CURVE = (1, 2, 5)  # MC-K besides MC-10, one draw seed each


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--mc-draw-seeds", type=int, default=3, help="MC-10 evaluated this many times, averaged")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "single_pass_saved.jsonl"))
    args = parse_run_arguments(parser, argv, report)
    if args is None:
        return
    model, train, test = load_saved_run(args)

    draws = []
    for draw_seed in range(args.mc_draw_seeds):  # MC-10 is itself random: its spread over draw seeds
        torch.manual_seed(draw_seed)
        draws.append(evaluate(model, test, num_samples=10)["accuracy"])
    by_samples = {}
    for samples in MC_CURVE:  # how much of MC's accuracy comes from averaging draws rather than from any one draw
        torch.manual_seed(0)
        by_samples[samples] = evaluate(model, test, num_samples=samples)["accuracy"]
    record = {"run": args.label or Path(args.model).stem, "dataset": Path(args.dataset).name, "arch": args.arch,
              "seed": args.seed, "noise_strength": model.noise_coeff, "mc10": statistics.mean(draws),
              "mc10_by_draw_seed": draws, "mc_by_samples": by_samples}
    start = time.perf_counter()
    single_pass = evaluate_single_pass(model, train, test, args.batch_size, 10, args.seed)
    record |= {"single_pass_seconds": round(time.perf_counter() - start, 1), "single_pass": single_pass["accuracy"],
               **{key: single_pass[key] for key in ("single_pass_weight", "accuracy_by_weight", "agreement_by_weight",
                                                   "cross_entropy_by_weight")}}
    record["shortfall"] = record["mc10"] - record["single_pass"]
    print(json.dumps(record))
    with open(args.output, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that name a saved run (and --report), shared with single_pass_choice.py."""
    parser.add_argument("--model", help="a MetaPerturb run's state dict (transfer.py --save-model)")
    parser.add_argument("--dataset", help="the run's target: a Parquet folder with train/test splits")
    parser.add_argument("--train-per-class", type=int, help="as the run had it (e.g. 50 for CIFAR-10)")
    parser.add_argument("--seed", type=int, help="the run's seed (its training subset and batches)")
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--perturbation", default=str(ROOT / "hub_cards" / "metaperturb-tin-full-resnet20-gated"))
    parser.add_argument("--noise-strength", type=float, help="the run's κ (default: φ's released strength)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--label", help="the run's name in the record (default: the model file's name)")
    parser.add_argument("--report", metavar="RECORDS", help="print the records of this file as a table, and stop")


def parse_run_arguments(parser: argparse.ArgumentParser, argv, report) -> argparse.Namespace | None:
    """The arguments; None once `--report RECORDS` has printed `report` of those records."""
    args = parser.parse_args(argv)
    if args.report:
        if not Path(args.report).is_file():
            parser.error(f"--report {args.report}: no such records file (the run_*.sh beside this script writes it)")
        print(report([json.loads(line) for line in Path(args.report).read_text().splitlines() if line.strip()]))
        return None
    if args.model is None or args.dataset is None or args.seed is None:
        parser.error("--model, --dataset and --seed name the run to evaluate (or --report RECORDS)")
    return args


def load_saved_run(args: argparse.Namespace):
    """(model in eval mode at the run's κ, training data as the run had it, test data) of the run `args` name."""
    train, test = (to_tensors(load_image_dataset(args.dataset, split)) for split in ("train", "test"))
    if args.train_per_class:
        train = subsample_per_class(train, args.train_per_class, args.seed)
    image_size = train.images.shape[-1]
    phi = load_perturbation(args.perturbation)
    model = apply_method(build_classifier(args.arch, len(train.class_names), image_size, args.seed), "metaperturb",
                         image_size, phi)
    model.load_state_dict(torch.load(args.model, weights_only=True))
    model.set_noise_coeff(resolve_noise_strength(model, args.noise_strength))
    return model.eval(), train, test


def report(records: list[dict]) -> str:
    """One row per run: MC-K, the chosen single pass, the matched and fitted candidates, the shortfall below MC-10."""
    def percent(value):
        return "–" if value is None else f"{100 * value:.2f}"

    lines = ["Test accuracy % of one saved run each (`benchmarks/run_single_pass_saved.sh`): MC-10 as the mean over "
             "draw seeds (their range beside it), shortfall = MC-10 − single pass, in points:", "",
             "| run | MC-1 | MC-2 | MC-5 | MC-10 | MC-10 range | single pass | chosen | matched | fitted | "
             "shortfall |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for record in sorted(records, key=lambda r: r["run"]):
        draws, candidates = record["mc10_by_draw_seed"], record["accuracy_by_weight"]
        cells = [record["run"], *(percent(record["mc_by_samples"][str(k)]) for k in MC_CURVE),
                 percent(record["mc10"]), f"{percent(min(draws))}–{percent(max(draws))}",
                 percent(record["single_pass"]), str(record["single_pass_weight"]),
                 percent(candidates.get("matched")), percent(candidates.get("fitted")),
                 f"{100 * record['shortfall']:+.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    within = sum(round(100 * record["shortfall"], 2) <= 1 for record in records)  # as the table shows it
    return "\n".join([*lines, "", f"Within 1 point of MC-10: {within} of {len(records)} runs."])


if __name__ == "__main__":
    main()
