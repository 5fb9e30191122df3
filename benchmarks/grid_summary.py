"""What a transfer grid's records answer, as markdown tables: does MetaPerturb beat no perturbation, how close does its
single pass come to MC, does it beat the other regularizers, and where should φ go?

0. Headline: per (target, network) none's mean and the gain over it, paired by seed, of every regularizer at its
   default setting (MetaPerturb with each φ at every site and full strength, MC; each other regularizer), so that
   no placement or strength picked on the test split enters it; `--chart` draws the same as dots per seed. Beside
   it, the same settings' expected calibration error.
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
5. Targets: per (target, network) the best released φ's gain over none, the best other regularizer's, and the
   single pass's largest shortfall below MC, then the tally against the targets the project set itself.

    python benchmarks/grid_summary.py benchmarks/results/grid_1500.jsonl
        [--output benchmarks/results/grid_1500_summary.md] [--chart benchmarks/results/grid_1500_gains.png]
    python benchmarks/grid_summary.py benchmarks/results/gated_350_1500.jsonl
        --baseline benchmarks/results/grid_1500.jsonl  # a side experiment's φ, paired with the grid's none runs
"""

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from metaperturb_hf.results import accuracy_cells, column_name, load_records, mean_std, paired_gains, seeds_with_gain


def by_run(records: list[dict]) -> dict[tuple, dict[str, dict]]:
    """Records by (target, arch, source, seed), then by method."""
    runs = defaultdict(dict)
    for record in records:
        runs[(record["target"], record["arch"], record["source"], record["seed"])][record["method"]] = record
    return runs


def gain_table(records: list[dict]) -> str:
    cells = paired_gains(records, lambda record: record["method"] == "metaperturb")
    lines = ["| target | network | φ | MC-10 − none (points, mean ± std) | seeds with a gain |",
             "|---|---|---|---|---|"]
    rows = sorted((target, arch, column.removeprefix("metaperturb [").removesuffix("]"), gains)
                  for (target, arch, column), gains in cells.items())
    for target, arch, source, gains in rows:
        lines.append(f"| {target} | {arch} | {source} | {mean_std(gains)} | {seeds_with_gain(gains)} |")
    return "\n".join(lines) + "\n"


def candidate_name(key) -> str:
    """A blend weight as a short number (0.25), the matched statistics by name."""
    return f"{key:g}" if isinstance(key, (int, float)) else str(key)


def single_pass_pairs(records: list[dict]) -> dict[tuple, list[tuple[dict, dict]]]:
    """(MC record, single-pass record) of every run that has both, by (target, arch, source), in seed order."""
    cells = defaultdict(list)
    for (target, arch, source, _), methods in sorted(by_run(records).items()):
        single = methods.get("metaperturb_single_pass")
        if single and "metaperturb" in methods and "single_pass_weight" in single:
            cells[(target, arch, source)].append((methods["metaperturb"], single))
    return cells


