"""Static H100 report: what every shipped kernel variant compiles to for sm_90a, and what the launch plan
launches at real LM-head shapes, with the cost model's predicted time. No GPU needed.

``python -m benchmarks.static_report --json out.json`` (writes ``out.md`` beside it) with
``TRITON_INTERPRET`` unset. JSON::

    {"kernels": [{"name", "dtype", "config", "switches", "registers", "spill_bytes", "shared_bytes",
                  "wgmma", "atomics"}],
     "plan": [{"head", "n", "pass", "programs", "sm_count", "workspace_bytes", "predicted_ratio"}]}

Plan rows with ``pass = "step"`` (the paired training step, :func:`step_plan_rows`) add ``ignored``,
``budget``, ``memory_budget``, ``route``, ``chunks``, ``kept_rows``, ``gemm_flops``, ``predicted_ms`` and
``floor_ms``; the step's two kernels are compiled like the others (:func:`step_compile_jobs`).

Kernels: the real launchers run on ``meta`` tensors at every plan point (``benchmarks/launch_compile.py``
records their launches); each distinct launch specialisation is compiled once per shipped autotune
config, for bf16, fp16 and fp32 (fp32 reaches a Triton kernel only with tf32 allowed, see
``wpo_kernels.autograd.resolve_backend``). Constexpr switches: all off and all on (``--all-switches``:
every combination), plus the plan points' own (bf16); a 256-column vocabulary slice adds the unsplit
forward. ``registers``/``spill_bytes`` (stores + loads) are per thread from ptxas ``-v``; ``wgmma``:
every ``tl.dot`` became a Hopper warp-group MMA; ``atomics``: the PTX ``atom.*`` / ``red.*`` forms. The
markdown adds each variant's epilogue cost (SASS instructions and MUFU per logit, which the cost model
uses) and the lever predictions (``benchmarks/lever_predictions.py``).
Plan: the Llama-3-8B and Gemma-2-9B heads at N = 1024, 4096, 16384, bf16, all five statistics,
no bias, ``sm_count`` 132; ``workspace_bytes`` from the plan, ``predicted_ratio`` from
``benchmarks/cost_model.py`` (a prediction from static facts, not a measurement).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import triton

from benchmarks.cost_model import CompiledKernel, Epilogue, KernelFacts, measured_head, predict, predict_step
from benchmarks.launch_compile import CapturedLaunch, capture, compile_facts, launch_key, launch_source
from benchmarks.lever_predictions import lever_rows
from benchmarks.plan_points import (
    HEADS,
    STEP_BUDGETS,
    STEP_IGNORED,
    TOKENS,
    Head,
    plans,
    step_plan_for,
)
from wpo_kernels.autograd import resolve_backend
from wpo_kernels.kernels.backward import triton_linear_logprobs_backward
from wpo_kernels.kernels.forward import triton_vocab_stats
from wpo_kernels.kernels.launch_plan import TileConfig
from wpo_kernels.kernels.step import GPU_CONFIG as GPU_STEP_CONFIG
from wpo_kernels.kernels.step import launch_logit_grad, launch_row_stats
from wpo_kernels.types import LogitTransform

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
#: Launcher options that are constexpr switches of the kernels (HAS_BIAS, HAS_SOFTCAP, NEED_MEAN).
SWITCH_OPTIONS = ("bias", "softcap", "need_mean")
#: A 256-row vocabulary slice (e.g. a tensor-parallel shard): the forward runs unsplit.
UNSPLIT_HEAD = Head(4096, 256, None)


def triton_dtypes() -> list[torch.dtype]:
    """Input dtypes that reach a Triton kernel on a CUDA device (with tf32 allowed for fp32), asked of
    the dispatch itself."""
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return [
            dtype for dtype in DTYPE_NAMES
            if resolve_backend("triton", SimpleNamespace(dtype=dtype, is_cuda=True)) == "triton"
        ]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed


def captured_call(head: Head, n: int, dtype: torch.dtype, bias: bool, softcap: bool, need_mean: bool,
                  backward: bool = True) -> list[CapturedLaunch]:
    """The Triton launches of one forward (+ backward) call, recorded on meta tensors with H100 plans."""
    meta = {"device": "meta"}
    hidden = torch.empty(n, head.hidden, dtype=dtype, **meta)
    weight = torch.empty(head.vocab, head.hidden, dtype=dtype, **meta)
    bias_t = torch.empty(head.vocab, dtype=dtype, **meta) if bias else None
    targets = torch.empty(n, dtype=torch.int64, **meta)
    per_token = torch.empty(n, dtype=torch.float32, **meta)
    transform = LogitTransform(softcap=(head.softcap or 30.0) if softcap else None)
    fwd, bwd = plans(head, n, dtype, bias=bias, softcap=softcap, need_mean=need_mean)

    def call() -> None:
        triton_vocab_stats(hidden, weight, bias_t, targets, transform, need_mean_logit=need_mean, plan=fwd)
        if backward:
            triton_linear_logprobs_backward(
                hidden, weight, bias_t, targets, per_token, per_token, transform, plan=bwd
            )

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 reaches the kernels only with tf32
    try:
        return capture(call)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


@dataclass
class CompileJob:
    """One kernel variant to compile: its report fields and the launch that produces it."""

    name: str
    dtype: str
    config: dict[str, Any]
    switches: dict[str, Any]
    launch: CapturedLaunch
    launch_kwargs: dict[str, Any]


def compile_jobs(all_switches: bool = False) -> list[CompileJob]:
    """Every distinct (launch specialisation × autotune config) the plan points launch, per dtype."""
    combos = (
        list(itertools.product((False, True), repeat=len(SWITCH_OPTIONS)))
        if all_switches else [(False,) * len(SWITCH_OPTIONS), (True,) * len(SWITCH_OPTIONS)]
    )
    calls = [
        (head, n, dtype, *switches, True)
        for dtype, switches, head, n in itertools.product(triton_dtypes(), combos, HEADS.values(), TOKENS)
    ]
    # a vocabulary (slice) of one split granule, forward only: the plan's one case without a split (the
    # kernel's PARTIAL switch off)
    calls += [(UNSPLIT_HEAD, 1024, dtype, *switches, False)
              for dtype, switches in itertools.product(triton_dtypes(), combos)]
    # and the plan points' own switches (bf16, no bias, the head's softcap, all five statistics), whose
    # facts the cost model reads
    calls += [(head, n, torch.bfloat16, False, head.softcap is not None, True, True)
              for head, n in itertools.product(HEADS.values(), TOKENS)]
    jobs: dict[tuple, CompileJob] = {}
    for head, n, dtype, *switches, backward in calls:
        for launch in captured_call(head, n, dtype, *switches, backward=backward):
            for config in launch.configs or [None]:
                kwargs = {**launch.kwargs, **(config.all_kwargs() if config else {})}
                key = (DTYPE_NAMES[dtype], *launch_key(launch.kernel, launch.args, kwargs))
                if key not in jobs:
                    jobs[key] = _job(launch, kwargs, config, DTYPE_NAMES[dtype])
    return list(jobs.values())


def _job(
    launch: CapturedLaunch, kwargs: dict[str, Any], config: triton.Config | None, dtype: str
) -> CompileJob:
    constexpr = {p.name for p in launch.kernel.params if p.is_constexpr}
    tile = dict(config.all_kwargs()) if config else {k: v for k, v in kwargs.items() if k.startswith("BLOCK")}
    switches = {k: v for k, v in kwargs.items() if k in constexpr and k not in tile}
    return CompileJob(launch.kernel.__name__, dtype, tile, switches, launch, kwargs)


_JOBS: list[CompileJob] = []  # read by forked workers


def _compile(index: int) -> dict[str, Any]:
    job = _JOBS[index]
    source, options = launch_source(job.launch.kernel, job.launch.args, job.launch_kwargs)
    facts = compile_facts(source, options)
    fields = {"name": job.name, "dtype": job.dtype, "config": job.config, "switches": job.switches}
    return {**fields, **asdict(facts)}


def kernel_entries(jobs: list[CompileJob], workers: int) -> list[dict[str, Any]]:
    """Compile every job (``workers`` processes) and return the report's kernel entries."""
    _JOBS[:] = jobs
    if workers <= 1:
        return [_compile(i) for i in range(len(jobs))]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile, range(len(jobs))))


