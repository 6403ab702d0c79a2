"""What every stage of :mod:`benchmarks.gpu_evidence` shares: its time cap and its record on disk.

A stage runs in its own process under a hard cap (the orchestrator kills it there) and a soft deadline a
little before it (the stage starts no new measurement after it and says ``"cut"``). After every finished
unit of work it rewrites its JSON record atomically, so a stage killed at its cap leaves everything it
finished, readable.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

#: Stage statuses: ran everything / stopped at its soft deadline / an error stopped it (the orchestrator adds
#: ``killed``, the hard cap, and ``crashed``, an exit without a record).
STATUSES = ("complete", "cut", "failed", "killed", "crashed", "not run")


def soft_margin_s(cap_s: float) -> float:
    """Seconds before the hard cap at which a stage stops starting new work."""
    return min(20.0, max(2.0, 0.1 * cap_s))


class StageClock:
    """The soft deadline of a stage that may run ``cap_s`` seconds from now."""

    def __init__(self, cap_s: float) -> None:
        self.start = time.perf_counter()
        self.cap_s = cap_s
        self.soft_s = max(0.0, cap_s - soft_margin_s(cap_s))

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        """Seconds left before the soft deadline (negative once past it)."""
        return self.soft_s - self.elapsed()

    def expired(self) -> bool:
        return self.left() <= 0


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` to ``path`` atomically (a reader, or a kill, never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """The record at ``path``, or None when the stage never wrote one."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
