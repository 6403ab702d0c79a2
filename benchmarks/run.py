"""Benchmark runner: every provider × head × token count × mode, in one run, to JSON + markdown + PNGs.

Usage::

    python -m benchmarks.run                       # cuda if available, else cpu
    python -m benchmarks.run --device cpu --quick  # tiny shapes: the CI smoke run
    python -m benchmarks.run --device cuda --heads llama3-8b mistral-7b --out $OUT
    python -m benchmarks.run --merge a.json b.json --out benchmarks/results   # join partial runs

Writes ``<out>/<tag>-<date>.json`` (machine info and one row per measurement), ``.md`` (tables) and
``<tag>-<date>-<mode>.png`` (time and memory vs N, one line per implementation, one row per head),
where ``tag`` is ``cpu``, ``cuda-h100``, ... (``-quick`` appended for ``--quick``; a ``--heads`` subset
adds ``-<head>+<head>`` to the name). Before a provider is timed on a head, its values and gradients are
checked against the fp64 oracle (benchmarks/check.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import check
from benchmarks.harness import (
    MIB,
    OpInputs,
    StepInputs,
    Timing,
    device_tag,
    machine_info,
    make_op_inputs,
    make_step_inputs,
    matmul_floor,
    peak_memory,
    time_interleaved,
)
from benchmarks.providers import MODES, Mode, Provider, all_providers
from benchmarks.shapes import Head, Suite, suite_for

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Useful FLOPs per token-vocab-hidden triple: the forward GEMM, plus the two gradient GEMMs.
FLOP_FACTOR = {"forward": 2, "forward_backward": 6, "step": 6}
#: How many bare ``h @ W.T`` make the floor of each mode.
FLOOR_GEMMS = {"forward": 1, "forward_backward": 3, "step": 3}
#: Timed calls per measurement, at least (the median is reported).
MIN_REPEATS = 5


def log(msg: str) -> None:
    print(msg, flush=True)


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


class Runner:
    """Runs one :class:`Suite` on one device and collects rows and skips."""

    def __init__(
        self,
        device: str,
        suite: Suite,
        providers: list[Provider],
        modes: tuple[Mode, ...],
        dtype: torch.dtype,
        budget_s: float,
    ) -> None:
        self.device, self.suite, self.modes, self.dtype, self.budget_s = device, suite, modes, dtype, budget_s
        self.min_repeats = MIN_REPEATS
        self.rows: list[dict] = []
        self.skipped: list[dict] = []
        self.providers: list[Provider] = []
        for p in providers:
            ok, why = p.available()
            if ok:
                self.providers.append(p)
            else:
                self._skip(p, "*", "*", why)
        self._floors: dict[tuple[str, int], Timing] = {}

    def _skip(self, p: Provider, head: str, mode: str, reason: str) -> None:
        log(f"  skip {p.name} [{head} / {mode}]: {reason}")
        self.skipped.append(
            {"provider": p.name, "label": p.label, "head": head, "mode": mode, "reason": reason}
        )

    def run(self, on_head_done: Callable[[], None] | None = None) -> None:
        """Measure every head; ``on_head_done`` is called after each."""
        start = time.perf_counter()
        for head in self.suite.heads:
            log(f"== {head.label} (at {time.perf_counter() - start:.0f} s)")
            for mode in self.modes:
                passed = self._gate(head, mode)
                for n in self.suite.tokens:
                    self._measure(head, mode, n, passed)
            if on_head_done is not None:
                on_head_done()

    # correctness gate --------------------------------------------------------------------------
    def _gate(self, head: Head, mode: Mode) -> list[tuple[Provider, dict[str, float]]]:
        """Providers that support ``mode`` on ``head`` and agree with the oracle, with their errors."""
        candidates = []
        for p in self.providers:
            ok, why = p.supports(mode, head)
            if ok:
                candidates.append(p)
            else:
                self._skip(p, head.name, mode, why)
        if not candidates:
            return []
        n = self.suite.tokens[0]
        passed = []
        if mode == "step":
            inputs = make_step_inputs(head, n, self.suite.seq_len, self.device, self.dtype, seed=1234)
            refs: dict[tuple[bool, bool], tuple] = {}
            for p in candidates:
                key = (p.step_loss == "wpo", not p.takes_ref_logps)
                if key not in refs:
                    refs[key] = check.step_oracle(inputs, weighted=key[0], zero_ref=key[1])
                passed += self._try_check(
                    p, head, mode, lambda p=p, x=inputs, r=refs[key]: check.check_step(p, x, r)
                )
        else:
            inputs = make_op_inputs(
                head, n, self.device, self.dtype, requires_grad=mode != "forward", seed=1234
            )
            g = inputs.grad_out if mode == "forward_backward" else None
            ref = check.oracle(inputs.hidden, inputs.weight, inputs.targets, head, g)
            for p in candidates:
                passed += self._try_check(
                    p, head, mode, lambda p=p, x=inputs: check.check_op(p, mode, x, ref)
                )
        del inputs
        _free(self.device)
        return passed

    def _try_check(
        self, p: Provider, head: Head, mode: Mode, run_check: Callable[[], dict[str, float]]
    ) -> list[tuple[Provider, dict[str, float]]]:
        try:
            errors = run_check()
        except check.CheckFailed as e:
            self._skip(p, head.name, mode, f"FAILED the correctness check, not timed: {e}")
            return []
        except torch.OutOfMemoryError:
            _free(self.device)
            self._skip(p, head.name, mode, "out of memory in the correctness check, not timed")
            return []
        except Exception as e:  # a competitor that breaks on this device/version is skipped, not fatal
            self._skip(
                p, head.name, mode, f"error in the correctness check, not timed: {type(e).__name__}: {e}"
            )
            return []
        log(f"  check {p.name} {mode}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
        return [(p, errors)]

    # timing and memory -------------------------------------------------------------------------
    def _floor(self, head: Head, n: int) -> Timing:
        key = (head.name, n)
        if key not in self._floors:
            inputs = make_op_inputs(head, n, self.device, self.dtype, requires_grad=False)
            self._floors[key] = matmul_floor(inputs, self.device, budget_s=min(self.budget_s, 0.5))
            del inputs
        return self._floors[key]

    def _floor_ms(self, head: Head, mode: Mode, n_tokens: int) -> float:
        """The floor of ``mode`` at ``n_tokens``: ``FLOOR_GEMMS[mode]`` fastest bare ``h @ W.T``."""
        return FLOOR_GEMMS[mode] * self._floor(head, n_tokens).min_ms

    def _measure(
        self, head: Head, mode: Mode, n: int, passed: list[tuple[Provider, dict[str, float]]]
    ) -> None:
        if not passed:
            return
        inputs: OpInputs | StepInputs
        if mode == "step":
            inputs = make_step_inputs(head, n, self.suite.seq_len, self.device, self.dtype)
            n_tokens = inputs.targets.numel()
        else:
            inputs = make_op_inputs(head, n, self.device, self.dtype, requires_grad=mode != "forward")
            n_tokens = n
        flops = FLOP_FACTOR[mode] * n_tokens * head.vocab * head.hidden
        floor_ms = self._floor_ms(head, mode, n_tokens)
        rows: list[dict] = []
        timed: list[tuple[dict, Callable[[], object]]] = []
        for p, errors in passed:
            row = {
                "head": head.name,
                "hidden": head.hidden,
                "vocab": head.vocab,
                "softcap": head.softcap,
                "n_tokens": n_tokens,
                "mode": mode,
                "provider": p.name,
                "peer": p.peer,
                "label": p.label,
                "loss": p.step_loss if mode == "step" else None,
                "floor_ms": floor_ms,
                "check": errors,
            }
            rows.append(row)
            make = {
                "forward": p.make_forward,
                "forward_backward": p.make_forward_backward,
                "step": p.make_step,
            }
            try:
                fn = make[mode](inputs)  # type: ignore[operator]
                if self.device == "cuda":
                    fn()  # autotuning, outside the memory measurement
                # the (untimed) memory call is also each provider's warm-up
                peak, retained = peak_memory(fn, self.device, grad_to_none=inputs.leaves)
            except torch.OutOfMemoryError:
                row.update(status="oom", reason="out of memory")
            except Exception as e:
                row.update(status="failed", reason=f"{type(e).__name__}: {e}")
            else:
                row.update(peak_mib=peak / MIB, retained_mib=retained / MIB)
                timed.append((row, fn))
            for t in inputs.leaves:
                t.grad = None
            _free(self.device)
        # every provider once per round, in rotating order: load changes fall on all of them alike
        timings: list[Timing] = []
        if timed:
            timings = time_interleaved(
                [fn for _, fn in timed],
                self.device,
                grad_to_none=inputs.leaves,
                warmup=0,
                min_repeats=self.min_repeats,
                budget_s=self.budget_s * len(timed),
            )
        for (row, _), timing in zip(timed, timings, strict=True):
            row.update(
                status="ok",
                time_ms=timing.median_ms,
                time_p20_ms=timing.p20_ms,
                time_p80_ms=timing.p80_ms,
                repeats=timing.repeats,
                tflops=flops / (timing.median_ms * 1e-3) / 1e12,
                x_floor=timing.median_ms / floor_ms,
            )
        timed.clear()
        for t in inputs.leaves:
            t.grad = None
        _free(self.device)
        for row in rows:
            self.rows.append(row)
            if row["status"] == "ok":
                log(
                    f"  {head.name} N={n_tokens} {mode} {row['provider']}: {row['time_ms']:.2f} ms "
                    f"({row['x_floor']:.2f}x floor), {row['peak_mib']:.1f} MiB"
                )
            else:
                log(f"  {head.name} N={n_tokens} {mode} {row['provider']}: {row['status']}: {row['reason']}")
        del inputs
        _free(self.device)


def write_outputs(result: dict, out_dir: Path, *, plots: bool = True) -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and (with ``plots``) ``<stem>-<mode>.png``; returns the paths."""
    from benchmarks.report import markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    meta = result["meta"]
    stem = f"{meta['tag']}-{meta['date']}" + (f"-{meta['part']}" if meta.get("part") else "")
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(markdown(result))
    if plots:
        from benchmarks.plots import plot_all

        paths += plot_all(result, out_dir / stem)
    return paths


