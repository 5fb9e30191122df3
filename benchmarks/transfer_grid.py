r"""Run a transfer grid (targets × networks × methods × seeds), one JSON line per finished run, and tabulate it.

    python benchmarks/transfer_grid.py --name tin_transfer \
        --targets cifar10=../shared/data/cifar10_32:50,cub=../shared/data/cub200_2011_first50_32 \
        --archs conv4,resnet20,vgg9 --methods none,metaperturb,dropout,dropblock,manifold_mixup,info_dropout \
        --perturbations tin-conv4=hub_cards/metaperturb-tin-conv4,tin-resnet20=hub_cards/metaperturb-tin-resnet20 \
        --seeds 0,1,2 --steps 1000 [--shard 0/2]

A target is NAME=PATH[:TRAIN_PER_CLASS]. MetaPerturb gives two records: MC over --mc-samples, and the single pass (its
statistics chosen by agreement with MC on augmented training images among blends of calibrated and trained ones, those
matched to the noise-averaged features and those fitted to MC's softmax; with the accuracy of every candidate,
`accuracy_by_weight`, and that of the classifier alone calibrated without noise, `noise_off_calibrated_accuracy`).
Every finished run appends its records to benchmarks/results/<name>.jsonl; a rerun skips what is there, so an
interrupted grid resumes and two shards (`--shard 0/2`, `--shard 1/2`) can run side by side.
`--placements all,top:6,bottom:6,top_bottom:3` repeats each MetaPerturb column with φ at those sites only (the paper's
location ablation), named "SOURCE @top:6"; `--noise-strengths 1,0.5` with a weaker perturbation (κ annealed to 0.5
instead of 1), named "SOURCE κ=0.5". `--report` (also done after every grid) writes <name>.md (mean ± 95 % CI per
cell, best per row in bold) and <name>.png.

Workers sharing a machine (benchmarks/gpu_grid.sh: many small runs on one GPU) pass the same `--claims DIR`, so each
run goes to the first worker that claims it, and `--time-budget-s` so none starts a run it would not finish in
time; `--merge FILE ...` adds the records made on another machine, skipping runs already here.
"""

import argparse
import itertools
import math
import os
import statistics
import time
from pathlib import Path

import torch
from grid_work import Budget, RunClaims, append_records, merge_records  # this folder is on sys.path as a script

from metaperturb_hf import load_perturbation
from metaperturb_hf.data import load_image_dataset, subsample_per_class, to_tensors
from metaperturb_hf.hub import variant_source
from metaperturb_hf.methods import run_transfer
from metaperturb_hf.perturbation_config import PerturbationConfig
from metaperturb_hf.results import (
    accuracy_cells,
    confidence_interval,
    key_of,
    load_records,
    markdown_table,
    table_layout,
)
from metaperturb_hf.transfer import TransferConfig

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def parse_targets(spec: str) -> dict:
    targets = {}
    for item in spec.split(","):
        name, _, location = item.partition("=")
        path, _, per_class = location.partition(":")
        if not name or not path:
            raise ValueError(f"Target {item!r} is not NAME=PATH[:TRAIN_PER_CLASS].")
        targets[name] = (path, int(per_class) if per_class else None)
    return targets


def parse_pairs(spec: str | None) -> dict:
    """NAME=VALUE,... as a dict (φ sources, source networks)."""
    return dict(item.split("=", 1) for item in spec.split(",")) if spec else {}


def parse_placement(spec: str) -> dict:
    """"all" as {}, "top:6" as {"select": "top", "num_sites": 6}; PerturbationConfig checks the values."""
    if spec == "all":
        return {}
    select, _, count = spec.partition(":")
    if not count.isdigit():
        raise ValueError(f"a placement is 'all' or SELECT:N (top:3, bottom:3, top_bottom:2), got {spec!r}.")
    placement = {"select": select, "num_sites": int(count)}
    PerturbationConfig(**placement)
    return placement


