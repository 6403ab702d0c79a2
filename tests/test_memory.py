"""Peak-memory bound of the CPU fallback: working memory stays far below the logits it never builds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
def test_fallback_extra_memory_below_tenth_of_logits(backward: bool) -> None:
    """N=2048, V=65536, H=256: the fp32 logits would be 512 MiB; extra peak must stay under 10% of it
    (beyond the inputs and, for the backward, the parameter gradients)."""
    cmd = [sys.executable, "-m", "tests.memory_probe", "2048", "65536", "256"]
    cmd += ["--backward"] if backward else []
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, timeout=300)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(report)
    assert report["extra_peak_bytes"] < 0.10 * report["fp32_logits_bytes"], report
