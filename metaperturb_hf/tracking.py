"""An accelerate tracker that needs nothing installed: one JSON object per logged step."""

import json
import os
from pathlib import Path

from accelerate.tracking import GeneralTracker


class JsonlTracker(GeneralTracker):
    """Appends `{"step": ..., **values}` lines to `<logging_dir>/<run_name>/metrics.jsonl`; the config goes to
    `config.json`."""

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str | Path):
        super().__init__()
        self.directory = Path(logging_dir) / run_name
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "metrics.jsonl"

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict):
        (self.directory / "config.json").write_text(json.dumps(values, indent=2, default=str))

    def log(self, values: dict, step: int | None = None, **kwargs):
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")

    def drop_after(self, step: int) -> None:
        """Forget the lines of steps after `step`: a run resumed from its checkpoint at `step` logs them again. A line
        a kill cut short is dropped too."""
        if not self.path.is_file():
            return
        logged = [(line, _logged_step(line)) for line in self.path.read_text().splitlines()]
        kept = [line for line, at in logged if at is not None and at <= step]
        staging = self.path.with_suffix(".jsonl.tmp")
        staging.write_text("".join(line + "\n" for line in kept))
        os.replace(staging, self.path)


def _logged_step(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None