def kernel_facts(entries: list[dict[str, Any]]) -> KernelFacts:
    """The cost model's view of the bf16 entries (the plan points' dtype): registers, shared memory and
    epilogue cost per logit per (plan kernel name, tile config, switches). Kernel ``_x_kernel`` is the
    plan's ``x``."""
    facts: dict[tuple[str, TileConfig], list] = {}
    for e in entries:
        c = e["config"]
        if e["dtype"] != "bf16" or "BLOCK_V" not in c:
            continue
        config = TileConfig(c["BLOCK_N"], c["BLOCK_V"], c["BLOCK_D"], c["num_warps"], c["num_stages"])
        logits = config.block_n * config.block_v / (32 * config.num_warps)  # per thread per tile
        epilogue = (
            Epilogue(e["epilogue_instructions"] / logits, e["epilogue_mufu"] / logits)
            if e["epilogue_instructions"] is not None else None
        )
        compiled = CompiledKernel(e["registers"], e["shared_bytes"], epilogue)
        name = e["name"].strip("_").removesuffix("_kernel")
        facts.setdefault((name, config), []).append((e["switches"], compiled))
    return KernelFacts(facts)


def plan_rows(facts: KernelFacts) -> list[dict[str, Any]]:
    """The plan at every (head, N): programs, workspace, predicted ratio to cuBLAS."""
    rows = []
    for (name, head), n in itertools.product(HEADS.items(), TOKENS):
        for plan in plans(head, n):
            rows.append({
                "head": name, "n": n, "pass": plan.pass_name, "programs": plan.programs,
                "sm_count": plan.sm_count, "workspace_bytes": plan.workspace_bytes,
                "predicted_ratio": round(predict(plan, facts=facts).ratio, 4),
            })
    return rows


