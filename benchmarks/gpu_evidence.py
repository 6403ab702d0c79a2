"""GPU evidence in one prepared run: correctness on CUDA, then ours against torch, TRL, Liger and CCE (op,
step and trainer), with records, tables and plots.

Usage::

    bash benchmarks/gpu_evidence.sh                        # on the lent GPU (installs carried wheels first)
    python -m benchmarks.gpu_evidence --out DIR            # the same, wheels already importable
    python -m benchmarks.gpu_evidence --dry-run --out DIR  # every stage on the CPU at tiny shapes (CI)

Stages, each in its own process under its own time cap (a stage stops starting new work a little before its
cap and is killed at it; what it finished is on disk either way, and the report is written regardless):

1. ``tests`` (≤ 90 s): the CUDA subset of the test suite against the fp64 reference
   (:mod:`benchmarks.gpu_evidence_tests`);
2. ``ops`` (≤ 170 s): forward, forward+backward and the WPO step at two real heads, N = 1k/4k/16k, bf16, for
   every implementation, each checked before it is timed; the cuBLAS floors
   (:mod:`benchmarks.gpu_evidence_ops`);
3. ``trainer`` (≤ 65 s): ``WPOTrainer`` against ``DPOTrainer`` (weighting; Liger) on a real head
   (:mod:`benchmarks.gpu_evidence_trainer`).

Writes under ``--out`` at most 7 files (the device tool brings back 8): ``<tag>-evidence-<date>.json`` (all
of it), ``.md`` (tables), ``-forward.png``, ``-forward_backward.png``, ``-step.png``, ``-trainer.png``; the
wrapper adds ``run.log``. The summary table is printed last. Exit status 0 only when every stage completed,
every test passed and ours and the reference passed their correctness gates (a dry run: also the schema).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks import gpu_evidence_report as report
from benchmarks import gpu_evidence_tests
from benchmarks.gpu_evidence_stage import read_json, soft_margin_s

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("tests", "ops", "trainer")
#: Hard caps in seconds on a GPU, and the whole run's (the wrapper's wheel install comes on top: ~15 s).
CAPS = {"tests": 90.0, "ops": 170.0, "trainer": 65.0}
TOTAL_S = 335.0
#: The dry run's caps: generous, for a busy 2-core CI machine (it takes about a minute when idle).
DRY_CAPS = {"tests": 150.0, "ops": 300.0, "trainer": 200.0}
DRY_TOTAL_S = 700.0
#: Seconds kept at the end for the report (tables, plots).
REPORT_RESERVE_S = 10.0
#: Tests the dry run runs: one from each of this many test functions (round-robin over the files).
DRY_TEST_LIMIT = 4
#: Seconds between SIGTERM and SIGKILL when a stage reaches its cap.
KILL_GRACE_S = 3.0
VERSIONED = (
    "torch",
    "triton",
    "trl",
    "liger-kernel",
    "cut-cross-entropy",
    "transformers",
    "accelerate",
    "peft",
    "datasets",
    "tokenizers",
    "numpy",
    "pytest",
    "pytest-xdist",
    "wpo-kernels",
)
_FINGERPRINTED = ("wpo_kernels", "integration", "benchmarks", "tests")


def log(msg: str) -> None:
    print(msg, flush=True)


def run_capped(cmd: list[str], cap_s: float, env: dict[str, str]) -> tuple[int | None, float]:
    """Run ``cmd`` from the repository root for at most ``cap_s`` seconds; ``(exit status or None if it
    was killed at the cap, wall seconds)``. The child and everything it started (pytest-xdist workers)
    are one process group, ended together."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        rc: int | None = proc.wait(timeout=max(cap_s, 0.1))
    except subprocess.TimeoutExpired:
        rc = None
        for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
    return rc, time.perf_counter() - start


