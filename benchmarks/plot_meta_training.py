"""Plot meta-training runs from their `logs/metrics.jsonl`: losses, φ's parameter magnitudes, per-site noise and
scale, and φ's gradient norm per group, one column per run, so whether (and when) the noise generator leaves the
origin is visible at a glance.

    python benchmarks/plot_meta_training.py RUN_DIR [RUN_DIR ...] --labels a,b --output curves.png
    python benchmarks/plot_meta_training.py RUN_DIR --gradient-medians 20,100,750   # numbers, no plot
    python benchmarks/plot_meta_training.py RUN_DIR [RUN_DIR ...] --sizes 50,100,150  # numbers, no plot
    python benchmarks/plot_meta_training.py RUN_DIR [RUN_DIR ...] --overlay [--max-step 250] --output starts.png

RUN_DIR is a meta-training output folder (with logs/metrics.jsonl) or a metrics .jsonl file itself.
`--gradient-medians` prints, per run and per window of logged steps [a, b) between consecutive bounds, the median
gradient norm of each of φ's groups: how much the loss still depends on each group, without one spike deciding.
`--sizes` prints, per run and per logged step given, each group's mean |value|, the noise generator's size (the mean of
|λ₁|, |λ₂|, |γ₁|, |γ₂|) and the range of the per-site mean z: whether runs (e.g. seeds) left the origin and
stayed.
`--overlay` draws those two over the steps in one figure, one line per run: many runs (seeds, starting points) compared
at a glance.
"""

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# μ = φ₂(ReLU(φ₁(h))): λ identity, γ mean kernels
NOISE_GENERATOR_GROUPS = ("lambda1", "lambda2", "gamma1", "gamma2")
PHI_GROUPS = (*NOISE_GENERATOR_GROUPS, "K", "w")


def read_metrics(run: str | Path) -> list[dict]:
    path = Path(run)
    if path.is_dir():
        path = path / "logs" / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"No metrics at {path}: pass a meta-training output folder or its metrics .jsonl.")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(row["step"], row[key]) for row in rows if key in row]
    return [step for step, _ in points], [value for _, value in points]


def gradient_medians(rows: list[dict], bounds: list[int]) -> list[dict]:
    """Per window [a, b) of consecutive `bounds`, the median over logged steps of each group's gradient norm."""
    windows = []
    for start, end in zip(bounds, bounds[1:]):
        inside = [row for row in rows if start <= row["step"] < end]
        windows.append({"steps": [start, end],
                        **{group: statistics.median(row[f"phi/grad_norm_{group}"] for row in inside)
                           for group in PHI_GROUPS}})
    return windows


def sizes_at(rows: list[dict], steps: list[int]) -> list[dict]:
    """At each of `steps` (which must be logged), every group's mean magnitude, their mean over the noise generator's
    four groups, and the lowest and highest per-site mean z (both 0.806 when the noise does not depend on the
    input)."""
    by_step = {row["step"]: row for row in rows}
    missing = [step for step in steps if step not in by_step]
    if missing:
        raise SystemExit(f"Steps {missing} are not logged (logged: {min(by_step)}..{max(by_step)}); "
                         "pick multiples of the run's --log-every.")
    sizes = []
    for step in steps:
        row = by_step[step]
        magnitudes = {group: row[f"phi/mean_abs_{group}"] for group in PHI_GROUPS}
        site_z = [value for key, value in row.items() if key.startswith("site") and key.endswith("/mean_z")]
        sizes.append({"step": step, "noise_generator": statistics.mean(magnitudes[g] for g in NOISE_GENERATOR_GROUPS),
                      **magnitudes, "site_z": [min(site_z), max(site_z)], "valid_accuracy": row["valid_accuracy"]})
    return sizes


def noise_generator_series(rows: list[dict]) -> tuple[list[int], list[float], list[float]]:
    """The logged steps with φ statistics, the noise generator's size and the highest per-site mean z at each."""
    steps = [row["step"] for row in rows if "phi/mean_abs_lambda1" in row]
    sizes = sizes_at(rows, steps)
    return steps, [size["noise_generator"] for size in sizes], [size["site_z"][1] for size in sizes]