def merge(files: list[Path]) -> dict:
    """Join partial runs of one device (e.g. one GPU call per head) into one result."""
    results = [json.loads(f.read_text()) for f in files]
    devices = {r["meta"]["tag"] for r in results}
    if len(devices) != 1:
        raise ValueError(f"--merge needs results of one device tag, got {sorted(devices)}")
    merged = dict(results[0])
    merged["rows"] = [row for r in results for row in r["rows"]]
    seen, skipped = set(), []
    for r in results:
        for s in r["skipped"]:
            key = tuple(sorted(s.items()))
            if key not in seen:
                seen.add(key)
                skipped.append(s)
    merged["skipped"] = skipped
    merged["meta"] = dict(results[0]["meta"], merged_from=[f.name for f in files], part=None)
    merged["meta"]["wall_s"] = round(sum(r["meta"].get("wall_s", 0) for r in results), 1)
    merged["config"] = dict(
        results[0]["config"],
        heads=[h for r in results for h in r["config"]["heads"]],
    )
    return merged


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (the CI smoke run)")
    ap.add_argument("--heads", nargs="+", help="only these heads (names in benchmarks/shapes.py)")
    ap.add_argument("--providers", nargs="+", help="only these providers (ours torch trl liger cce)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument(
        "--dtype", choices=("bfloat16", "float32", "float16"), help="default: bf16 on cuda, fp32 on cpu"
    )
    ap.add_argument("--budget", type=float, help="seconds of timed repeats per measurement (>= 3 repeats)")
    ap.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default 1 on cpu: stable timings on a shared machine; 0: torch's default, "
        "the core count). Other than 1, the count joins the result names: cpu-t2-<date>.*",
    )
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"output folder (default {RESULTS_DIR})")
    ap.add_argument("--date", help="date in file names and header (default: today)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--merge", nargs="+", type=Path, help="join these result JSONs instead of running")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        paths = write_outputs(merge(args.merge), args.out, plots=not args.no_plots)
        log("wrote " + ", ".join(str(p) for p in paths))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        log("--device cuda: no CUDA device visible")
        return 2
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        log("note: TRITON_INTERPRET=1 is set; 'ours' still runs the torch fallback (backend='torch') on CPU")
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    )
    suite = suite_for(args.device, quick=args.quick, heads=tuple(args.heads) if args.heads else None)
    budget = args.budget if args.budget is not None else (0.05 if args.quick else 0.5)
    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)

    meta = machine_info(args.device, date=args.date)
    meta["tag"] = device_tag(args.device)
    if args.device == "cpu" and torch.get_num_threads() != 1:
        meta["tag"] += f"-t{torch.get_num_threads()}"
    meta["tag"] += "-quick" if args.quick else ""
    meta["dtype"] = str(dtype).removeprefix("torch.")
    meta["part"] = "+".join(args.heads) if args.heads else None
    meta["min_repeats"], meta["interleaved"] = MIN_REPEATS, True
    log(f"benchmarks on {meta.get('gpu', meta['cpu'])} ({args.device}, {meta['dtype']}), {meta['versions']}")

    start = time.perf_counter()
    meta["load_before"] = list(os.getloadavg())  # a shared machine: say how busy it was
    runner = Runner(
        args.device,
        suite,
        all_providers(args.device, tuple(args.providers) if args.providers else None),
        tuple(args.modes),
        dtype,
        budget,
    )
    result = {
        "meta": meta,
        "config": {
            "heads": [
                {
                    "name": h.name,
                    "hidden": h.hidden,
                    "vocab": h.vocab,
                    "softcap": h.softcap,
                    "trl_chunk_size": h.trl_chunk_size,
                }
                for h in suite.heads
            ],
            "tokens": list(suite.tokens),
            "seq_len": suite.seq_len,
            "modes": list(args.modes),
            "budget_s": budget,
        },
        "rows": runner.rows,
        "skipped": runner.skipped,
    }

    def checkpoint() -> None:
        # JSON + markdown after every head: a run stopped at a time limit keeps the heads it finished
        meta["wall_s"] = round(time.perf_counter() - start, 1)
        write_outputs(result, args.out, plots=False)

    runner.run(on_head_done=checkpoint)
    meta["wall_s"] = round(time.perf_counter() - start, 1)
    meta["load_after"] = list(os.getloadavg())
    paths = write_outputs(result, args.out, plots=not args.no_plots)
    log("")
    log(paths[1].read_text())
    log(f"done in {meta['wall_s']} s; wrote " + ", ".join(str(p) for p in paths))
    failed = [r for r in runner.rows if r["status"] == "failed"]
    # ours or the reference not passing the correctness gate is a failure; a competitor's is a finding
    gate = [
        s for s in runner.skipped if s["provider"] in ("ours", "torch") and "correctness check" in s["reason"]
    ]
    for s in failed + gate:
        log(f"FAILED: {s['provider']} {s.get('head')} {s.get('mode')}: {s['reason']}")
    return 1 if failed or gate else 0


if __name__ == "__main__":
    sys.exit(main())
