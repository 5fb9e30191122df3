"""Transfer records and the accuracy table made from them, shared by the benchmark script and the model cards.

A record is one evaluated run: the fields of RUN_KEY plus accuracy (a fraction), ece, mc_samples, train_seconds.
`source` names the φ a MetaPerturb run used ("-" for methods without one). The table and the cards' eval results
come from the same `accuracy_cells`, so a card shows exactly the numbers of the benchmark table.
"""

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

RUN_KEY = ("source", "target", "arch", "method", "seed", "steps", "train_per_class")
# Two-sided 95 % Student t quantiles by degrees of freedom; the normal value beyond the table.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def load_records(path: str | Path) -> list[dict]:
    """Records of a benchmark JSONL file (none while it does not exist), or of a transfer JSON ({"records": [...]})."""
    path = Path(path)
    if path.suffix == ".json":
        return json.loads(path.read_text())["records"]
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def has_run_key(records: list[dict]) -> bool:
    """Whether these are transfer records (the other JSONL files in benchmarks/results hold curves and timings)."""
    return bool(records) and all(field in record for record in records for field in (*RUN_KEY, "accuracy"))


def key_of(record: dict) -> tuple:
    """The run a record belongs to: MetaPerturb's MC and single-pass records share one run."""
    method = "metaperturb" if record["method"].startswith("metaperturb") else record["method"]
    return tuple(method if field == "method" else record[field] for field in RUN_KEY)


def column_name(record: dict) -> str:
    return f"{record['method']} [{record['source']}]" if record["source"] != "-" else record["method"]


def accuracy_cells(records: list[dict]) -> dict[tuple[str, str, str], list[float]]:
    """Test accuracies in % by (target, arch, column), one value per seed."""
    cells = defaultdict(list)
    for record in records:
        cells[(record["target"], record["arch"], column_name(record))].append(100 * record["accuracy"])
    return dict(cells)


def confidence_interval(values: list[float]) -> float:
    if len(values) < 2:
        return float("nan")
    return T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def table_layout(cells: dict) -> tuple[list[tuple[str, str]], list[str]]:
    """Rows (target, arch) and columns (baseline "none" first), both sorted."""
    rows = sorted({(t, a) for t, a, _ in cells})
    columns = sorted({c for _, _, c in cells}, key=lambda c: (c != "none", c))
    return rows, columns


def markdown_table(records: list[dict]) -> str:
    """Rows (target, arch), columns methods, cells mean ± 95 % CI in % (n seeds), best mean per row in bold."""
    cells = accuracy_cells(records)
    rows, columns = table_layout(cells)
    steps = sorted({r["steps"] for r in records})
    lines = [f"Test accuracy (%), mean ± 95 % CI over seeds (n in parentheses); {steps} steps; best per row in bold.",
             "", "| target | network | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for target, arch in rows:
        means = {c: statistics.mean(cells[(target, arch, c)]) for c in columns if cells.get((target, arch, c))}
        repeated = {c: m for c, m in means.items() if len(cells[(target, arch, c)]) > 1}
        candidates = repeated or means  # one seed is no best, where others have more
        best = max(candidates, key=candidates.get)
        row = []
        for column in columns:
            values = cells.get((target, arch, column))
            if not values:
                row.append("–")
                continue
            spread = f" ± {confidence_interval(values):.2f}" if len(values) > 1 else ""
            text = f"{statistics.mean(values):.2f}{spread} ({len(values)})"
            row.append(f"**{text}**" if column == best else text)
        lines.append(f"| {target} | {arch} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def paired_gains(records: list[dict], include) -> dict[tuple[str, str, str], list[float]]:
    """Test accuracy minus none's on the same seed, in points, by (target, arch, column) for the records that
    `include` accepts; a run whose seed has no none record is left out."""
    none = {(r["target"], r["arch"], r["seed"]): r["accuracy"] for r in records if r["method"] == "none"}
    gains = defaultdict(list)
    for record in sorted(records, key=lambda r: (r["target"], r["arch"], r["source"], r["seed"])):
        paired = none.get((record["target"], record["arch"], record["seed"]))
        if record["method"] != "none" and include(record) and paired is not None:
            gains[(record["target"], record["arch"], column_name(record))].append(100 * (record["accuracy"] - paired))
    return dict(gains)


def mean_std(values: list[float]) -> str:
    """A gain as "+1.23 ± 0.45" (mean ± std over seeds), or "+1.23 (1 seed)"."""
    if len(values) < 2:
        return f"{values[0]:+.2f} (1 seed)" if values else "–"
    return f"{statistics.mean(values):+.2f} ± {statistics.stdev(values):.2f}"


def seeds_with_gain(values: list[float]) -> str:
    """How many of the paired gains are positive, as "2 of 3"."""
    return f"{sum(value > 0 for value in values)} of {len(values)}"
