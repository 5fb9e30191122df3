"""meta_training.json: how a φ was meta-trained (source, tasks, hyper-parameters, final metrics), saved beside its
weights; model cards and selection read it."""

import json
from pathlib import Path

META_TRAINING_FILE = "meta_training.json"

# The MetaTrainingConfig fields a record keeps, in this order.
_CONFIG_FIELDS = ("batch_size", "learning_rate", "weight_decay", "phi_weight_decay", "phi_weight_decay_mode",
                  "phi_weight_decay_start", "phi_init_std", "phi_init_average", "phi_init_from", "image_size",
                  "lookahead", "seed")


def build_record(config, tasks, steps: int, num_processes: int, wall_seconds: float, final_metrics: dict) -> dict:
    """The record of a run of `config` over `tasks` that stopped after `steps` steps."""
    architectures = config.architectures
    return {
        "source_dataset": config.source,
        "num_tasks": len(tasks),
        "classes_per_task": [len(task.classes) for task in tasks],
        "tasks": [{"task_id": t.task_id, "group": t.group, "classes": t.classes,
                   "architecture": architectures[t.task_id % len(architectures)]} for t in tasks],
        "architectures": architectures,
        "steps": steps,
        **{name: getattr(config, name) for name in _CONFIG_FIELDS},
        "num_processes": num_processes,
        "mixed_precision": config.mixed_precision,
        "wall_seconds_this_run": round(wall_seconds, 1),
        "final_metrics": final_metrics,
    }


def write_record(folder: str | Path, record: dict) -> Path:
    path = Path(folder) / META_TRAINING_FILE
    path.write_text(json.dumps(record, indent=2))
    return path


def read_record(folder: str | Path) -> dict:
    """The record saved in `folder`, or {} when there is none."""
    path = Path(folder) / META_TRAINING_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
