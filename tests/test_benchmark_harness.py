"""Smoke test of the benchmark harness (CI runs no benchmark): the ``--quick`` CPU runner end to end,
the CPU peak-memory measurement, and the correctness gate that keeps wrong implementations untimed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import check
from benchmarks.harness import MIB, make_op_inputs, peak_memory, time_fn
from benchmarks.providers.base import MODES
from benchmarks.providers.torch_reference import TorchReference
from benchmarks.shapes import Head

ROOT = Path(__file__).resolve().parents[1]


def test_quick_runner_on_cpu(tmp_path: Path) -> None:
    """``python -m benchmarks.run --device cpu --quick`` writes JSON, markdown and plots, with timed rows
    for ours and the reference in every mode, and ours below the reference in peak memory everywhere."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--device",
        "cpu",
        "--quick",
        "--providers",
        "ours",
        "torch",
        "--out",
        str(tmp_path),
        "--date",
        "2000-01-01",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"runner failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"

    result = json.loads((tmp_path / "cpu-quick-2000-01-01.json").read_text())
    assert result["meta"]["device"] == "cpu" and result["meta"]["versions"]["torch"]
    rows = result["rows"]
    assert rows and all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    by_key = {(r["head"], r["n_tokens"], r["mode"], r["provider"]): r for r in rows}
    keys = {(h, n, m) for h, n, m, _ in by_key}
    assert {m for _, _, m in keys} == set(MODES)
    for head, n, mode in keys:
        ours, ref = by_key[(head, n, mode, "ours")], by_key[(head, n, mode, "torch")]
        for r in (ours, ref):
            assert r["time_ms"] > 0 and r["peak_mib"] > 0 and r["repeats"] >= 3, r
            assert max(r["check"].values()) < 1e-3, r["check"]
        assert ours["peak_mib"] < ref["peak_mib"], (head, n, mode, ours["peak_mib"], ref["peak_mib"])

    md = (tmp_path / "cpu-quick-2000-01-01.md").read_text()
    assert "ours (torch fallback)" in md and "torch (materialised)" in md
    for mode in MODES:
        assert (tmp_path / f"cpu-quick-2000-01-01-{mode}.png").stat().st_size > 1000


def test_cpu_peak_memory_counts_every_live_tensor() -> None:
    """4 MiB + 8 MiB alive together, then freed, then 1 MiB: the peak is 12 MiB, not the final level."""

    def fn() -> torch.Tensor:
        a = torch.ones(1 << 20)
        b = torch.ones(2 << 20)
        del a, b
        return torch.ones(1 << 18)

    peak, retained = peak_memory(fn, "cpu")
    assert 12.0 <= peak / MIB < 12.1, peak / MIB
    assert 1.0 <= retained / MIB < 1.1, retained / MIB


def test_time_fn_repeats_and_clears_grads() -> None:
    x = torch.randn(64, requires_grad=True)
    seen = []

    def fn() -> None:
        seen.append(x.grad is None)
        (x * 2).sum().backward()

    timing = time_fn(fn, "cpu", grad_to_none=[x], min_repeats=3, budget_s=0.0)
    assert timing.repeats == 3 and timing.median_ms > 0 and all(seen)


class _OffByOneTarget(TorchReference):
    """A plausible bug: the log-prob of the next vocabulary entry instead of the target."""

    def per_token(self, hidden, weight, targets, head, *, masked):
        return super().per_token(hidden, weight, (targets + 1) % head.vocab, head, masked=masked)


class _NoSoftcap(TorchReference):
    """Another: the softcap forgotten."""

    def per_token(self, hidden, weight, targets, head, *, masked):
        return super().per_token(
            hidden, weight, targets, Head(head.name, head.hidden, head.vocab), masked=masked
        )


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_correctness_gate_rejects_wrong_implementations(mode: str) -> None:
    head = Head("gate", 32, 300, softcap=5.0)
    inputs = make_op_inputs(head, 64, "cpu", torch.float32, requires_grad=mode != "forward", seed=7)
    ref = check.oracle(inputs.hidden, inputs.weight, inputs.targets, head, inputs.grad_out)
    errors = check.check_op(TorchReference("cpu"), mode, inputs, ref)
    assert max(errors.values()) < 1e-5
    for wrong in (_OffByOneTarget("cpu"), _NoSoftcap("cpu")):
        with pytest.raises(check.CheckFailed):
            check.check_op(wrong, mode, inputs, ref)
