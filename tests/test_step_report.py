"""The paired training step in the static report and the cost model (issue 18): its plan rows at the plan
points, its two kernels compiled for sm_90a, and the README's table generated from the same rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks import step_table
from benchmarks.static_report import step_plan_rows
from wpo_kernels.kernels.launch_plan import DEFAULT_MEMORY_BUDGET

ROOT = Path(__file__).resolve().parents[1]
STEP_KEYS = {
    "head",
    "n",
    "pass",
    "ignored",
    "budget",
    "memory_budget",
    "route",
    "chunks",
    "kept_rows",
    "gemm_flops",
    "programs",
    "sm_count",
    "workspace_bytes",
    "predicted_ms",
    "floor_ms",
    "predicted_ratio",
}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return step_plan_rows()


def test_rows_cover_the_plan_points(rows: list[dict]) -> None:
    assert all(set(r) == STEP_KEYS and r["pass"] == "step" for r in rows)
    points = {(r["head"], r["n"], r["ignored"], r["budget"]) for r in rows}
    assert points == {
        (head, n, ignored, budget)
        for head in ("Llama-3-8B", "Gemma-2-9B")
        for n in (1024, 4096, 16384)
        for ignored in (0.0, 0.5)
        for budget in ("default", "smallest")
    }


def test_one_pass_within_budget_and_near_three_gemms(rows: list[dict]) -> None:
    """The default budget runs every plan point in one pass, within the budget and at ≤ 1.15 × three
    cuBLAS GEMMs over the kept rows (a prediction); the smallest budget recomputes (≤ 128 MiB)."""
    for r in rows:
        label = (r["head"], r["n"], r["ignored"], r["budget"])
        if r["budget"] == "default":
            assert r["route"] == "one_pass", label
            assert r["workspace_bytes"] <= DEFAULT_MEMORY_BUDGET == r["memory_budget"], label
            assert 1.0 < r["predicted_ratio"] <= 1.15, label
        else:
            assert r["route"] == "recompute" and r["memory_budget"] == 0, label
            assert r["workspace_bytes"] <= 128 * 2**20, label
            assert r["predicted_ratio"] > 1.5, label  # the measured recompute kernels: 4 GEMMs and more


def test_half_ignored_rows_halve_the_gemm_flops(rows: list[dict]) -> None:
    by_point = {(r["head"], r["n"], r["budget"], r["ignored"]): r for r in rows}
    for (head, n, budget, ignored), r in by_point.items():
        if ignored == 0.5:
            full = by_point[(head, n, budget, 0.0)]
            assert 2 * r["gemm_flops"] == full["gemm_flops"] and 2 * r["kept_rows"] == full["kept_rows"]


def test_readme_table_is_generated() -> None:
    text = step_table.README.read_text()
    assert step_table.with_table(text) == text, "run `python -m benchmarks.step_table`"
    assert "prediction" in text.split(step_table.START)[1].split(step_table.END)[0]


def test_step_kernels_compile_without_spills_or_atomics() -> None:
    """The step's two kernels for sm_90a (bf16, bias and softcap on, the sampled statistic), compiled in a
    subprocess without the interpreter."""
    code = textwrap.dedent(
        """
        import json
        from benchmarks.static_report import kernel_entries, step_compile_jobs
        jobs = [j for j in step_compile_jobs() if j.dtype == "bf16" and j.switches.get("HAS_BIAS")]
        print(json.dumps([{k: e[k] for k in ("name", "registers", "spill_bytes", "atomics")}
                          for e in kernel_entries(jobs, 1)]))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    entries = json.loads(result.stdout.strip().splitlines()[-1])
    assert {e["name"] for e in entries} == {"_row_stats_kernel", "_logit_grad_kernel"}
    for e in entries:
        assert e["spill_bytes"] == 0 and e["atomics"] == [] and 0 < e["registers"] <= 255, e