#: The fields of a kernel entry in the JSON (issue 10); the markdown adds the epilogue counts.
JSON_FIELDS = (
    "name", "dtype", "config", "switches", "registers", "spill_bytes", "shared_bytes", "wgmma", "atomics",
)


def markdown(
    entries: list[dict[str, Any]], plan: list[dict[str, Any]], facts: KernelFacts, seconds: float
) -> str:
    """The report as markdown: kernels (with the epilogue's SASS per logit), plan rows, lever predictions."""
    lines = [
        f"# Static H100 report (triton {triton.__version__}, sm_90a, no GPU; {seconds:.0f} s)",
        "",
        "Compiled with the launch specialisation; registers / spills per thread (ptxas -v); epilogue: SASS "
        "instructions (MUFU) per logit outside the tensor-core loop. Predicted ratios come from the cost "
        "model: predictions from static facts, not measurements.",
        "",
        "| kernel | dtype | config | switches | regs | spill B | shared B | wgmma | atomics | epilogue |",
        "|---|---|---|---|---:|---:|---:|---|---|---:|",
    ]
    for k in entries:
        config = " ".join(f"{a}={b}" for a, b in k["config"].items() if a in _SHOWN_CONFIG)
        switches = " ".join(a for a, b in k["switches"].items() if b is True) or "-"
        epilogue = "-"
        if k["epilogue_instructions"] is not None:
            logits = k["config"]["BLOCK_N"] * k["config"]["BLOCK_V"] / (32 * k["config"]["num_warps"])
            epilogue = f"{k['epilogue_instructions'] / logits:.1f} ({k['epilogue_mufu'] / logits:.1f})"
        lines.append(
            f"| {k['name']} | {k['dtype']} | {config} | {switches} | {k['registers']} | {k['spill_bytes']} "
            f"| {k['shared_bytes']:,} | {k['wgmma']} | {' '.join(k['atomics']) or '-'} | {epilogue} |"
        )
    lines += ["", "| head | N | pass | programs | SMs | workspace (MiB) | predicted ÷ cuBLAS |",
              "|---|---:|---|---:|---:|---:|---:|"]
    for p in plan:
        lines.append(
            f"| {p['head']} | {p['n']} | {p['pass']} | {p['programs']} | {p['sm_count']} "
            f"| {p['workspace_bytes'] / 2**20:.1f} | {p['predicted_ratio']:.2f} |"
        )
    lines += ["", "One prediction per lever (the plan with it, the same plan without it):", ""]
    lines += lever_rows(facts)
    return "\n".join(lines) + "\n"


_SHOWN_CONFIG = ("BLOCK_N", "BLOCK_V", "BLOCK_D", "BLOCK", "num_warps", "num_stages")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, type=Path, help="where to write the JSON (and .md beside)")
    parser.add_argument("--all-switches", action="store_true", help="every switch combination")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="compiling processes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter skips code generation")
    start = time.perf_counter()
    entries = kernel_entries(compile_jobs(args.all_switches) + step_compile_jobs(), args.workers)
    facts = kernel_facts(entries)
    plan, step = plan_rows(facts), step_plan_rows()
    report = {"kernels": [{f: e[f] for f in JSON_FIELDS} for e in entries], "plan": plan + step}
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(entries, plan, facts, time.perf_counter() - start) + step_markdown(step)
    args.json.with_suffix(".md").write_text(text)
    print(f"{len(entries)} kernel variants, {len(plan) + len(step)} plan rows -> {args.json}")
    return 0



# --- the paired training step (issue 18): its kernels and its plan rows -----------------------------------