def planned_runs(args) -> list[dict]:
    """Every (target, arch, method, source, seed) cell of the grid, as the key its record will carry. A placement
    other than all sites, or a noise strength below 1, is part of the MetaPerturb run's source ("authors @top:6",
    "authors κ=0.5"), so each is a column of its own."""
    runs = []
    placements = args.placements.split(",")
    for spec in placements:
        parse_placement(spec)  # refuse a bad one before any run
    strengths = [float(value) for value in args.noise_strengths.split(",")]
    for strength in strengths:
        TransferConfig(noise_strength=strength)
    for target, (_, per_class) in parse_targets(args.targets).items():
        for arch in args.archs.split(","):
            for method in args.methods.split(","):
                sources = list(parse_pairs(args.perturbations)) if method == "metaperturb" else ["-"]
                if method == "metaperturb" and not sources:
                    raise ValueError("method metaperturb needs --perturbations SOURCE=PATH[,SOURCE=PATH].")
                variants = itertools.product(placements, strengths) if method == "metaperturb" else [("all", 1.0)]
                for source, (placement, strength) in itertools.product(sources, variants):
                    label = variant_source(source, placement, strength)
                    for seed in (int(s) for s in args.seeds.split(",")):
                        runs.append({"source": label, "phi": source, "placement": placement,
                                     "noise_strength": strength, "target": target, "arch": arch, "method": method,
                                     "seed": seed, "steps": args.steps, "train_per_class": per_class})
    return runs


def finished(path: Path) -> tuple[list[dict], set]:
    records = load_records(path)
    return records, {key_of(record) for record in records}


def run_grid(args) -> None:
    path = Path(args.results_dir) / f"{args.name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    _, done = finished(path)
    shard, shards = (int(x) for x in args.shard.split("/"))
    todo = [run for i, run in enumerate(planned_runs(args)) if i % shards == shard and key_of(run) not in done]
    print(f"{len(todo)} runs to do in shard {shard}/{shards} ({len(done)} finished already)", flush=True)
    claims, budget = RunClaims(args.claims) if args.claims else None, Budget(args.time_budget_s)
    targets, perturbations, cache = parse_targets(args.targets), parse_pairs(args.perturbations), {}
    source_networks = parse_pairs(args.source_networks)
    missing = {run["arch"] for run in todo if run["method"] == "finetune"} - set(source_networks)
    if missing:
        raise ValueError(f"finetune needs a source-trained network for {', '.join(sorted(missing))}: pass "
                         "--source-networks ARCH=STATE_DICT (train one with examples/transfer.py --save-model).")
    for index, run in enumerate(todo, 1):
        if not budget.allows_another():
            print("time budget spent: the runs left wait for the next session", flush=True)
            break
        if claims and not claims.claim(key_of(run)):
            continue
        started = time.monotonic()
        data_path, per_class = targets[run["target"]]
        if data_path not in cache:
            cache = {data_path: [to_tensors(load_image_dataset(data_path, split)) for split in ("train", "test")]}
        train, test = cache[data_path]
        if per_class:
            train = subsample_per_class(train, per_class, run["seed"])
        source, spec = run.pop("phi"), run.pop("placement")
        placement = parse_placement(spec)
        if placement:  # records of all sites stay as they were before placements existed
            run["placement"] = spec
        strength = run.pop("noise_strength")  # run_transfer's records carry it where it is below 1
        phi = load_perturbation(perturbations[source]) if run["method"] == "metaperturb" else None
        init_from = source_networks.get(run["arch"]) if run["method"] == "finetune" else None
        config = TransferConfig(steps=args.steps, batch_size=args.batch_size, seed=run["seed"],
                                noise_strength=strength)
        records = run_transfer(run["method"], run["arch"], train, test, config, phi, args.mc_samples, init_from,
                               placement=placement, device=args.device)
        append_records(path, [{**run, **record, "mc_samples": record["num_samples"]} for record in records])
        budget.record(time.monotonic() - started)
        print(f"[{index}/{len(todo)}] {run['target']} {run['arch']} {run['method']} {run['source']} "
              f"seed {run['seed']}: "
              + ", ".join(f"{r['method']} {100 * r['accuracy']:.2f}" for r in records), flush=True)