def child_env(dry_run: bool) -> dict[str, str]:
    """The stages' environment: the checkout first on the path; the Triton interpreter and no visible GPU
    in a dry run, neither on a real one (``TRITON_INTERPRET`` must be decided before triton is imported)."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def _xdist_workers(dry_run: bool) -> int:
    """pytest-xdist workers for the tests stage: Triton compiles in parallel across them (0: serial)."""
    if dry_run or importlib.util.find_spec("xdist") is None:
        return 0
    return max(0, min(8, (os.cpu_count() or 2) // 2))


def stage_tests(parts: Path, cap_s: float, dry_run: bool, env: dict[str, str]) -> dict[str, Any]:
    """Stage 1: pytest on the CUDA subset, killed at the cap; the record from its JSON lines."""
    jsonl = parts / "tests.jsonl"
    jsonl.unlink(missing_ok=True)
    workers = _xdist_workers(dry_run)
    cmd = gpu_evidence_tests.stage_command(jsonl, limit=DRY_TEST_LIMIT if dry_run else None, workers=workers)
    rc, wall = run_capped(cmd, cap_s, env)
    record = gpu_evidence_tests.summarise(jsonl)
    if rc is None:
        status = "killed"
    elif not record["finished"]:
        status = "crashed"
    else:
        status = "complete"
    record.update(stage="tests", status=status, returncode=rc, wall_s=round(wall, 1), cap_s=cap_s)
    record.update(workers=workers, limit=DRY_TEST_LIMIT if dry_run else None)
    return record


def stage_python(name: str, parts: Path, cap_s: float, dry_run: bool, env: dict[str, str]) -> dict[str, Any]:
    """Stages 2 and 3: ``python -m benchmarks.gpu_evidence_<name>``, killed at the cap; its record."""
    path = parts / f"{name}.json"
    path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", f"benchmarks.gpu_evidence_{name}", "--record", str(path)]
    cmd += ["--cap-s", str(cap_s)] + (["--dry-run"] if dry_run else [])
    rc, wall = run_capped(cmd, cap_s, env)
    record = read_json(path) or {"stage": name, "rows": []}
    if rc is None:
        record["status"] = "killed"
    elif record.get("status") in (None, "running"):
        record["status"] = "crashed"
    record.update(returncode=rc, wall_s=round(wall, 1), cap_s=cap_s)
    return record


def _nvidia_smi() -> dict[str, str] | None:
    if shutil.which("nvidia-smi") is None:
        return None
    fields = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit"
    try:
        out = (
            subprocess.run(
                ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=15,
                check=True,
            )
            .stdout.strip()
            .splitlines()[0]
        )
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
    return dict(zip(fields.split(","), (v.strip() for v in out.split(",")), strict=False))


def code_fingerprint() -> dict[str, Any]:
    """Which code ran: the git commit where the checkout has one, and a hash of every ``.py`` file of the
    package, integration, benchmarks and tests (the device machine's copy may have no ``.git``)."""
    digest = hashlib.sha256()
    files = sorted(
        p for d in _FINGERPRINTED for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts
    )
    for p in files:
        digest.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes())
    commit = None
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        pass
    return {"sha256": digest.hexdigest()[:16], "files": len(files), "git_commit": commit}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def run_meta(dry_run: bool, date: str | None) -> dict[str, Any]:
    """What the orchestrator knows without touching the GPU (the ops stage adds the device's own view)."""
    return {
        "date": date or datetime.date.today().isoformat(),
        "started_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "dry_run": dry_run,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {d: _version(d) for d in VERSIONED},
        "nvidia_smi": _nvidia_smi(),
        "code": code_fingerprint(),
        "wheels_dir": os.environ.get("WPO_EVIDENCE_WHEELS"),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_evidence", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--out", type=Path, required=True, help="output folder (on the device machine: $OUT)")
    ap.add_argument("--dry-run", action="store_true", help="every stage on the CPU at tiny shapes")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument(
        "--cap", action="append", default=[], metavar="STAGE=SECONDS", help="override a stage's time cap"
    )
    ap.add_argument("--total-s", type=float, help="cap of the whole run (default 335 on a GPU, 700 dry)")
    ap.add_argument("--date", help="date in file names and header (default: today)")
    ap.add_argument("--keep-parts", action="store_true", help="keep the stages' raw records (DIR/parts)")
    args = ap.parse_args(argv)
    caps = dict(DRY_CAPS if args.dry_run else CAPS)
    for item in args.cap:
        stage, _, seconds = item.partition("=")
        if stage not in STAGES or not seconds:
            ap.error(f"--cap takes STAGE=SECONDS with STAGE among {STAGES}, got {item!r}")
        caps[stage] = float(seconds)
    args.caps = caps
    if args.total_s is None:
        args.total_s = DRY_TOTAL_S if args.dry_run else TOTAL_S
    return args


def run_stages(args: argparse.Namespace, parts: Path, start: float) -> dict[str, dict[str, Any]]:
    """Every stage in order, each capped by its own cap and by what is left of the whole run."""
    env = child_env(args.dry_run)
    records: dict[str, dict[str, Any]] = {}
    for name in STAGES:
        if name not in args.stages:
            records[name] = {"stage": name, "status": "not run", "reason": "not asked for (--stages)"}
            continue
        left = args.total_s - REPORT_RESERVE_S - (time.perf_counter() - start)
        cap = min(args.caps[name], left)
        if cap < min(args.caps[name], soft_margin_s(cap) + 1):
            records[name] = {"stage": name, "status": "not run", "reason": "no time left in the run's cap"}
            continue
        log(f"\n=== stage {name}: cap {cap:.0f} s (at {time.perf_counter() - start:.0f} s)")
        if name == "tests":
            records[name] = stage_tests(parts, cap, args.dry_run, env)
        else:
            records[name] = stage_python(name, parts, cap, args.dry_run, env)
        log(f"=== stage {name}: {records[name]['status']} in {records[name]['wall_s']:.0f} s")
    return records


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    parts = args.out / "parts"
    parts.mkdir(exist_ok=True)
    meta = run_meta(args.dry_run, args.date)
    if not args.dry_run and meta["nvidia_smi"] is None:
        log("no GPU answers nvidia-smi: nothing to measure (on a CPU, use --dry-run)")
        return 2
    log(f"GPU evidence{' (dry run, CPU)' if args.dry_run else ''}: code {meta['code']}, {meta['versions']}")
    stages = run_stages(args, parts, start)
    evidence = report.assemble(meta, stages, caps=args.caps, total_s=args.total_s)
    evidence["meta"]["wall_s"] = round(time.perf_counter() - start, 1)
    problems = report.check_schema(evidence, require_all=args.dry_run)
    evidence["schema_problems"] = problems
    paths = report.write_outputs(evidence, args.out)
    if not args.keep_parts:
        shutil.rmtree(parts, ignore_errors=True)
    log("\nwrote " + ", ".join(p.name for p in paths) + f" in {args.out}")
    for p in problems:
        log(f"SCHEMA: {p}")
    failures = report.failures(evidence)
    for f in failures:
        log(f"FAILED: {f}")
    log("\n" + report.summary_text(evidence))
    return 1 if failures or problems else 0


if __name__ == "__main__":
    sys.exit(main())
