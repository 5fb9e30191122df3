"""What a transfer grid's records answer, as markdown tables: does MetaPerturb beat no perturbation, how close does its
single pass come to MC, does it beat the other regularizers, and where should φ go?

1. Gain: per (target, network, φ) the mean ± std over seeds of MetaPerturb (MC) minus none, paired by seed, with
   the number of seeds whose gain is positive.
2. Single pass: per (target, network, φ) the mean over seeds of MC, of the single pass that
   `choose_single_pass_statistics` picked (by agreement with MC on training images), of the fixed blends a = 0 (the
   statistics from training), a = 1 (fully calibrated) and of the statistics matched to the moments of the
   noise-averaged features ("matched"; records made before it existed show "–"), the largest shortfall of the chosen
   single pass below MC over the seeds, and the candidates chosen.
3. Other regularizers: per (target, network) the mean of none, of the best other regularizer (dropout, DropBlock,
   manifold mixup, information dropout, fine-tuning) and of the best MetaPerturb column (MC), each with its seeds,
   and MetaPerturb minus the best other.
4. Placement (the paper's location ablation): per (target, network, φ) that ran at some sites only, the mean (MC) of
   every placement, all sites first, beside none.

    python benchmarks/grid_summary.py benchmarks/results/grid_1500.jsonl [--output benchmarks/results/grid_1500_summary.md]
"""

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from metaperturb_hf.results import load_records


def by_run(records: list[dict]) -> dict[tuple, dict[str, dict]]:
    """Records by (target, arch, source, seed), then by method."""
    runs = defaultdict(dict)
    for record in records:
        runs[(record["target"], record["arch"], record["source"], record["seed"])][record["method"]] = record
    return runs


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:+.2f} (1 seed)" if values else "–"
    return f"{statistics.mean(values):+.2f} ± {statistics.stdev(values):.2f}"


def gain_table(records: list[dict]) -> str:
    runs = by_run(records)
    none = {(t, a, seed): methods["none"]["accuracy"] for (t, a, _, seed), methods in runs.items() if "none" in methods}
    cells = defaultdict(list)
    for (target, arch, source, seed), methods in sorted(runs.items()):
        if "metaperturb" in methods and (target, arch, seed) in none:
            cells[(target, arch, source)].append(100 * (methods["metaperturb"]["accuracy"] - none[(target, arch, seed)]))
    lines = ["| target | network | φ | MC-10 − none (points, mean ± std) | seeds with a gain |", "|---|---|---|---|---|"]
    for (target, arch, source), gains in sorted(cells.items()):
        lines.append(f"| {target} | {arch} | {source} | {mean_std(gains)} | {sum(g > 0 for g in gains)} of {len(gains)} |")
    return "\n".join(lines) + "\n"


def candidate_name(key) -> str:
    """A blend weight as a short number (0.25), the matched statistics by name."""
    return f"{key:g}" if isinstance(key, (int, float)) else str(key)


