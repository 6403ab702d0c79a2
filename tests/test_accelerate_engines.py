"""``WPOTrainer`` under ``accelerate launch --num_processes 2`` with the shipped DDP, FSDP2 and DeepSpeed
ZeRO-3 configs (``integration/accelerate/``), on CPU (gloo), against one plain process on the same global
batch (2 processes × 2 pairs = 1 process × 4 pairs), for 3 steps of
``integration/examples/accelerate_wpo.py``.

Checked per step: the loss and the logged WPO metrics (weights, entropy, token count), which the trainer
gathers across ranks (rank 0's own values differ from the global ones); and the final weights, gathered
from the shards. Tolerances: 1e-5 relative on the logged values — fp32, the runs differ
only in reduction order (per-rank means averaged, per-rank padding); 1e-4 relative norm per parameter
tensor after 3 AdamW steps — AdamW divides each coordinate's update by its own gradient scale, so
rounding-level gradient differences on near-zero coordinates grow (measured: 1.2e-5 for all three).

The three launches run concurrently (each its own rendezvous port): the processes mostly wait on
start-up imports, and the 2-core machine overlaps them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import rel_err

pytest.importorskip("trl")
pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "integration" / "examples" / "accelerate_wpo.py"
CONFIGS = ROOT / "integration" / "accelerate"
#: name → (config file, the engine the trainer ran, how the trained head weight is stored)
ENGINES = {
    "ddp": ("ddp.yaml", "ddp", "plain"),
    "fsdp2": ("fsdp2.yaml", "fsdp", "dtensor"),
    "zero3": ("zero3.yaml", "deepspeed", "zero3"),
}
LOGGED = ("loss", "grad_norm", "weights/pair_mean", "weights/pair_min", "weights/pair_max",
          "weights/chosen_mean", "weights/rejected_max", "rewards/margins", "logps/chosen", "entropy",
          "num_tokens")
STEPS, PAIRS_PER_PROCESS, PROCESSES = 3, 2, 2
VALUE_TOL, PARAM_TOL = 1e-5, 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the example trains with the torch fallback on CPU
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU, also on a GPU machine
    return env


def _script_args(out: Path, pairs: int) -> list[str]:
    return [str(SCRIPT), "--output-dir", str(out), "--steps", str(STEPS), "--pairs-per-device", str(pairs)]


def _results(out: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    history = json.loads((out / "log_history.json").read_text())
    return history, torch.load(out / "weights.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run the single process and the three launches (concurrently); their output folders by name."""
    base = tmp_path_factory.mktemp("accelerate")
    engines = [name for name in ENGINES if name != "zero3" or _has_deepspeed()]
    procs = {}
    for name in engines:
        config = ENGINES[name][0]
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(PROCESSES),
            "--main_process_port", str(_free_port()), "--config_file", str(CONFIGS / config),
            *_script_args(base / name, PAIRS_PER_PROCESS),
        ]
        procs[name] = _start(command, base / f"{name}.log")
    procs["single"] = _start(
        [sys.executable, *_script_args(base / "single", PROCESSES * PAIRS_PER_PROCESS)], base / "single.log"
    )
    for name, proc in procs.items():
        if proc.wait(timeout=600) != 0:
            log = (base / f"{name}.log").read_text()
            pytest.fail(f"{name} run failed (exit {proc.returncode}):\n{log[-4000:]}")
    return {name: base / name for name in procs}


def _start(command: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:  # the child keeps its own descriptor
        return subprocess.Popen(command, cwd=ROOT, env=_environment(), stdout=out, stderr=subprocess.STDOUT)


def _has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("engine", list(ENGINES))
def test_trainer_under_accelerate_matches_one_process(engine: str, runs: dict[str, Path]) -> None:
    if engine not in runs:
        pytest.skip("deepspeed is not installed (pip install 'wpo-kernels[deepspeed]')")
    _, kind, storage = ENGINES[engine]
    ran = json.loads((runs[engine] / "engine.json").read_text())
    assert ran == {"engine": kind, "num_processes": PROCESSES, "head_weight": storage}
    want_history, want_params = _results(runs["single"])
    history, params = _results(runs[engine])
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))
    assert len(want_history) == STEPS
    for step, (got, want) in enumerate(zip(history, want_history, strict=True), start=1):
        for key in LOGGED:
            assert rel_err(torch.tensor(got[key]), torch.tensor(want[key])) < VALUE_TOL, (engine, step, key)
    assert abs(want_history[1]["rewards/margins"]) > 1e-3  # after one step the policy left its reference
    assert sorted(params) == sorted(want_params)
    for name, value in params.items():
        assert rel_err(value, want_params[name]) < PARAM_TOL, (engine, name)