def report(name: str, results_dir: Path = RESULTS) -> str:
    """Write <name>.md (the table of metaperturb_hf.results.markdown_table) and <name>.png; return the table."""
    results_dir = Path(results_dir)
    records, _ = finished(results_dir / f"{name}.jsonl")
    if not records:
        raise ValueError(f"No records in {results_dir / f'{name}.jsonl'} yet.")
    table = markdown_table(records)
    (results_dir / f"{name}.md").write_text(table)
    cells = accuracy_cells(records)
    plot(cells, *table_layout(cells), results_dir / f"{name}.png")
    return table


def plot(cells, rows, columns, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) * len(columns) / 3), 4))
    width = 0.8 / len(columns)
    for i, column in enumerate(columns):
        means = [statistics.mean(cells[(t, a, column)]) if cells.get((t, a, column)) else 0 for t, a in rows]
        errors = [confidence_interval(cells[(t, a, column)]) if cells.get((t, a, column)) else 0 for t, a in rows]
        positions = [r + (i - len(columns) / 2 + 0.5) * width for r in range(len(rows))]
        ax.bar(positions, means, width, yerr=[0 if math.isnan(e) else e for e in errors], capsize=2, label=column)
    ax.set_xticks(range(len(rows)), [f"{t}\n{a}" for t, a in rows])
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="results go to <results-dir>/<name>.{jsonl,md,png}")
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument("--targets", help="NAME=PATH[:TRAIN_PER_CLASS],...")
    parser.add_argument("--archs", default="conv4,resnet20")
    parser.add_argument("--methods", default="none,metaperturb")
    parser.add_argument("--perturbations", help="SOURCE=PATH_OR_REPO,... (one metaperturb column per source)")
    parser.add_argument("--placements", default="all",
                        help="where φ goes, one MetaPerturb column per placement and φ: all (every site), or top:N, "
                             "bottom:N, top_bottom:N (the last / first N sites in forward order, or N at each end)")
    parser.add_argument("--noise-strengths", default="1",
                        help="the κ each MetaPerturb run anneals to, one column per value and φ: 1 is the full "
                             "perturbation, 0.5 mixes in the identity half way (a weaker regularizer); given "
                             "explicitly, whatever noise_strength φ's config records, so a column's name says its κ")
    parser.add_argument("--source-networks", help="ARCH=STATE_DICT,... networks trained on the source data (finetune)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--mc-samples", type=int, default=10)
    parser.add_argument("--shard", default="0/1", help="I/N: run every N-th cell starting at I")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0")) or None)
    parser.add_argument("--device", help="where each run trains and is evaluated (cuda, cuda:1; default: cpu)")
    parser.add_argument("--claims", help="a folder shared by workers running the same grid: each run goes to one")
    parser.add_argument("--time-budget-s", type=float,
                        help="start no run that, taking as long as this worker's longest so far, would end later")
    parser.add_argument("--merge", nargs="+", metavar="FILE",
                        help="only add these records (e.g. from a GPU session) for runs <name>.jsonl does not hold")
    parser.add_argument("--no-report", action="store_true", help="skip the table and chart (workers of one grid)")
    parser.add_argument("--report", action="store_true", help="only rebuild the table and chart from the records")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.merge:
        added = merge_records(Path(args.results_dir) / f"{args.name}.jsonl", args.merge)
        print(f"{added} records added to {args.name}.jsonl", flush=True)
    elif not args.report:
        if not args.targets:
            parser.error("--targets is required to run a grid")
        run_grid(args)
    if not args.no_report:
        print(report(args.name, args.results_dir))


if __name__ == "__main__":
    main()