def single_pass_table(records: list[dict]) -> str:
    cells = single_pass_pairs(records)
    lines = ["| target | network | φ | seeds | MC-10 | single pass (chosen) | a = 0 | a = 1 | matched | "
             "largest shortfall below MC | chosen |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (target, arch, source), pairs in sorted(cells.items()):
        mc = [100 * m["accuracy"] for m, _ in pairs]
        chosen = [100 * s["accuracy"] for _, s in pairs]
        shortfall = max(a - b for a, b in zip(mc, chosen))
        weights = ", ".join(candidate_name(s["single_pass_weight"]) for _, s in pairs)
        trained, calibrated, matched = (candidate_mean([s for _, s in pairs], key)
                                        for key in ("0.0", "1.0", "matched"))
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
    lines = ["| target | network | none | best other regularizer | best MetaPerturb (MC-10) | "
             "MetaPerturb − best other |",
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
    header = ["target", "network", "φ", "none", "all sites", *placements]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (target, arch, source), columns in sorted(rows.items()):
        values = [none.get((target, arch)), *(columns.get(placement) for placement in ("all", *placements))]
        lines.append(f"| {target} | {arch} | {source} | "
                     + " | ".join(mean_with_seeds(v) if v else "–" for v in values) + " |")
    return "\n".join(lines) + "\n"


def is_default_setting(record: dict) -> bool:
    """MetaPerturb (MC) with φ at every site and full strength, or another regularizer: what a user gets
    without choosing a placement or a strength on the test split."""
    if record["method"] == "metaperturb":
        return "@" not in record["source"] and "κ=" not in record["source"]
    return record["method"] in OTHER_REGULARIZERS


def setting_columns(cells: dict) -> list[str]:
    """The columns of cells keyed (target, arch, column), MetaPerturb's first."""
    return sorted({column for _, _, column in cells}, key=lambda c: (not c.startswith("metaperturb"), c))


def headline_table(records: list[dict]) -> str:
    """Per (target, network) the mean of none and every default setting's gain over it, paired by seed."""
    cells = paired_gains(records, is_default_setting)
    none = accuracy_cells([record for record in records if record["method"] == "none"])
    columns = setting_columns(cells)
    lines = ["| " + " | ".join(["target", "network", "none", *columns]) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for target, arch in sorted({(t, a) for t, a, _ in cells}):
        values = none[(target, arch, "none")]
        gains = [cells.get((target, arch, column)) for column in columns]
        lines.append(f"| {target} | {arch} | {mean_with_seeds(values)} | "
                     + " | ".join(f"{mean_std(g)}, {seeds_with_gain(g)}" if g else "–" for g in gains) + " |")
    return "\n".join(lines) + "\n"


def calibration_table(records: list[dict]) -> str:
    """Per (target, network) the mean expected calibration error of none and of every default setting (MC for
    MetaPerturb), the lowest in bold: the paper reports MetaPerturb calibrating better."""
    cells = defaultdict(list)
    for record in records:
        if record["method"] == "none" or is_default_setting(record):
            cells[(record["target"], record["arch"], column_name(record))].append(record["ece"])
    columns = ["none", *(column for column in setting_columns(cells) if column != "none")]
    lines = ["| " + " | ".join(["target", "network", *columns]) + " |", "|---|---|" + "---|" * len(columns)]
    for target, arch in sorted({(t, a) for t, a, c in cells if c != "none" and (t, a, "none") in cells}):
        means = {c: statistics.mean(cells[(target, arch, c)]) for c in columns if (target, arch, c) in cells}
        lowest = min(means, key=means.get)
        lines.append(f"| {target} | {arch} | " + " | ".join(
            "–" if c not in means else f"**{means[c]:.3f}**" if c == lowest else f"{means[c]:.3f}" for c in columns)
            + " |")
    return "\n".join(lines) + "\n"


BEST_RELEASED = "tin-full-resnet20-gated κ=0.5"  # the best φ released (hub_cards/) at the strength its card gives


def targets_table(records: list[dict], source: str = BEST_RELEASED) -> str:
    """The evidence issue's targets for MetaPerturb with one φ setting (`source`), per (target, network) where it
    ran: its gain over none paired by seed, the best other regularizer's, and its single pass's largest shortfall
    below MC over the seeds; then the tally against the targets (above none in every cell, mean gain ≥ +2, on
    average at least the best other regularizer, single pass within 1 point of MC)."""
    gains = paired_gains(records, lambda r: r["method"] in ("metaperturb", *OTHER_REGULARIZERS)
                         and r["source"] in (source, "-"))
    column = f"metaperturb [{source}]"
    pairs = single_pass_pairs(records)
    none = accuracy_cells([record for record in records if record["method"] == "none"])
    lines = [f"| target | network | none | MetaPerturb [{source}] − none | seeds with a gain | "
             "best other regularizer − none | single pass: largest shortfall below MC-10 |",
             "|---|---|---|---|---|---|---|"]
    ours, best_others, worst = [], [], []
    for target, arch in sorted({(t, a) for t, a, c in gains if c == column}):
        mine = gains[(target, arch, column)]
        others = {c: g for (t, a, c), g in gains.items() if (t, a) == (target, arch) and c in OTHER_REGULARIZERS}
        other = best_column(others) if others else None
        shortfall = max((100 * (mc["accuracy"] - single["accuracy"]) for mc, single in pairs[(target, arch, source)]),
                        default=None)
        ours.append(statistics.mean(mine))
        if other:
            best_others.append(statistics.mean(mine) - statistics.mean(other[1]))
        if shortfall is not None:
            worst.append(round(shortfall, 2))  # as the table shows it: 20 of 2000 images is 1 point, not 1.000…01
        lines.append(f"| {target} | {arch} | {mean_with_seeds(none[(target, arch, 'none')])} | {mean_std(mine)} | "
                     f"{seeds_with_gain(mine)} | " + (f"{other[0]} {mean_std(other[1])}" if other else "–")
                     + f" | {'–' if shortfall is None else f'{shortfall:.2f}'} |")
    if not ours:
        return f"No MetaPerturb runs with `{source}` paired with none.\n"
    above = sum(round(gain, 2) > 0 for gain in ours)  # as the table shows it: a tie summed in floats is no gain
    lines += ["", f"Against the targets: above none (mean over seeds) in {above} of {len(ours)} "
              f"cells (target: all); mean gain {statistics.mean(ours):+.2f} points (target: ≥ +2); "
              + (f"MetaPerturb minus the best other regularizer {statistics.mean(best_others):+.2f} points on average "
                 f"over the {len(best_others)} cells where others ran (target: ≥ 0); " if best_others else
                 "no other regularizer ran beside it; ")
              + f"single pass within 1 point of MC-10 on every seed in {sum(w <= 1 for w in worst)} of {len(worst)} "
              "cells with a single pass (target: all)."]
    return "\n".join(lines) + "\n"


def gain_chart(records: list[dict], path: Path) -> list[str]:
    """One panel per (target, network): each default setting's gain over none, every seed a dot, the mean a bar.
    Returns the panels' titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = paired_gains(records, is_default_setting)
    panels = sorted({(t, a) for t, a, _ in cells})
    columns = setting_columns(cells)[::-1]  # top to bottom
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 0.35 * len(columns) + 1.4), sharey=True,
                             squeeze=False)
    for ax, (target, arch) in zip(axes[0], panels):
        for row, column in enumerate(columns):
            gains = cells.get((target, arch, column))
            if not gains:
                continue
            color = "tab:red" if column.startswith("metaperturb") else "tab:gray"
            ax.scatter(gains, [row] * len(gains), s=9, color=color, alpha=0.5, zorder=2)
            spread = statistics.stdev(gains) if len(gains) > 1 else 0
            ax.errorbar(statistics.mean(gains), row, xerr=spread, fmt="D", color=color, markersize=5, capsize=2,
                        zorder=3)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(f"{target}, {arch}", fontsize=9)
        ax.set_xlabel("points over none", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(columns)), columns, fontsize=8)
    fig.suptitle("Test accuracy minus none, paired by seed (dots: seeds; diamonds: mean ± std)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [f"{target}, {arch}" for target, arch in panels]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", help="a transfer grid's JSONL records")
    parser.add_argument("--baseline", action="append", default=[], metavar="RECORDS",
                        help="also read the no-perturbation runs (method none, nothing else) from these JSONL "
                             "records, so that a side experiment is paired with the grid's none runs (repeatable)")
    parser.add_argument("--output", help="also write the tables to this markdown file")
    parser.add_argument("--chart", help="also draw the headline's gains over none, paired by seed, to this PNG")
    args = parser.parse_args()
    records = load_records(args.records)
    if not records:
        parser.error(f"no records in {args.records}")
    for path in args.baseline:
        if not Path(path).is_file():
            parser.error(f"--baseline {path}: no such records file")
    records += [record for path in args.baseline for record in load_records(path) if record["method"] == "none"]
    text = (f"Every regularizer at its default setting against no perturbation (points over none's mean "
            f"accuracy %, paired by seed: mean ± std, seeds with a gain):\n\n{headline_table(records)}\n"
            f"Expected calibration error (15 bins), means over seeds, lowest in bold:\n\n"
            f"{calibration_table(records)}\n"
            f"MetaPerturb against no perturbation, paired by seed:\n\n{gain_table(records)}\n"
            f"Single pass against MC-10 (test accuracy %, means over seeds):\n\n{single_pass_table(records)}\n"
            f"MetaPerturb against the best other regularizer (test accuracy %, means over seeds, seeds in "
            f"parentheses):\n\n{regularizer_table(records)}\n"
            f"MetaPerturb by placement of φ (test accuracy %, MC-10, means over seeds, seeds in parentheses):\n\n"
            f"{placement_table(records)}\n"
            f"The targets with the best released φ, {BEST_RELEASED} (points, paired by seed; mean ± std):\n\n"
            f"{targets_table(records)}")
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    if args.chart:
        gain_chart(records, Path(args.chart))


if __name__ == "__main__":
    main()
