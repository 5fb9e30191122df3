"""JsonlTracker: one JSON line per logged step, and a resumed run's log reads as one run."""

import json

from metaperturb_hf.tracking import JsonlTracker


def steps_logged(tracker):
    return [json.loads(line)["step"] for line in tracker.path.read_text().splitlines()]


def test_drop_after_forgets_the_steps_a_resumed_run_logs_again(tmp_path):
    tracker = JsonlTracker("logs", tmp_path)
    for step in (5, 10, 15, 20):
        tracker.log({"loss": float(step)}, step=step)
    tracker.drop_after(10)  # resumed from the checkpoint of step 10
    for step in (15, 20):
        tracker.log({"loss": -float(step)}, step=step)
    assert steps_logged(tracker) == [5, 10, 15, 20]
    assert json.loads(tracker.path.read_text().splitlines()[-1])["loss"] == -20.0


def test_drop_after_drops_a_line_cut_short_by_a_kill(tmp_path):
    tracker = JsonlTracker("logs", tmp_path)
    tracker.log({"loss": 1.0}, step=5)
    with tracker.path.open("a") as f:
        f.write('{"step": 10, "lo')
    tracker.drop_after(10)
    assert steps_logged(tracker) == [5]


def test_drop_after_without_a_log_does_nothing(tmp_path):
    tracker = JsonlTracker("logs", tmp_path)
    tracker.drop_after(3)
    assert not tracker.path.exists()
