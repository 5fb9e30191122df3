"""Checkpoint folders that are either complete or absent: written under a temporary name, then renamed."""

import os
import re
import shutil
from pathlib import Path

import torch

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_path(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"checkpoint-{step}"


def staging_path(root: str | os.PathLike, step: int) -> Path:
    """Where a checkpoint is written before it is published; a crash leaves only this behind."""
    return Path(root) / f".checkpoint-{step}.partial"


def fresh_staging(root: str | os.PathLike, step: int) -> Path:
    """An empty staging folder for `step`: whatever a killed write left there is removed first."""
    staging = staging_path(root, step)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def publish(root: str | os.PathLike, step: int, keep: int = 2) -> Path:
    """Atomically rename the staged checkpoint into place and drop all but the newest `keep`."""
    final = checkpoint_path(root, step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging_path(root, step), final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Published checkpoints, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def save_file_atomically(obj, path: Path) -> None:
    """torch.save to a temporary name, then rename, so a reader never sees half a file."""
    temporary = path.with_name(path.name + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def load_error_reason(error: Exception) -> str:
    """What went wrong in a load, without torch's advice to retry a refused pickle with weights_only=False (which
    would run whatever the file carries)."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    elif text.startswith("Weights only load failed"):
        text = text.partition("\n")[2]
    else:
        return text or type(error).__name__
    boilerplate = ("Check the documentation", "Please file an issue")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(boilerplate)]
    return f"not unpickled: {lines[0]}" if lines else "not unpickled"


def load_trusted(path: Path):
    """Load a checkpoint file of tensors and plain containers; never unpickles arbitrary objects."""
    return torch.load(path, map_location="cpu", weights_only=True)
