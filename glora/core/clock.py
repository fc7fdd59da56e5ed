"""Seconds spent on a piece of work across every session that ran it.

A stage that is killed and run again reports the time of both sessions, not the last one's alone. Each clock keeps
its total in a small JSON file next to the work; ``save_clocks()`` writes every running clock's total, and the
trainer calls it after each checkpoint and the search after each generation, so a killed session's time counts
up to its last saved point (the work after it is lost and its time is counted again when it is redone)."""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

from . import dist
from .io import atomic_write_json

_running: list["Clock"] = []


def read_seconds(path: Path) -> float:
    """The total a clock file holds; 0 for a missing or unreadable one (a run made before clocks were kept)."""
    try:
        t = json.loads(Path(path).read_text()).get("time_s", 0.0)
    except (OSError, ValueError, AttributeError):
        return 0.0
    return float(t) if isinstance(t, (int, float)) and math.isfinite(t) and t >= 0 else 0.0


class Clock:
    def __init__(self, path: Path, resume: bool):
        self.path = Path(path)
        self.before = dist.agree(read_seconds(self.path)) if resume else 0.0  # rank 0's reading for every rank
        self.t0 = time.time()

    def seconds(self) -> float:
        """Earlier sessions' seconds plus this one's so far."""
        return self.before + time.time() - self.t0

    def save(self) -> None:
        if dist.is_main():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, {"time_s": round(self.seconds(), 1)})


@contextlib.contextmanager
def running_clock(path: Path, resume: bool):
    """A clock kept in ``path`` while the block runs: ``resume`` adds the seconds it already holds, otherwise it
    starts from zero. The file is written when the block ends without an error and at each ``save_clocks()``."""
    clock = Clock(path, resume)
    _running.append(clock)
    try:
        yield clock
        clock.save()
    finally:
        _running.remove(clock)


def save_clocks() -> None:
    for clock in _running:
        clock.save()
