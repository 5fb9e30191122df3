"""Workers sharing one transfer grid (benchmarks/grid_work.py, transfer_grid.py --claims/--time-budget-s/--merge)."""

import argparse
import json
import multiprocessing

import pytest
from test_examples import BENCHMARKS, load_script, phi_dir, target  # noqa: F401 (fixtures)

grid_work = load_script("grid_work", BENCHMARKS)


def _claim_all(folder, keys, queue):
    claims = grid_work.RunClaims(folder)
    queue.put([key for key in keys if claims.claim(key)])


def test_each_run_is_claimed_by_exactly_one_of_several_processes(tmp_path):
    keys = [("cub", "conv4", "none", "-", seed, 1500, None) for seed in range(200)]
    queue = multiprocessing.get_context("fork").Queue()
    workers = [multiprocessing.get_context("fork").Process(target=_claim_all, args=(tmp_path, keys, queue))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    claimed = [queue.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join()
    assert sorted(key for part in claimed for key in part) == sorted(keys)  # none lost, none twice


def test_budget_starts_no_run_that_would_end_past_it():
    now = [0.0]
    budget = grid_work.Budget(100, clock=lambda: now[0])
    assert budget.allows_another()
    now[0], _ = 30, budget.record(30)
    assert budget.allows_another()  # 30 + 30 < 100
    now[0], _ = 75, budget.record(45)
    assert not budget.allows_another()  # 75 + 45 > 100
    assert grid_work.Budget(None).allows_another()
    assert not grid_work.Budget(0).allows_another()
    with pytest.raises(ValueError, match="at least 0"):
        grid_work.Budget(-1)


def test_merge_adds_only_runs_not_held_and_each_once(tmp_path):
    def record(seed, method="metaperturb", accuracy=0.5):
        return {"source": "phi", "target": "cub", "arch": "conv4", "method": method, "seed": seed, "steps": 10,
                "train_per_class": None, "accuracy": accuracy}

    here, there, again = tmp_path / "here.jsonl", tmp_path / "there.jsonl", tmp_path / "again.jsonl"
    grid_work.append_records(here, [record(0), record(0, "metaperturb_single_pass")])
    grid_work.append_records(there, [record(0, accuracy=0.9), record(1), record(1, "metaperturb_single_pass")])
    grid_work.append_records(again, [record(1, accuracy=0.1), record(2)])
    assert grid_work.merge_records(here, [there, again]) == 3  # seed 1 (MC and single pass) from there, seed 2
    lines = [json.loads(line) for line in here.read_text().splitlines()]
    assert [(r["seed"], r["method"], r["accuracy"]) for r in lines] == [
        (0, "metaperturb", 0.5), (0, "metaperturb_single_pass", 0.5), (1, "metaperturb", 0.5),
        (1, "metaperturb_single_pass", 0.5), (2, "metaperturb", 0.5)]
    assert grid_work.merge_records(here, [there, again]) == 0


def test_grid_workers_skip_claimed_runs_and_stop_at_the_budget(target, phi_dir, tmp_path):  # noqa: F811
    benchmark = load_script("transfer_grid", BENCHMARKS)
    args = ["--name", "shared", "--results-dir", str(tmp_path), "--targets", f"toy={target}:6", "--archs", "conv4",
            "--methods", "none,dropout", "--seeds", "0,1", "--steps", "1", "--batch-size", "8", "--no-report"]
    claims = tmp_path / "claims"
    planned = benchmark.planned_runs(argparse.Namespace(
        targets=f"toy={target}:6", archs="conv4", methods="none,dropout", perturbations=None, placements="all",
        noise_strengths="1", seeds="0,1", steps=1))
    grid_work.RunClaims(claims).claim(benchmark.key_of(planned[0]))  # another worker has the first run
    benchmark.main([*args, "--time-budget-s", "0", "--claims", str(claims)])
    assert not (tmp_path / "shared.jsonl").exists()  # no time: nothing started
    benchmark.main([*args, "--claims", str(claims)])
    records = [json.loads(line) for line in (tmp_path / "shared.jsonl").read_text().splitlines()]
    assert [(r["method"], r["seed"]) for r in records] == [("none", 1), ("dropout", 0), ("dropout", 1)]
    assert not (tmp_path / "shared.md").exists() and "device" not in records[0]
    elsewhere = tmp_path / "elsewhere"
    benchmark.main(["--name", "shared", "--results-dir", str(elsewhere), *args[4:-1]])  # the whole grid elsewhere
    benchmark.main(["--name", "shared", "--results-dir", str(tmp_path), "--merge", str(elsewhere / "shared.jsonl")])
    merged = [json.loads(line) for line in (tmp_path / "shared.jsonl").read_text().splitlines()]
    assert merged[:3] == records and [(r["method"], r["seed"]) for r in merged[3:]] == [("none", 0)]
    assert (tmp_path / "shared.md").exists()