def single_pass_table(records: list[dict]) -> str:
    cells = defaultdict(list)
    for (target, arch, source, _), methods in sorted(by_run(records).items()):
        single = methods.get("metaperturb_single_pass")
        if single and "metaperturb" in methods and "single_pass_weight" in single:
            cells[(target, arch, source)].append((methods["metaperturb"], single))
    lines = ["| target | network | φ | seeds | MC-10 | single pass (chosen) | a = 0 | a = 1 | matched | "
             "largest shortfall below MC | chosen |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (target, arch, source), pairs in sorted(cells.items()):
        mc = [100 * m["accuracy"] for m, _ in pairs]
        chosen = [100 * s["accuracy"] for _, s in pairs]
        shortfall = max(a - b for a, b in zip(mc, chosen))
        weights = ", ".join(candidate_name(s["single_pass_weight"]) for _, s in pairs)
        trained, calibrated, matched = (candidate_mean([s for _, s in pairs], key) for key in ("0.0", "1.0", "matched"))
        lines.append(f"| {target} | {arch} | {source} | {len(pairs)} | {statistics.mean(mc):.2f} | "
                     f"{statistics.mean(chosen):.2f} | {trained} | {calibrated} | {matched} | {shortfall:+.2f} | "
                     f"{weights} |")
    return "\n".join(lines) + "\n"


def candidate_mean(singles: list[dict], key: str) -> str:
    """One candidate's test accuracy over the seeds that have it: runs from before it existed lack it, and one
    that broke the single pass (NaN or Inf features) holds None; "(k of n seeds)" says when those are left out."""
    values = [100 * s["accuracy_by_weight"][key] for s in singles if s["accuracy_by_weight"].get(key) is not None]
    if not values:
        return "–"
    return f"{statistics.mean(values):.2f}" + ("" if len(values) == len(singles) else
                                              f" ({len(values)} of {len(singles)} seeds)")


OTHER_REGULARIZERS = ("dropout", "dropblock", "manifold_mixup", "info_dropout", "finetune")


def mean_with_seeds(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ({len(values)})"


def best_column(columns: dict[str, list[float]]) -> tuple[str, list[float]]:
    """The column with the highest mean; its name and values."""
    return max(columns.items(), key=lambda item: statistics.mean(item[1]))


def regularizer_table(records: list[dict]) -> str:
    cells = defaultdict(lambda: defaultdict(list))
    for record in records:
        if record["method"] in ("none", "metaperturb", *OTHER_REGULARIZERS):
            column = record["source"] if record["method"] == "metaperturb" else record["method"]
            cells[(record["target"], record["arch"], record["method"] == "metaperturb")][column].append(
                100 * record["accuracy"])
    lines = ["| target | network | none | best other regularizer | best MetaPerturb (MC-10) | MetaPerturb − best other |",
             "|---|---|---|---|---|---|"]
    for target, arch in sorted({(t, a) for t, a, _ in cells}):
        others, perturbed = dict(cells[(target, arch, False)]), cells[(target, arch, True)]
        none = others.pop("none", None)
        if not others or not perturbed:
            continue
        (other, other_values), (source, values) = best_column(others), best_column(perturbed)
        lines.append(f"| {target} | {arch} | {mean_with_seeds(none) if none else '–'} | "
                     f"{other} {mean_with_seeds(other_values)} | {source} {mean_with_seeds(values)} | "
                     f"{statistics.mean(values) - statistics.mean(other_values):+.2f} |")
    return "\n".join(lines) + "\n"


def split_placement(source: str) -> tuple[str, str]:
    """("authors @top:3 κ=0.5") -> ("authors κ=0.5", "top:3"); a column without "@" has φ at all sites."""
    words = source.split(" ")
    placements = [word[1:] for word in words if word.startswith("@")]
    return " ".join(word for word in words if not word.startswith("@")), placements[0] if placements else "all"


def placement_table(records: list[dict]) -> str:
    none, cells = defaultdict(list), defaultdict(lambda: defaultdict(list))
    for record in records:
        if record["method"] == "none":
            none[(record["target"], record["arch"])].append(100 * record["accuracy"])
        elif record["method"] == "metaperturb":
            source, placement = split_placement(record["source"])
            cells[(record["target"], record["arch"], source)][placement].append(100 * record["accuracy"])
    rows = {key: columns for key, columns in cells.items() if set(columns) != {"all"}}
    placements = sorted({placement for columns in rows.values() for placement in columns} - {"all"})
    lines = ["| target | network | φ | none | all sites | " + " | ".join(placements) + " |",
             "|---|---|---|---|---|" + "---|" * len(placements)]
    for (target, arch, source), columns in sorted(rows.items()):
        values = [none.get((target, arch)), *(columns.get(placement) for placement in ("all", *placements))]
        lines.append(f"| {target} | {arch} | {source} | " + " | ".join(mean_with_seeds(v) if v else "–" for v in values)
                     + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", help="a transfer grid's JSONL records")
    parser.add_argument("--output", help="also write the tables to this markdown file")
    args = parser.parse_args()
    records = load_records(args.records)
    if not records:
        parser.error(f"no records in {args.records}")
    text = (f"MetaPerturb against no perturbation, paired by seed:\n\n{gain_table(records)}\n"
            f"Single pass against MC-10 (test accuracy %, means over seeds):\n\n{single_pass_table(records)}\n"
            f"MetaPerturb against the best other regularizer (test accuracy %, means over seeds, seeds in parentheses):"
            f"\n\n{regularizer_table(records)}\n"
            f"MetaPerturb by placement of φ (test accuracy %, MC-10, means over seeds, seeds in parentheses):\n\n"
            f"{placement_table(records)}")
    print(text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
