"""Sharing one transfer grid between worker processes (e.g. many small runs on one GPU): a run belongs to the worker
that claims it first, records are appended under a lock, no run starts past a wall-clock budget, and records
made elsewhere are merged in without doubling a run."""

import fcntl
import hashlib
import json
import os
import time
from pathlib import Path

from metaperturb_hf.results import key_of, load_records


class RunClaims:
    """Creating a file with O_EXCL is atomic on one filesystem, so workers take runs from one list without a
    coordinator. A killed worker's claim stays: a claims folder lives for one session, and a fresh folder resumes
    from the records."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def claim(self, key: tuple) -> bool:
        name = hashlib.sha1(json.dumps(key).encode()).hexdigest()
        try:
            fd = os.open(self.folder / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {json.dumps(key)}\n")
        return True


class Budget:
    """Starts no run that would end past the budget if it took as long as the longest run so far."""

    def __init__(self, seconds: float | None, clock=time.monotonic):
        if seconds is not None and seconds < 0:
            raise ValueError(f"a time budget is at least 0 seconds, got {seconds}.")
        self.clock = clock
        self.deadline = None if seconds is None else clock() + seconds
        self.longest = 0.0

    def allows_another(self) -> bool:
        return self.deadline is None or self.clock() + self.longest < self.deadline

    def record(self, seconds: float) -> None:
        self.longest = max(self.longest, seconds)


def append_records(path: Path, records: list[dict]) -> None:
    """One locked write per run: workers sharing the file never interleave, a killed one leaves no half record."""
    with Path(path).open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write("".join(json.dumps(record) + "\n" for record in records))


def merge_records(path: Path, sources: list[str | Path]) -> int:
    """Append the records of `sources` whose run `path` does not hold yet (a run's records travel together);
    return how many records were added."""
    done, new = {key_of(record) for record in load_records(path)}, []
    for source in sources:
        records = [record for record in load_records(source) if key_of(record) not in done]
        done |= {key_of(record) for record in records}
        new += records
    if new:
        append_records(path, new)
    return len(new)
