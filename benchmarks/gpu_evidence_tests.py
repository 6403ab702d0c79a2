"""Stage 1 of :mod:`benchmarks.gpu_evidence`: the CUDA subset of the test suite, and the pytest plugin that
selects it and records every result as it comes.

The subset is every test marked ``gpu`` and every parametrisation that takes the ``device`` fixture (on a
GPU: CUDA tensors through the compiled kernels; the tests compare values and gradients with the fp64
reference in every dtype they list, bf16 and fp16 among them), except the torch fallback's (``backend ==
"torch"``: CPU tensors only). Which files hold such tests is read from their source, so new tests join by
themselves. Each result is appended to a JSON-lines file the moment it is known, so a run killed at its
time cap keeps what finished.

Loaded into pytest as ``-p benchmarks.gpu_evidence_tests`` with ``--evidence-jsonl PATH`` (and, for the
dry run, ``--evidence-limit K``: the first test of K test functions, round-robin over the files).
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
_CUDA_TEST = re.compile(r"@pytest\.mark\.gpu\b|def test_\w+\([^)]*\bdevice\b", re.S)
#: Characters of a failure's report kept in the record.
_LONGREPR_CHARS = 1500


def cuda_test_files(root: Path = ROOT) -> list[str]:
    """The test files that hold CUDA tests (a ``gpu`` mark, or a test taking ``device``), repo-relative."""
    return [
        str(p.relative_to(root))
        for p in sorted((root / "tests").glob("test_*.py"))
        if _CUDA_TEST.search(p.read_text())
    ]


def stage_command(jsonl: Path, *, limit: int | None = None, workers: int = 0) -> list[str]:
    """The pytest command line of the stage (run from the repository root)."""
    cmd = [sys.executable, "-m", "pytest", *cuda_test_files(), "-q", "-p", "no:cacheprovider"]
    cmd += ["-p", "benchmarks.gpu_evidence_tests", "--evidence-jsonl", str(jsonl)]
    cmd += ["--continue-on-collection-errors", "-o", "addopts=", "--durations=10"]
    if limit is not None:
        cmd += ["--evidence-limit", str(limit)]
    if workers > 1:
        cmd += ["-n", str(workers)]
    return cmd


# --- the pytest plugin ---------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gpu-evidence")
    group.addoption("--evidence-jsonl", default=None, help="append one JSON line per test result here")
    group.addoption("--evidence-limit", type=int, default=None, help="keep one test of K functions")


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _append(config: pytest.Config, record: dict[str, Any]) -> None:
    path = config.getoption("evidence_jsonl")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _on_cuda_path(item: pytest.Item) -> bool:
    if item.get_closest_marker("gpu") is not None:
        return True
    if "device" not in getattr(item, "fixturenames", ()):
        return False
    params = getattr(getattr(item, "callspec", None), "params", {})
    return params.get("backend") != "torch"


def _sample(items: list[pytest.Item], limit: int) -> list[pytest.Item]:
    """The first parametrisation of ``limit`` test functions, taken round-robin over the files (the first
    function of every file, then the second, ...)."""
    per_file: dict[str, dict[str, pytest.Item]] = {}
    for item in items:
        path, _, name = item.nodeid.split("[")[0].partition("::")
        per_file.setdefault(path, {}).setdefault(name, item)
    columns = [list(functions.values()) for functions in per_file.values()]
    rounds = max((len(c) for c in columns), default=0)
    ordered = [c[i] for i in range(rounds) for c in columns if i < len(c)]
    return ordered[:limit]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("evidence_jsonl"):
        return
    keep = [item for item in items if _on_cuda_path(item)]
    limit = config.getoption("evidence_limit")
    if limit is not None:
        keep = _sample(keep, limit)
    kept = set(keep)
    dropped = [item for item in items if item not in kept]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep
    # with xdist every worker collects: the first one speaks for all
    if not _is_worker(config) or config.workerinput.get("workerid") == "gw0":  # type: ignore[attr-defined]
        _append(config, {"selected": len(keep), "deselected": len(dropped)})


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    config = _CONFIG.get("config")
    if config is None or _is_worker(config):
        return
    failed_setup = report.when in ("setup", "teardown") and report.outcome != "passed"
    if report.when != "call" and not failed_setup:
        return
    outcome = report.outcome if report.when == "call" or report.outcome == "skipped" else "error"
    record: dict[str, Any] = {
        "nodeid": report.nodeid,
        "outcome": outcome,
        "when": report.when,
        "duration_s": round(report.duration, 3),
    }
    if report.outcome != "passed":
        record["message"] = str(report.longrepr)[-_LONGREPR_CHARS:]
    _append(config, record)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    config = _CONFIG.get("config")
    if report.failed and config is not None and not _is_worker(config):
        _append(config, {"collect_error": report.nodeid, "message": str(report.longrepr)[-_LONGREPR_CHARS:]})


_CONFIG: dict[str, pytest.Config] = {}


def pytest_configure(config: pytest.Config) -> None:
    _CONFIG["config"] = config


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _is_worker(session.config):
        _append(session.config, {"exitstatus": int(exitstatus)})


# --- reading the record --------------------------------------------------------------------------------


def summarise(jsonl: Path) -> dict[str, Any]:
    """Counts, failures and the slowest tests from the JSON lines written so far; ``finished`` says
    whether pytest reached its end (False: it was killed at the cap or crashed)."""
    lines = []
    if jsonl.exists():
        for line in jsonl.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:  # a line cut by a kill
                continue
    results = [r for r in lines if "nodeid" in r]
    counts = Counter(r["outcome"] for r in results)
    selected = next((r["selected"] for r in lines if "selected" in r), None)
    exit_status = next((r["exitstatus"] for r in lines if "exitstatus" in r), None)
    return {
        "selected": selected,
        "ran": len(results),
        "passed": counts.get("passed", 0),
        "failed": counts.get("failed", 0),
        "errors": counts.get("error", 0),
        "skipped": counts.get("skipped", 0),
        "finished": exit_status is not None,
        "exitstatus": exit_status,
        "collect_errors": [r for r in lines if "collect_error" in r],
        "failures": [r for r in results if r["outcome"] in ("failed", "error")],
        "skips": sorted({r.get("message", "")[-200:] for r in results if r["outcome"] == "skipped"}),
        "slowest": sorted(results, key=lambda r: -r["duration_s"])[:10],
        "files": cuda_test_files(),
    }