def plot_overlay(runs: dict[str, list[dict]], output: Path, max_step: int | None = None) -> None:
    figure, (size_axis, z_axis) = plt.subplots(1, 2, figsize=(12, 4.2))
    for label, rows in runs.items():
        steps, sizes, highest_z = noise_generator_series([row for row in rows
                                                          if max_step is None or row["step"] <= max_step])
        line, = size_axis.plot(steps, sizes, label=label)
        z_axis.plot(steps, highest_z, color=line.get_color(), label=label)
    size_axis.set_yscale("log")
    size_axis.set_ylabel("noise generator: mean |λ₁|, |λ₂|, |γ₁|, |γ₂|")
    z_axis.axhline(0.8060, color="grey", linestyle=":", linewidth=1)  # E[softplus(ε)]: μ = 0, no input dependence
    z_axis.set_ylabel("highest per-site mean z")
    for axis in (size_axis, z_axis):
        axis.set_xlabel("meta-training step")
        axis.grid(alpha=0.3)
    z_axis.legend(fontsize=7)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    print(f"Wrote {output}")


def plot_runs(runs: dict[str, list[dict]], output: Path) -> None:
    panels = ("loss", "phi magnitude", "per-site mean z", "per-site mean s", "phi gradient norm")
    figure, axes = plt.subplots(len(panels), len(runs), figsize=(4.5 * len(runs), 2.6 * len(panels)), squeeze=False,
                                sharex="col")
    for column, (label, rows) in enumerate(runs.items()):
        loss, magnitude, noise, scale, grad = axes[:, column]
        for key in ("train_loss", "valid_loss"):
            loss.plot(*_series(rows, key), label=key)
        for group in PHI_GROUPS:
            magnitude.plot(*_series(rows, f"phi/mean_abs_{group}"), label=group)
            grad.plot(*_series(rows, f"phi/grad_norm_{group}"), label=group)
        sites = sorted({key.split("/")[0] for row in rows for key in row if key.startswith("site")},
                       key=lambda name: int(name[4:]))
        noise.plot(*_series(rows, "mean_z"), color="black", linewidth=2, label="all sites")
        scale.plot(*_series(rows, "mean_s"), color="black", linewidth=2, label="all sites")
        for site in sites:
            noise.plot(*_series(rows, f"{site}/mean_z"), label=site)
            scale.plot(*_series(rows, f"{site}/mean_s"), label=site)
        noise.axhline(0.8060, color="grey", linestyle=":", linewidth=1)  # E[softplus(ε)]: μ = 0, no input dependence
        if any(key.startswith("phi/") for row in rows for key in row):  # older logs have no φ statistics
            magnitude.set_yscale("log")
            grad.set_yscale("log")
        loss.set_title(label)
        axes[-1, column].set_xlabel("meta-training step")
        for axis, name in zip(axes[:, column], panels):
            axis.set_ylabel(name)
            axis.grid(alpha=0.3)
        for axis in (loss, magnitude, grad):
            axis.legend(fontsize=6, ncol=2)
        for axis in (noise, scale):
            axis.legend(fontsize=6, ncol=3)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    print(f"Wrote {output}")


def _rounded(value):
    return [round(item, 4) for item in value] if isinstance(value, list) else round(value, 4)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="meta-training output folders or metrics .jsonl files")
    parser.add_argument("--labels", help="comma-separated column titles (default: the folder names)")
    parser.add_argument("--output", type=Path, default=Path("meta_training_curves.png"))
    numbers = parser.add_mutually_exclusive_group()  # either prints numbers instead of plotting
    numbers.add_argument("--gradient-medians",
                         help="comma-separated step bounds: print median gradient norms per window")
    numbers.add_argument("--sizes", help="comma-separated logged steps: print φ's group sizes and per-site z range")
    numbers.add_argument("--overlay", action="store_true",
                         help="one figure: noise-generator size and highest per-site z, one line per run")
    parser.add_argument("--max-step", type=int, help="with --overlay: plot steps up to this one only")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [Path(run).name for run in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"{len(labels)} labels for {len(args.runs)} runs")
    runs = {label: read_metrics(run) for label, run in zip(labels, args.runs)}
    if args.gradient_medians:
        bounds = [int(step) for step in args.gradient_medians.split(",")]
        for label, rows in runs.items():
            for window in gradient_medians(rows, bounds):
                print(json.dumps({"run": label, **window}))
    elif args.sizes:
        steps = [int(step) for step in args.sizes.split(",")]
        for label, rows in runs.items():
            for size in sizes_at(rows, steps):
                print(json.dumps({"run": label, **{key: _rounded(value) for key, value in size.items()}}))
    elif args.overlay:
        plot_overlay(runs, args.output, args.max_step)
    else:
        plot_runs(runs, args.output)


if __name__ == "__main__":
    main()
