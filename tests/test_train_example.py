"""Smoke test of the main job (``wpo-train``) with tiny settings, and of the shipped data set."""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

from wpo_kernels.integration.examples.toy_setup import data_path, load_pairs  # noqa: E402
from wpo_kernels.integration.examples.train_wpo import main  # noqa: E402

TINY = [
    "--sft-steps", "15", "--steps", "4", "--batch-size", "8", "--train-pairs", "64", "--test-pairs", "32",
    "--eval-every", "2", "--hidden-size", "32", "--layers", "1", "--kernel-backend", "torch",
    "--device", "cpu",
]  # fmt: skip


def test_shipped_data_is_checkable_and_split() -> None:
    train, test = load_pairs("train"), load_pairs("test")
    assert len(train) == 2000 and len(test) == 300
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    for r in train[:200] + test:
        a, b = (int(x.replace(" ", "")) for x in r["prompt"].rstrip(" =").split(" + "))
        assert int(r["chosen"].replace(" ", "")) == a + b
        assert int(r["rejected"].replace(" ", "")) != a + b
    pair = _generator().make_pair(47, 8, random.Random(0))
    assert pair["prompt"] == "4 7 + 0 8 =" and pair["chosen"] == " 0 5 5"


def _generator():
    """The committed generator script (a script next to the data, not an importable module)."""
    script = Path(__file__).resolve().parents[1] / "integration" / "data" / "make_arithmetic_prefs.py"
    spec = importlib.util.spec_from_file_location("make_arithmetic_prefs", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_data_is_what_the_generator_makes(tmp_path) -> None:
    script = Path(_generator().__file__)
    subprocess.run([sys.executable, str(script), "--out-dir", str(tmp_path)], check=True, capture_output=True)
    for split in ("train", "test"):
        assert (tmp_path / f"arithmetic_prefs_{split}.jsonl").read_bytes() == data_path(split).read_bytes()


def test_example_end_to_end(tmp_path, capsys) -> None:
    assert main(["--output-dir", str(tmp_path), *TINY]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["held_out"]) == {"SFT (before)", "WPO", "DPO"}
    assert report["held_out"]["SFT (before)"]["reward_accuracy"] == 0.5  # policy == reference: all ties
    for run in ("WPO", "DPO"):
        history = report["log_history"][run]
        assert any("eval_rewards/accuracies" in h for h in history)
        assert any("weights/pair_mean" in h for h in history)
    wpo_weights = [h["weights/pair_mean"] for h in report["log_history"]["WPO"] if "weights/pair_mean" in h]
    dpo_weights = [h["weights/pair_mean"] for h in report["log_history"]["DPO"] if "weights/pair_mean" in h]
    assert all(w == 1.0 for w in dpo_weights) and any(w != 1.0 for w in wpo_weights)
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    md = (tmp_path / "report.md").read_text()
    assert "| WPO |" in md and "| DPO |" in md
    assert "Held-out results" in capsys.readouterr().out


def test_example_gemma2_softcap(tmp_path) -> None:
    args = ["--output-dir", str(tmp_path), *TINY, "--model", "gemma2", "--no-dpo", "--no-plot"]
    assert main(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["held_out"]) == {"SFT (before)", "WPO"}
    assert not (tmp_path / "curves.png").exists()


def test_console_script_help() -> None:
    """``wpo-train --help`` (the console script next to this interpreter, else ``python -m``)."""
    exe = shutil.which("wpo-train", path=str(Path(sys.executable).parent))
    module = [sys.executable, "-m", "wpo_kernels.integration.examples.train_wpo"]
    cmd = [exe, "--help"] if exe else [*module, "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "--model {llama,gemma2}" in out and "--output-dir" in out
