"""Stage 2 of :mod:`benchmarks.gpu_evidence`: the op and the step against the peers, and the cuBLAS rates.

``python -m benchmarks.gpu_evidence_ops --record PATH --cap-s S [--dry-run]`` (normally started by the
orchestrator). At the Llama-3-8B and Gemma-2-9B heads, N = 1k, 4k, 16k tokens, bf16: forward, forward +
backward of the log-probs, and the whole WPO step, for ours (and each extra route of our step,
:data:`benchmarks.providers.ours.STEP_ROUTES`), torch with materialised logits, TRL 1.16's chunked log-probs,
Liger's fused DPO loss and fused linear cross-entropy, and CCE's ``linear_cross_entropy``. Each is checked
against the fp64 oracle before it is timed (:class:`benchmarks.run.Runner`); time is the median of CUDA
events over ≥ 5 calls after a warm-up, memory the peak above the inputs (reset per call). The floor of each
shape is measured in the same run: the forward GEMM ``h @ W.T`` and, for the modes with a backward, the three
GEMMs of a materialised backward (``h @ W.T``, ``dZ @ W``, ``dZᵀ @ h``, on a random ``[N, V]`` ``dZ``). A
square bf16 GEMM gives the device's cuBLAS rate, and the autotuner's winners are recorded at the end.

``--dry-run``: the same code on the CPU at tiny heads, ours through the Triton interpreter and each peer
through what runs on a CPU (recorded under ``stand_ins``).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import pkgutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_evidence_stage import StageClock, write_json
from benchmarks.harness import Timing, device_tag, machine_info, time_fn
from benchmarks.providers import Provider
from benchmarks.providers.base import Mode
from benchmarks.providers.cce import CutCrossEntropy, CutCrossEntropyCPUStandIn
from benchmarks.providers.liger_dpo import LigerDPO
from benchmarks.providers.liger_flce import LigerFLCE
from benchmarks.providers.ours import Ours, step_route_providers
from benchmarks.providers.torch_reference import TorchReference
from benchmarks.providers.trl_chunked import TRLChunked
from benchmarks.run import Runner, log
from benchmarks.shapes import REAL_HEADS, Head, Suite

MODES: tuple[Mode, ...] = ("forward", "forward_backward", "step")
#: The real run: two heads, three token counts, steps of 512-token sequences (N = 1k is one pair).
SUITE = Suite(
    heads=tuple(h for h in REAL_HEADS if h.name in ("llama3-8b", "gemma2-9b")),
    tokens=(1024, 4096, 16384),
    seq_len=512,
)
#: The dry run: tiny heads with the real ones' traits (a softcap on the second; TRL visits several tiles),
#: small enough for the Triton interpreter (a call of ours there takes ~0.1 s, not ~0.1 ms).
DRY_SUITE = Suite(
    heads=(Head("tiny-llama", 32, 128, trl_chunk_size=64), Head("tiny-gemma", 32, 192, 30.0, 64)),
    tokens=(16, 32),
    seq_len=8,
)
#: Square GEMM of the cuBLAS rate (the dry run's is small).
RATE_SIZE, DRY_RATE_SIZE = 8192, 256
#: Seconds of timed repeats per provider and measurement, and the timed calls at least (the dry run checks
#: the plumbing, not speed: one call).
BUDGET_S, DRY_BUDGET_S = 0.15, 0.0
MIN_REPEATS, DRY_MIN_REPEATS = 5, 1


def providers(device: str, dry_run: bool) -> list[Provider]:
    """Every implementation compared: ours (Triton; in the dry run, the interpreter) and its step routes,
    then the peers, CCE through its CPU stand-in in the dry run."""
    cce = CutCrossEntropyCPUStandIn(device) if dry_run else CutCrossEntropy(device)
    return [
        Ours(device, backend="triton"),
        *step_route_providers(device, backend="triton"),
        TorchReference(device),
        TRLChunked(device),
        LigerDPO(device),
        LigerFLCE(device),
        cce,
    ]


def stand_ins(device: str, dry_run: bool) -> dict[str, str]:
    """What each provider ran as where it is not what a GPU run times (the dry run's CPU substitutes)."""
    if device == "cuda":
        return {}
    notes = {
        "ours": "the Triton kernels in the Triton interpreter (TRITON_INTERPRET=1; bf16 dots upcast there)",
        "trl": "TRL's torch tile path (it uses its Triton fold only on cuda/xpu tensors)",
        "liger": "LigerFusedLinearDPOLoss with compiled=False (torch.compile: seconds per shape on a CPU)",
        "liger-flce": "Liger's Triton cross-entropy kernel in the Triton interpreter; with a softcap it "
        "fails there (.to() on a float scalar argument): the softcapped head has no liger-flce row here",
    }
    if dry_run:
        notes["cce"] = CutCrossEntropyCPUStandIn.stand_in
    return notes


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gemm_rate(device: str, dtype: torch.dtype, size: int) -> dict[str, Any]:
    """The cuBLAS (CPU: oneDNN/MKL) rate of a square ``size³`` GEMM on random data, median and best."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=g, device=device).to(dtype)
    b = torch.randn(size, size, generator=g, device=device).to(dtype)
    timing = time_fn(lambda: a @ b, device, min_repeats=10, budget_s=0.5)
    flop = 2 * size**3
    return {
        "size": size,
        "dtype": str(dtype).removeprefix("torch."),
        "median_ms": timing.median_ms,
        "min_ms": timing.min_ms,
        "tflops_median": flop / (timing.median_ms * 1e-3) / 1e12,
        "tflops_best": flop / (timing.min_ms * 1e-3) / 1e12,
    }


class EvidenceRunner(Runner):
    """:class:`benchmarks.run.Runner` under a stage clock, with the three-GEMM floor and a checkpoint after
    every measurement."""

    def __init__(self, *args: Any, clock: StageClock, checkpoint: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clock, self.checkpoint = clock, checkpoint
        self.gemms: list[dict[str, Any]] = []
        self.not_run: list[dict[str, Any]] = []

    def run(self, on_head_done: Any = None) -> None:
        for head in self.suite.heads:
            log(f"== {head.label} (at {self.clock.elapsed():.0f} s)")
            for mode in self.modes:
                if self.clock.expired():
                    self.not_run += [{"head": head.name, "mode": mode, "n": n} for n in self.suite.tokens]
                    continue
                passed = self._gate(head, mode)
                for n in self.suite.tokens:
                    if self.clock.expired():
                        self.not_run.append({"head": head.name, "mode": mode, "n": n})
                        continue
                    self._measure(head, mode, n, passed)
                    self.checkpoint()

    def _gemms(self, head: Head, n: int) -> dict[str, Any]:
        for g in self.gemms:
            if g["head"] == head.name and g["n_tokens"] == n:
                return g
        gen = torch.Generator(device=self.device).manual_seed(n)
        h, w, dz = (
            torch.randn(*shape, generator=gen, device=self.device, dtype=self.dtype)
            for shape in ((n, head.hidden), (head.vocab, head.hidden), (n, head.vocab))
        )
        budget = min(self.budget_s, 0.25)
        times: dict[str, Timing] = {
            "forward": time_fn(lambda: h @ w.T, self.device, budget_s=budget),
            "grad_hidden": time_fn(lambda: dz @ w, self.device, budget_s=budget),
            "grad_weight": time_fn(lambda: dz.T @ h, self.device, budget_s=budget),
        }
        flop = 2 * n * head.vocab * head.hidden
        row: dict[str, Any] = {"head": head.name, "n_tokens": n}
        for name, t in times.items():
            row[f"{name}_ms"] = t.min_ms
            row[f"{name}_tflops"] = flop / (t.min_ms * 1e-3) / 1e12
        row["three_ms"] = sum(t.min_ms for t in times.values())
        self.gemms.append(row)
        return row

    def _floor_ms(self, head: Head, mode: Mode, n_tokens: int) -> float:
        row = self._gemms(head, n_tokens)
        return row["forward_ms"] if mode == "forward" else row["three_ms"]


def autotune_winners() -> dict[str, dict[str, str]]:
    """The config each of our autotuned kernels chose, per autotune key (empty where nothing was tuned,
    e.g. in the interpreter, which runs the untuned kernels)."""
    try:
        from triton.runtime.autotuner import Autotuner

        import wpo_kernels.kernels as kernels
    except Exception as e:  # noqa: BLE001 - a record, not a check
        return {"error": {"": f"{type(e).__name__}: {e}"}}
    winners: dict[str, dict[str, str]] = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"wpo_kernels.kernels.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, Autotuner):
                winners[f"{info.name}.{name}"] = {repr(k): str(v) for k, v in obj.cache.items()}
    return winners


def device_record(device: str) -> dict[str, Any]:
    """Machine info as :func:`benchmarks.harness.machine_info`, with the GPU's multiprocessors and clock."""
    info = machine_info(device)
    info["tag"] = device_tag(device)
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["sm_count"] = props.multi_processor_count
        info["capability"] = f"{props.major}.{props.minor}"
    return info


def run_stage(record_path: Path, cap_s: float, dry_run: bool) -> int:
    """Run the stage, rewriting ``record_path`` after every measurement; returns the exit status."""
    clock = StageClock(cap_s)
    device = "cpu" if dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        write_json(record_path, {"stage": "ops", "status": "failed", "error": "no CUDA device visible"})
        return 2
    if dry_run:
        torch.set_num_threads(1)
    suite = DRY_SUITE if dry_run else SUITE
    dtype = torch.bfloat16
    record: dict[str, Any] = {
        "stage": "ops",
        "status": "running",
        "meta": device_record(device),
        "config": {
            "heads": [vars(h) for h in suite.heads],
            "tokens": list(suite.tokens),
            "seq_len": suite.seq_len,
            "modes": list(MODES),
            "budget_s": DRY_BUDGET_S if dry_run else BUDGET_S,
            "dtype": "bfloat16",
        },
        "stand_ins": stand_ins(device, dry_run),
    }
    record["meta"]["dtype"] = "bfloat16"
    record["meta"]["min_repeats"] = DRY_MIN_REPEATS if dry_run else MIN_REPEATS
    record["meta"]["interleaved"] = True

    def checkpoint() -> None:
        record["wall_s"] = round(clock.elapsed(), 1)
        write_json(record_path, record)

    checkpoint()
    record["cublas"] = gemm_rate(device, dtype, DRY_RATE_SIZE if dry_run else RATE_SIZE)
    log(f"cuBLAS rate: {record['cublas']['tflops_median']:.1f} TFLOP/s (bf16 {record['cublas']['size']}³)")
    runner = EvidenceRunner(
        device,
        suite,
        providers(device, dry_run),
        MODES,
        dtype,
        record["config"]["budget_s"],
        clock=clock,
        checkpoint=checkpoint,
    )
    runner.min_repeats = DRY_MIN_REPEATS if dry_run else MIN_REPEATS
    # the peers' imports (transformers, inductor) leave ~10^6 objects: keep them out of the gc.collect() that
    # runs before every measurement (seconds each otherwise)
    gc.collect()
    gc.freeze()
    record.update(rows=runner.rows, skipped=runner.skipped, gemms=runner.gemms, not_run=runner.not_run)
    checkpoint()
    try:
        runner.run()
    except Exception as e:  # noqa: BLE001 - keep what finished, say what stopped it
        record.update(status="failed", error=f"{type(e).__name__}: {e}")
        checkpoint()
        raise
    _sync(device)
    record["autotune"] = autotune_winners()
    record["status"] = "cut" if runner.not_run else "complete"
    checkpoint()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_evidence_ops", description=__doc__.split("\n")[0]
    )
    ap.add_argument(
        "--record", type=Path, required=True, help="the stage's JSON record (rewritten as it goes)"
    )
    ap.add_argument("--cap-s", type=float, required=True, help="the hard cap; new work stops a little before")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny heads, the Triton interpreter")
    args = ap.parse_args(argv)
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--dry-run needs TRITON_INTERPRET=1 in the environment (set before triton is imported)")
    start = time.perf_counter()
    status = run_stage(args.record, args.cap_s, args.dry_run)
    log(f"ops stage done in {time.perf_counter() - start:.0f} s")
    # the record is on disk: skip the interpreter's teardown (Triton's bindings report leaks there)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
