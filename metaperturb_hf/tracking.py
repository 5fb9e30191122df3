"""An accelerate tracker that needs nothing installed: one JSON object per logged step."""

import json
from pathlib import Path

from accelerate.tracking import GeneralTracker


class JsonlTracker(GeneralTracker):
    """Appends `{"step": ..., **values}` lines to `<logging_dir>/<run_name>/metrics.jsonl`; the config goes to `config.json`."""

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
