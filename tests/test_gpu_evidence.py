"""The GPU-evidence script without a GPU (``benchmarks/gpu_evidence.py``): its dry run end to end through the
shell wrapper (every stage and provider on the CPU, the output schema, the file count the device tool brings
back), its time caps (a stage cut at its soft deadline or killed at its hard cap keeps what it finished, and
the report is written regardless), and the README's GPU section generated from committed results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_evidence, gpu_evidence_ops
from benchmarks import gpu_evidence_report as report
from benchmarks.gpu_evidence_stage import StageClock, read_json
from benchmarks.gpu_evidence_tests import summarise

ROOT = Path(__file__).resolve().parents[1]
DATE = "2000-01-01"
STEM = f"cpu-dryrun-evidence-{DATE}"


def _orchestrate(out: Path, *args: str, wrapper: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(out), PY=sys.executable, WHEELS=str(out.parent / "no-wheels"))
    if wrapper:
        cmd = ["bash", "benchmarks/gpu_evidence.sh", *args]
    else:
        cmd = [sys.executable, "-m", "benchmarks.gpu_evidence", "--out", str(out), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
def test_dry_run_end_to_end_through_the_wrapper(tmp_path: Path) -> None:
    """``bash benchmarks/gpu_evidence.sh --dry-run``: exit 0, the schema of a real run with timed rows for
    every peer and mode, at most 8 files (what the device tool brings back), the summary printed last."""
    out = tmp_path / "out"
    proc = _orchestrate(out, "--dry-run", "--date", DATE, wrapper=True)
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"

    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    expected = [f"{STEM}{s}" for s in ("-forward.png", "-forward_backward.png", "-step.png", "-trainer.png")]
    assert files == sorted([*expected, f"{STEM}.json", f"{STEM}.md", "run.log"])
    evidence = json.loads((out / f"{STEM}.json").read_text())
    assert report.check_schema(evidence, require_all=True) == []
    assert evidence["meta"]["dry_run"] and evidence["schema"] == report.SCHEMA
    assert all(s["status"] == "complete" for s in evidence["stages"].values()), evidence["stages"]

    op_rows = [r for r in evidence["rows"] if r["status"] == "ok"]
    timed = {(r["peer"], r["mode"]) for r in op_rows}
    for peer in ("ours", "torch", "trl", "cce", "liger"):
        for mode in ("forward", "forward_backward", "step"):
            assert (peer, mode) in timed, (peer, mode)
    assert {r["provider"] for r in op_rows} >= {"ours", "torch", "trl", "liger", "liger-flce", "cce"}
    for r in op_rows:  # nothing is timed that did not pass the fp64 gate
        assert r["check"] and r["floor_ms"] > 0 and r["time_ms"] > 0, r
    assert evidence["tests"]["passed"] == evidence["tests"]["selected"] > 0
    assert evidence["cublas"]["tflops_median"] > 0 and evidence["gemms"]
    assert set(evidence["stand_ins"]) >= {"ours", "cce", "trainer liger"}

    trainers = {r["provider"]: r for r in evidence["trainer"]["rows"]}
    assert set(trainers) == {"ours", "trl", "liger"} and all(r["status"] == "ok" for r in trainers.values())
    # the same WPO loss from the same weights on the same batches: the logged losses agree (bf16, 4 digits)
    for other in ("trl", "liger"):
        assert evidence["trainer"]["losses_vs_ours"][other]["max_abs_diff"] < 5e-3

    md = (out / f"{STEM}.md").read_text()
    assert "Dry run on a CPU" in md and "Ours against every other implementation" in md
    tail = proc.stdout[proc.stdout.rindex("GPU evidence cpu-dryrun") :]
    assert "| tiny-gemma |" in tail and "| WPOTrainer (ours) | ok |" in tail
    assert tail.strip() == (out / "run.log").read_text()[-len(tail) :].strip()


def test_a_stage_killed_at_its_cap_still_gives_the_report(tmp_path: Path) -> None:
    """A 2-second cap kills pytest before it finishes: the stage says ``killed``, the run fails, and the JSON
    and markdown are written all the same (the stages' raw records removed)."""
    out = tmp_path / "out"
    proc = _orchestrate(out, "--dry-run", "--date", DATE, "--stages", "tests", "--cap", "tests=2")
    assert proc.returncode == 1, proc.stdout[-3000:]
    evidence = json.loads((out / f"{STEM}.json").read_text())
    assert evidence["stages"]["tests"]["status"] == "killed"
    assert evidence["stages"]["ops"]["status"] == "not run"
    assert report.check_schema(evidence, require_all=False) == []
    assert "stage tests: killed" in proc.stdout and (out / f"{STEM}.md").exists()
    assert not (out / "parts").exists()


def test_a_stage_cut_at_its_soft_deadline_keeps_what_it_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ops stage whose clock runs out after its first measurement: status ``cut``, the measured rows on
    disk, the rest listed as not run, and a report built from that partial record."""

    class ExpiresAfterTwoChecks(StageClock):
        checks = 0

        def expired(self) -> bool:
            ExpiresAfterTwoChecks.checks += 1
            return ExpiresAfterTwoChecks.checks > 2

    monkeypatch.setattr(gpu_evidence_ops, "StageClock", ExpiresAfterTwoChecks)
    # the stage process's settings, not this one's
    monkeypatch.setattr(gpu_evidence_ops.torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(gpu_evidence_ops.gc, "freeze", lambda: None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    path = tmp_path / "ops.json"
    assert gpu_evidence_ops.run_stage(path, cap_s=600, dry_run=True) == 0
    record = read_json(path)
    assert record["status"] == "cut"
    n_heads, n_tokens = len(gpu_evidence_ops.DRY_SUITE.heads), len(gpu_evidence_ops.DRY_SUITE.tokens)
    assert len(record["not_run"]) == n_heads * n_tokens * len(gpu_evidence_ops.MODES) - 1
    measured = {(r["head"], r["n_tokens"], r["mode"]) for r in record["rows"]}
    assert measured == {("tiny-llama", 16, "forward")}
    assert any(r["provider"] == "ours" and r["status"] == "ok" for r in record["rows"])

    meta = gpu_evidence.run_meta(True, DATE)
    missing = {"status": "not run", "reason": "not asked for (--stages)"}
    stages = {"tests": {"stage": "tests"} | missing, "ops": record, "trainer": {"stage": "trainer"} | missing}
    evidence = report.assemble(meta, stages, caps=gpu_evidence.DRY_CAPS, total_s=1.0)
    assert report.check_schema(evidence, require_all=False) == []
    assert "Not run (stage time cap): tiny-llama/forward/N=32" in report.markdown(evidence)


def test_caps_fit_six_minutes_with_the_wheel_install() -> None:
    """The stages' caps and the report's reserve fit the run's cap, and that leaves ≥ 20 s of the six
    minutes for the wrapper's wheel install."""
    assert sum(gpu_evidence.CAPS.values()) + gpu_evidence.REPORT_RESERVE_S <= gpu_evidence.TOTAL_S <= 340


def test_run_capped_kills_the_process_group_and_the_record_survives(tmp_path: Path) -> None:
    record = tmp_path / "record.json"
    child = f"import json, time; open({str(record)!r}, 'w').write(json.dumps({{'rows': [1]}}))"
    child += "; time.sleep(60)"
    rc, wall = gpu_evidence.run_capped([sys.executable, "-c", child], 3.0, dict(os.environ))
    assert rc is None and wall < 3.0 + gpu_evidence.KILL_GRACE_S + 5
    assert read_json(record) == {"rows": [1]}


def test_tests_record_survives_a_line_cut_by_a_kill(tmp_path: Path) -> None:
    jsonl = tmp_path / "tests.jsonl"
    lines = [
        {"selected": 3, "deselected": 1},
        {"nodeid": "a", "outcome": "passed", "when": "call", "duration_s": 0.1},
        {"nodeid": "b", "outcome": "failed", "when": "call", "duration_s": 0.2, "message": "boom"},
    ]
    jsonl.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"nodeid": "c", "outc')
    s = summarise(jsonl)
    assert (s["selected"], s["ran"], s["passed"], s["failed"], s["finished"]) == (3, 2, 1, 1, False)
    assert [f["nodeid"] for f in s["failures"]] == ["b"]


def test_readme_gpu_section_is_generated_from_the_committed_results(tmp_path: Path) -> None:
    """The section in benchmarks/README.md is what the committed results give; a dry run never counts as a GPU
    run, a real one shows ours against every peer."""
    assert report.update_readme(check=True), "run: python -m benchmarks.gpu_evidence_report --readme"
    row = {"head": "llama3-8b", "n_tokens": 1024, "mode": "step", "status": "ok", "time_ms": 2.0}
    row |= {"peak_mib": 10.0, "floor_ms": 1.0, "x_floor": 2.0, "check": {"loss": 0.0}}
    rows = [
        row | {"provider": "ours", "peer": "ours", "label": "ours (Triton)", "loss": "wpo"},
        row | {"provider": "trl", "peer": "trl", "label": "TRL", "loss": "wpo", "time_ms": 3.0},
    ]
    ops = {"stage": "ops", "status": "complete", "rows": rows, "config": {"modes": ["step"], "heads": []}}
    ops["meta"] = {"gpu": "NVIDIA H100 80GB HBM3", "tag": "cuda-h100"}
    stages = {"tests": {"status": "complete", "passed": 3}, "ops": ops, "trainer": {"status": "complete"}}
    for dry_run in (True, False):
        meta = gpu_evidence.run_meta(dry_run, DATE)
        evidence = report.assemble(meta, stages, caps=gpu_evidence.CAPS, total_s=1.0)
        (tmp_path / f"{evidence['meta']['tag']}-evidence-{DATE}.json").write_text(json.dumps(evidence))
        section = report.readme_section(tmp_path)
        if dry_run:
            assert section.startswith("**No GPU run against the peers has happened yet.**")
        else:
            assert f"cuda-h100-evidence-{DATE}.json" in section and "| llama3-8b | 1024 | step |" in section
            assert "1.50× · 1.00×" in section  # TRL's time and memory as multiples of ours