def step_compile_jobs() -> list[CompileJob]:
    """The step's two kernels (``wpo_kernels/kernels/step.py``), launched by their launchers on ``meta``
    tensors of the Llama-3-8B head: every dtype, the switches all off and all on, and the plan points'
    own (bf16, the head's softcap, the sampled alignment's statistic)."""
    head = HEADS["Llama-3-8B"]
    variants = [(dtype, False, False, None) for dtype in triton_dtypes()]
    variants += [(dtype, True, True, "log_sum_sq_probs") for dtype in triton_dtypes()]
    variants += [(torch.bfloat16, False, h.softcap is not None, "log_sum_sq_probs") for h in HEADS.values()]
    jobs: dict[tuple, CompileJob] = {}
    for dtype, bias, softcap, statistic in variants:
        logits = torch.empty(1024, head.vocab, dtype=dtype, device="meta")
        bias_t = torch.empty(head.vocab, dtype=dtype, device="meta") if bias else None
        rows = torch.empty(1024, dtype=torch.int64, device="meta")
        per_row = torch.empty(1024, dtype=torch.float32, device="meta")
        transform = LogitTransform(softcap=30.0 if softcap else None)
        calls = functools.partial(_step_launches, logits, bias_t, rows, per_row, statistic, transform)
        for launch in capture(calls):
            key = (DTYPE_NAMES[dtype], *launch_key(launch.kernel, launch.args, launch.kwargs))
            if key not in jobs:
                jobs[key] = _job(launch, launch.kwargs, None, DTYPE_NAMES[dtype])
                # the whole tile (one row per program), as the other entries report theirs
                c = GPU_STEP_CONFIG
                jobs[key].config = {"BLOCK_N": c.block_n, "BLOCK_V": c.block_v, "BLOCK_D": c.block_d,
                                    "num_warps": c.num_warps, "num_stages": c.num_stages}
    return list(jobs.values())


def _step_launches(logits, bias, rows, per_row, statistic, transform) -> None:
    launch_row_stats(logits, bias, rows, rows, per_row, per_row, statistic, per_row, transform)
    launch_logit_grad(logits, bias, rows, per_row, per_row, transform)


def step_plan_rows() -> list[dict[str, Any]]:
    """``pass = "step"`` rows: both heads × N × ignored share × budget (``benchmarks/plan_points.py``):
    the route(s), chunks, kept rows, the three GEMMs' FLOPs over them, the workspace, and the predicted
    time ÷ three cuBLAS GEMMs over the kept rows (``cost_model.predict_step``, a prediction)."""
    rows = []
    for (name, head), n, ignored, (budget_name, budget) in itertools.product(
        HEADS.items(), TOKENS, STEP_IGNORED, STEP_BUDGETS.items()
    ):
        plan = step_plan_for(head, n, ignored, budget)
        prediction = predict_step(plan, measured_head(name, plan.kept, head.vocab, head.hidden))
        rows.append({
            "head": name, "n": n, "pass": "step", "ignored": ignored, "budget": budget_name,
            "memory_budget": budget, "route": "+".join(plan.routes),
            "chunks": sum(1 for c in plan.chunks if c.rows), "kept_rows": plan.kept,
            "gemm_flops": 3 * 2 * plan.kept * head.vocab * head.hidden,
            "programs": max(c.rows for c in plan.chunks), "sm_count": plan.sm_count,
            "workspace_bytes": plan.workspace_bytes, "predicted_ms": round(prediction.seconds * 1e3, 2),
            "floor_ms": round(prediction.floor_seconds * 1e3, 2),
            "predicted_ratio": round(prediction.ratio, 4),
        })
    return rows


def step_markdown(rows: list[dict[str, Any]]) -> str:
    """The step rows as a markdown table (predictions, labelled so)."""
    lines = [
        "",
        "Training step (`pass = step`, issue 18): predicted H100 time of the paired step ÷ three cuBLAS "
        "GEMMs over the kept rows (`cost_model.predict_step`: GEMMs at the H200's measured rate, memory "
        "passes at 3.0 TB/s; predictions, not measurements).",
        "",
        "| head | N | ignored | budget | route | chunks | kept rows | workspace (MiB) | predicted (ms) "
        "| 3 GEMMs (ms) | predicted ÷ 3 GEMMs |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['head']} | {r['n']} | {r['ignored']:.0%} | {r['budget']} | {r['route']} | {r['chunks']} "
            f"| {r['kept_rows']} | {r['workspace_bytes'] / 2**20:.0f} | {r['predicted_ms']:.1f} "
            f"| {r['floor_ms']:.1f} | {r['predicted_ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
