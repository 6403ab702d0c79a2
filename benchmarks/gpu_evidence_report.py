"""The record of :mod:`benchmarks.gpu_evidence`: one JSON from the stages' records, its schema check, the
markdown tables, the plots, the summary printed last, and the GPU section of ``benchmarks/README.md``.

``python -m benchmarks.gpu_evidence_report --readme`` rewrites that section from the newest committed
real (not dry) run in ``benchmarks/results/`` (``*-evidence-*.json``), or says that none has happened;
``--check`` only says whether the README is up to date (a test runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.gpu_evidence_stage import STATUSES

SCHEMA = "wpo-gpu-evidence/1"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent / "README.md"
BEGIN = "<!-- gpu-evidence:begin (generated: python -m benchmarks.gpu_evidence_report --readme) -->"
END = "<!-- gpu-evidence:end -->"
#: Providers and modes every dry run must show timed (``ok``) rows for.
PEERS = ("ours", "torch", "trl", "liger", "cce")
MODES = ("forward", "forward_backward", "step", "trainer")
OP_MODES = MODES[:3]


# --- assembling and checking ---------------------------------------------------------------------------


def _device(meta: dict[str, Any], ops_meta: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "gpu",
        "gpu_memory_gib",
        "cuda",
        "sm_count",
        "capability",
        "cpu",
        "cpu_count",
        "torch_threads",
        "tag",
        "device",
        "dtype",
        "min_repeats",
        "interleaved",
        "memory_method",
    )
    return {k: ops_meta[k] for k in keys if k in ops_meta}


def assemble(
    meta: dict[str, Any], stages: dict[str, dict[str, Any]], *, caps: dict[str, float], total_s: float
) -> dict[str, Any]:
    """One evidence record from the run's ``meta`` and each stage's record (whatever it finished)."""
    tests, ops, trainer = stages["tests"], stages["ops"], stages["trainer"]
    ops_meta = ops.get("meta") or {}
    meta = dict(meta, **_device(meta, ops_meta))
    meta["tag"] = "cpu-dryrun" if meta["dry_run"] else ops_meta.get("tag", "cuda")
    meta["caps_s"], meta["total_cap_s"] = dict(caps), total_s
    summary_keys = ("status", "wall_s", "cap_s", "returncode", "reason", "error")
    stand_ins = dict(ops.get("stand_ins") or {})
    stand_ins.update({f"trainer {k}": v for k, v in (trainer.get("stand_ins") or {}).items()})
    return {
        "schema": SCHEMA,
        "meta": meta,
        "stages": {n: {k: s[k] for k in summary_keys if k in s} for n, s in stages.items()},
        "tests": {k: v for k, v in tests.items() if k not in summary_keys},
        "config": ops.get("config"),
        "cublas": ops.get("cublas"),
        "gemms": ops.get("gemms", []),
        "autotune": ops.get("autotune"),
        "rows": ops.get("rows", []),
        "skipped": ops.get("skipped", []),
        "not_run": ops.get("not_run", []),
        "stand_ins": stand_ins,
        "trainer": {k: trainer.get(k) for k in ("setup", "model", "data", "trainers", "losses_vs_ours")}
        | {"rows": trainer.get("rows", [])},
    }


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _row_problems(row: dict[str, Any], where: str) -> list[str]:
    need = ("provider", "peer", "mode", "status")
    problems = [f"{where}: missing {k}" for k in need if k not in row]
    if row.get("status") not in ("ok", "oom", "failed", "not run"):
        problems.append(f"{where}: status {row.get('status')!r}")
    if row.get("status") == "ok":
        if not (_finite(row.get("time_ms")) and row["time_ms"] > 0):
            problems.append(f"{where}: time_ms {row.get('time_ms')!r}")
        if row.get("mode") != "trainer" and not _finite(row.get("peak_mib")):
            problems.append(f"{where}: peak_mib {row.get('peak_mib')!r}")
        if row.get("mode") == "trainer" and not all(_finite(x) for x in row.get("losses") or [None]):
            problems.append(f"{where}: losses {row.get('losses')!r}")
    return problems


def check_schema(evidence: dict[str, Any], *, require_all: bool) -> list[str]:
    """What is wrong with ``evidence`` (empty: nothing). ``require_all`` (the dry run): every stage
    complete, and timed rows for every peer of :data:`PEERS` and every mode of :data:`MODES`."""
    problems = [
        f"missing key {k}"
        for k in ("schema", "meta", "stages", "tests", "rows", "trainer")
        if k not in evidence
    ]
    if problems:
        return problems
    for name, stage in evidence["stages"].items():
        if stage.get("status") not in STATUSES:
            problems.append(f"stage {name}: status {stage.get('status')!r}")
    op_rows, trainer_rows = evidence["rows"], evidence["trainer"]["rows"]
    for i, row in enumerate(op_rows):
        problems += _row_problems(row, f"rows[{i}]")
        if row.get("mode") not in OP_MODES:
            problems.append(f"rows[{i}]: mode {row.get('mode')!r}")
    for i, row in enumerate(trainer_rows):
        problems += _row_problems(row, f"trainer.rows[{i}]")
    if not require_all:
        return problems
    for name, stage in evidence["stages"].items():
        if stage.get("status") != "complete":
            problems.append(f"stage {name} is {stage.get('status')!r}, not complete")
    ok = [r for r in op_rows + trainer_rows if r.get("status") == "ok"]
    for peer in PEERS:
        if not any(r.get("peer") == peer for r in ok):
            problems.append(f"no timed row of {peer}")
    for mode in MODES:
        if not any(r.get("mode") == mode for r in ok):
            problems.append(f"no timed row in mode {mode}")
    tests = evidence["tests"]
    if not tests.get("passed") or tests.get("failed") or tests.get("errors"):
        problems.append(f"tests: {tests.get('passed')} passed, {tests.get('failed')} failed")
    return problems


def failures(evidence: dict[str, Any]) -> list[str]:
    """What makes the run a failure: a stage that did not complete, a test that did not pass, ours or the
    reference failing a correctness gate or a measurement, our trainer not training."""
    out = []
    for name, stage in evidence["stages"].items():
        if stage.get("status") not in ("complete", "not run") or (
            stage.get("status") == "not run" and stage.get("reason") != "not asked for (--stages)"
        ):
            out.append(
                f"stage {name}: {stage.get('status')} {stage.get('reason') or stage.get('error') or ''}"
            )
    tests = evidence["tests"]
    for f in tests.get("failures", []):
        out.append(f"test {f['nodeid']}: {f['outcome']}")
    for c in tests.get("collect_errors", []):
        out.append(f"collection error {c['collect_error']}")
    own = ("ours", "torch")
    for s in evidence["skipped"]:
        if s["provider"].split("-")[0] in own and "correctness check" in s["reason"]:
            out.append(f"{s['provider']} {s['head']} {s['mode']}: {s['reason']}")
    for r in evidence["rows"]:
        if r.get("peer") in own and r.get("status") == "failed":
            out.append(f"{r['provider']} {r['head']} N={r['n_tokens']} {r['mode']}: {r.get('reason')}")
    for r in evidence["trainer"]["rows"]:
        if r.get("provider") == "ours" and r.get("status") not in ("ok", "not run"):
            out.append(f"WPOTrainer: {r.get('status')} {r.get('reason')}")
    return out


# --- tables --------------------------------------------------------------------------------------------


def _ms(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _mib(x: float | None) -> str:
    return "–" if x is None else (f"{x:.3g}" if x < 1000 else f"{x:.0f}")


def ops_result(evidence: dict[str, Any]) -> dict[str, Any] | None:
    """The op rows in :mod:`benchmarks.run`'s result format (for :mod:`benchmarks.report` and plots)."""
    if not evidence.get("config"):
        return None
    meta = dict(evidence["meta"])
    meta.setdefault("dtype", evidence["config"].get("dtype", "bfloat16"))
    meta.setdefault("cpu", meta.get("platform", "?"))
    return {
        "meta": meta,
        "config": evidence["config"],
        "rows": evidence["rows"],
        "skipped": evidence["skipped"],
    }


def _by_shape(rows: list[dict[str, Any]]) -> dict[tuple[str, int, str], dict[str, dict[str, Any]]]:
    out: dict[tuple[str, int, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        out[(r["head"], r["n_tokens"], r["mode"])][r["provider"]] = r
    return out


def versus_table(evidence: dict[str, Any]) -> str:
    """Every shape: ours, then each other implementation's time and peak memory as multiples of ours
    (above 1: ours faster / lighter; below 1: ours slower / heavier)."""
    rows = evidence["rows"]
    names = [n for n in dict.fromkeys(r["provider"] for r in rows) if n != "ours"]
    if not rows or not names:
        return ""
    labels = {r["provider"]: r["label"] + (" [DPO]" if r.get("loss") == "dpo" else "") for r in rows}
    lines = [
        "### Ours against every other implementation\n",
        "Each cell: **its time ÷ ours · its peak memory ÷ ours** (above 1: ours faster / lighter; below 1: "
        "ours slower / heavier); `OOM`, `FAILED`: what it did; `–`: not run (see *Skipped*). [DPO]: computes "
        "the cheaper unweighted DPO step.\n",
        "| head | N | mode | ours ms · MiB | " + " | ".join(labels[n] for n in names) + " |",
        "|---|---:|---|---:|" + "---:|" * len(names),
    ]
    for (head, n, mode), cells in _by_shape(rows).items():
        ours = cells.get("ours")
        if ours is None or ours["status"] != "ok":
            base = ours["status"].upper() if ours else "–"
            lines.append(f"| {head} | {n} | {mode} | {base} | " + " | ".join("–" for _ in names) + " |")
            continue
        out = []
        for name in names:
            r = cells.get(name)
            if r is None:
                out.append("–")
            elif r["status"] != "ok":
                out.append(r["status"].upper())
            else:
                mem = r["peak_mib"] / max(ours["peak_mib"], 1e-9)
                out.append(f"{r['time_ms'] / ours['time_ms']:.2f}× · {mem:.2f}×")
        lines.append(
            f"| {head} | {n} | {mode} | {_ms(ours['time_ms'])} · {_mib(ours['peak_mib'])} | "
            + " | ".join(out)
            + " |"
        )
    return "\n".join(lines) + "\n"


def floor_table(evidence: dict[str, Any]) -> str:
    """Ours (and each route of our step) against the cuBLAS GEMMs of the same shape: the forward ÷ one GEMM,
    forward+backward and the step ÷ three (``h @ Wᵀ``, ``dZ @ W``, ``dZᵀ @ h``)."""
    ours = [r for r in evidence["rows"] if r.get("peer") == "ours" and r["status"] == "ok"]
    gemms = {(g["head"], g["n_tokens"]): g for g in evidence.get("gemms", [])}
    if not ours:
        return ""
    lines = [
        "### Ours against cuBLAS (same run)\n",
        "| head | N | mode | implementation | ms | cuBLAS GEMMs ms | ÷ GEMMs | their TFLOP/s (fwd, dH, dW) |",
        "|---|---:|---|---|---:|---:|---:|---|",
    ]
    for r in ours:
        g = gemms.get((r["head"], r["n_tokens"]), {})
        rates = ", ".join(f"{g[k + '_tflops']:.0f}" for k in ("forward", "grad_hidden", "grad_weight") if g)
        which = "1 (h @ Wᵀ)" if r["mode"] == "forward" else "3"
        lines.append(
            f"| {r['head']} | {r['n_tokens']} | {r['mode']} | {r['label']} | {_ms(r['time_ms'])} | "
            f"{_ms(r['floor_ms'])} [{which}] | {r['x_floor']:.2f} | {rates} |"
        )
    return "\n".join(lines) + "\n"


def trainer_table(evidence: dict[str, Any]) -> str:
    """The trainers: ms per step, peak memory, losses against ours."""
    tr = evidence["trainer"]
    if not tr["rows"]:
        return ""
    setup, data, model = tr.get("setup") or {}, tr.get("data") or {}, tr.get("model") or {}
    diffs = tr.get("losses_vs_ours") or {}
    lines = [
        "### Trainers end to end\n",
        f"{model.get('class', '?')} with {model.get('parameters', 0) / 1e6:,.1f} M parameters (V = "
        f"{setup.get('vocab')}, H = {setup.get('hidden')}, {setup.get('layers')} layers, bf16, random init); "
        f"{setup.get('pairs_per_step')} pairs per step of {data.get('sequence_tokens_min')}–"
        f"{data.get('sequence_tokens_max')} tokens ({100 * data.get('prompt_fraction', 0):.0f}% prompt); "
        f"ms per step: median of the {setup.get('timed_steps')} steps after {setup.get('warmup_steps')} "
        "warm-up steps; peak memory above what the models held before training (gradients, optimizer "
        "state, activations, the head's scratch), and over the last step alone.\n",
        "| trainer | options | ms / step | peak MiB | last step MiB | losses (first 3) | max abs Δ vs ours |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for r in tr["rows"]:
        opts = ", ".join(f"{k}={v}" for k, v in (r.get("options") or {}).items())
        if r["status"] != "ok":
            what = f"{r['status'].upper()}: {r.get('reason')}"
            lines.append(f"| {r['trainer']} ({r['provider']}) | {opts} | {what} | | | | |")
            continue
        losses = ", ".join(f"{x:.4f}" for x in r["losses"][:3])
        d = diffs.get(r["provider"])
        delta = f"{d['max_abs_diff']:.2g} ({d['steps']} steps)" if d else "–"
        cells = [_ms(r["time_ms"]), _mib(r.get("peak_mib")), _mib(r.get("step_peak_mib")), losses, delta]
        lines.append(f"| {r['trainer']} ({r['provider']}) | {opts} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tests_section(evidence: dict[str, Any]) -> str:
    t, stage = evidence["tests"], evidence["stages"]["tests"]
    if stage.get("status") == "not run":
        return f"## Correctness on the device\n\nNot run ({stage.get('reason')}).\n"
    lines = [
        "## Correctness on the device\n",
        f"The CUDA subset of the test suite ({', '.join(t.get('files', []))}: tests marked `gpu` and the "
        f"parametrisations taking `device`; values and gradients against the fp64 reference): "
        f"**{t.get('passed', 0)} passed, {t.get('failed', 0)} failed, {t.get('errors', 0)} errors, "
        f"{t.get('skipped', 0)} skipped** of {t.get('selected')} selected, in {stage.get('wall_s')} s "
        f"({stage.get('status')}; {t.get('workers') or 1} pytest process(es)"
        + (f"; dry run: {t['limit']} of them" if t.get("limit") else "")
        + ").\n",
    ]
    lines += [f"- FAILED `{f['nodeid']}`: {f.get('message', '')[-300:]!r}" for f in t.get("failures", [])]
    lines += [f"- collection error `{c['collect_error']}`" for c in t.get("collect_errors", [])]
    return "\n".join(lines) + "\n"


def header(evidence: dict[str, Any]) -> str:
    m = evidence["meta"]
    smi = m.get("nvidia_smi") or {}
    where = m.get("gpu") or m.get("cpu") or "?"
    if m.get("gpu"):
        where += f" ({m.get('gpu_memory_gib')} GiB, {m.get('sm_count')} SMs, CUDA {m.get('cuda')}"
        where += f", driver {smi.get('driver_version', '?')})"
    versions = " · ".join(f"{k} {v or '—'}" for k, v in m["versions"].items())
    code = m["code"]
    cublas = evidence.get("cublas")
    rate = (
        f"{cublas['tflops_median']:.0f} TFLOP/s median ({cublas['tflops_best']:.0f} best), "
        f"{cublas['dtype']} {cublas['size']}³ on random data"
        if cublas
        else "not measured"
    )
    stages = " · ".join(
        f"{n} **{s.get('status')}** ({s.get('wall_s', 0)} s of {s.get('cap_s', '–')})"
        for n, s in evidence["stages"].items()
    )
    dry = (
        "\n> **Dry run on a CPU**: tiny heads and model, the Triton interpreter and CPU stand-ins for the "
        "peers (below). The numbers test the plumbing; they say nothing about speed.\n"
        if m["dry_run"]
        else ""
    )
    return (
        f"# GPU evidence: {m['tag']}, {m['date']}\n{dry}\n"
        f"- device: {where}\n"
        f"- versions: {versions} · Python {m['python']}\n"
        f"- code: sha256 {code['sha256']} of {code['files']} files"
        + (f", git {code['git_commit'][:12]}" if code.get("git_commit") else "")
        + f"\n- cuBLAS rate in this run: {rate}\n"
        f"- stages: {stages}; whole run {m.get('wall_s')} s\n"
    )


def notes(evidence: dict[str, Any]) -> str:
    lines = ["## Notes\n"]
    lines += [
        "- Every op row passed a check of values and gradients (or loss and gradients) against the fp64 "
        "oracle before it was timed; time is the median of CUDA events (a host clock in a dry run) over "
        f"≥ {evidence['meta'].get('min_repeats', 5)} calls after a warm-up "
        "(the implementations called in turn, round after round); memory is "
        "`torch.cuda.max_memory_allocated` above the level before the call, reset per call (inputs "
        "excluded; outputs and gradients included).",
        "- *ours*, *torch* and *TRL* compute the WPO step; *Liger* (its fused DPO loss, and its fused linear "
        "cross-entropy) and *CCE* give no `log Σ_v p_v²`, so their step is the cheaper DPO loss [DPO]. "
        "Liger's DPO loss takes no precomputed reference log-probs and has no softcap (Gemma-2 skipped).",
        "- In the trainer, TRL 1.16's `use_liger_kernel=True` applies Liger's layer kernels and keeps TRL's "
        "chunked LM head (the trainer refuses Liger's fused linear cross-entropy).",
    ]
    if evidence.get("not_run"):
        cut = ", ".join(f"{x['head']}/{x['mode']}/N={x['n']}" for x in evidence["not_run"])
        lines.append(f"- Not run (stage time cap): {cut}.")
    for name, why in (evidence.get("stand_ins") or {}).items():
        lines.append(f"- Stand-in, {name}: {why}.")
    winners = evidence.get("autotune") or {}
    for kernel, picks in winners.items():
        for key, cfg in picks.items():
            lines.append(f"- Autotune, `{kernel}` at `{key}`: `{cfg}`.")
    return "\n".join(lines) + "\n"


def markdown(evidence: dict[str, Any]) -> str:
    """The whole markdown report."""
    from benchmarks import report

    parts = [header(evidence), tests_section(evidence), "## Op and step against the peers\n"]
    result = ops_result(evidence)
    if result is not None:
        parts += [versus_table(evidence), floor_table(evidence)]
        parts += [
            report.mode_table(result, mode).replace("## ", "### ", 1) for mode in result["config"]["modes"]
        ]
        parts.append(report.skipped_list(result).replace("## ", "### ", 1))
    else:
        parts.append("No op measurement was recorded.\n")
    parts += ["## Trainers\n", trainer_table(evidence) or "No trainer was run.\n", notes(evidence)]
    return "\n".join(p for p in parts if p)


def summary_text(evidence: dict[str, Any]) -> str:
    """The short table printed last: each head × mode at its largest N, and the trainers."""
    m, t = evidence["meta"], evidence["tests"]
    cublas = evidence.get("cublas")
    lines = [
        f"GPU evidence {m['tag']} {m['date']}: {m.get('gpu') or m.get('cpu')}, {m.get('wall_s')} s, "
        f"code {m['code']['sha256']}",
        "stages: "
        + ", ".join(f"{n} {s.get('status')} ({s.get('wall_s', 0)} s)" for n, s in evidence["stages"].items()),
        f"tests: {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, {t.get('errors', 0)} errors, "
        f"{t.get('skipped', 0)} skipped of {t.get('selected')}",
        f"cuBLAS: {cublas['tflops_median']:.1f} TFLOP/s ({cublas['size']}³ {cublas['dtype']})"
        if cublas
        else "cuBLAS: –",
        "",
        "| head | N | mode | ours ms | ÷ GEMMs | fastest other | its ms | ours ÷ it | ours MiB | least MiB |",
        "|---|---:|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    shapes = _by_shape(evidence["rows"])
    largest: dict[tuple[str, str], int] = {}
    for (head, n, mode), cells in shapes.items():
        if cells.get("ours", {}).get("status") == "ok":
            largest[(head, mode)] = max(n, largest.get((head, mode), 0))
    for (head, mode), n in largest.items():
        cells = shapes[(head, n, mode)]
        ours = cells["ours"]
        others = [r for p, r in cells.items() if p != "ours" and r["status"] == "ok"]
        fastest = min(others, key=lambda r: r["time_ms"]) if others else None
        lowest = min((r["peak_mib"] for r in others), default=None)
        lines.append(
            f"| {head} | {n} | {mode} | {_ms(ours['time_ms'])} | {ours['x_floor']:.2f} | "
            + (
                f"{fastest['provider']} | {_ms(fastest['time_ms'])} | "
                f"{ours['time_ms'] / fastest['time_ms']:.2f} | "
                if fastest
                else "– | – | – | "
            )
            + f"{_mib(ours['peak_mib'])} | {_mib(lowest)} |"
        )
    lines += [
        "",
        "| trainer | status | ms / step | peak MiB | max abs Δ loss vs ours |",
        "|---|---|---:|---:|---:|",
    ]
    diffs = evidence["trainer"].get("losses_vs_ours") or {}
    for r in evidence["trainer"]["rows"]:
        d = diffs.get(r["provider"])
        delta = f"{d['max_abs_diff']:.2g}" if d else "–"
        ms = _ms(r["time_ms"]) if r.get("time_ms") else "–"
        mem = _mib(r.get("peak_mib"))
        lines.append(f"| {r['trainer']} ({r['provider']}) | {r['status']} | {ms} | {mem} | {delta} |")
    return "\n".join(lines)


# --- files ---------------------------------------------------------------------------------------------


def plot_trainer(evidence: dict[str, Any], path: Path) -> Path | None:
    """ms per step, peak memory and the logged losses of each trainer, side by side."""
    rows = [r for r in evidence["trainer"]["rows"] if r.get("status") == "ok"]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m, ax_l) = plt.subplots(1, 3, figsize=(13, 3.4))
    names = [f"{r['trainer']}\n({r['provider']})" for r in rows]
    colors = {"ours": "tab:red", "trl": "tab:blue", "liger": "tab:green"}
    c = [colors.get(r["provider"], "tab:gray") for r in rows]
    ax_t.bar(names, [r["time_ms"] for r in rows], color=c)
    ax_t.set_ylabel("ms per step (median)")
    ax_m.bar(names, [r.get("peak_mib") or 0 for r in rows], color=c)
    ax_m.set_ylabel("peak MiB above the models")
    if all(r.get("peak_mib") is None for r in rows):
        ax_m.text(0.5, 0.5, "not measured on a CPU", transform=ax_m.transAxes, ha="center", va="center")
    for r, color in zip(rows, c, strict=True):
        ax_l.plot(range(1, len(r["losses"]) + 1), r["losses"], marker="o", color=color, label=r["provider"])
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("logged loss")
    ax_l.legend(fontsize=8)
    for ax in (ax_t, ax_m):
        ax.tick_params(axis="x", labelsize=7)
    m = evidence["meta"]
    dry = " (dry run: tiny model, CPU)" if m.get("dry_run") else ""
    fig.suptitle(f"Trainers end to end{dry}: {m.get('gpu') or m.get('cpu')}, {m['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(evidence: dict[str, Any], out_dir: Path) -> list[Path]:
    """``<tag>-evidence-<date>.json``, ``.md`` and the PNGs (one per op mode with results, the trainers)."""
    from benchmarks.plots import plot_all

    m = evidence["meta"]
    stem = out_dir / f"{m['tag']}-evidence-{m['date']}"
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    paths[0].write_text(json.dumps(evidence, indent=1, default=str) + "\n")
    paths[1].write_text(markdown(evidence))
    result = ops_result(evidence)
    try:
        if result is not None:
            paths += plot_all(result, stem)
        trainer_png = plot_trainer(evidence, Path(f"{stem}-trainer.png"))
        paths += [trainer_png] if trainer_png else []
    except Exception as e:  # noqa: BLE001 - the tables are written; a plot must not lose them
        print(f"plots failed: {type(e).__name__}: {e}", flush=True)
    return paths


# --- the README's GPU section --------------------------------------------------------------------------


def newest_real_run(results_dir: Path = RESULTS_DIR) -> tuple[Path, dict[str, Any]] | None:
    """The committed evidence of the newest run on a GPU (dry runs never count)."""
    runs = []
    for path in results_dir.glob("*-evidence-*.json"):
        evidence = json.loads(path.read_text())
        if evidence.get("schema") == SCHEMA and not evidence["meta"].get("dry_run"):
            runs.append((evidence["meta"].get("started_utc", evidence["meta"]["date"]), path, evidence))
    if not runs:
        return None
    _, path, evidence = max(runs, key=lambda r: r[0])
    return path, evidence


def readme_section(results_dir: Path = RESULTS_DIR) -> str:
    """The README's GPU section, from the committed results."""
    newest = newest_real_run(results_dir)
    if newest is None:
        earlier = sorted(
            p.name for p in results_dir.glob("*.md") if p.name.startswith(("h100", "h200", "cuda"))
        )
        links = ", ".join(f"[`{n}`](results/{n})" for n in earlier) or "none"
        return (
            "**No GPU run against the peers has happened yet.** `python -m benchmarks.gpu_evidence` has run "
            "only dry, on a CPU (CI runs that through `tests/test_gpu_evidence.py`); there is no measured "
            "comparison of ours with torch, TRL, Liger or CCE on a GPU, and none inside a trainer. The only "
            f"GPU numbers so far are ours against cuBLAS: {links}.\n"
        )
    path, evidence = newest
    m = evidence["meta"]
    v = m["versions"]
    parts = [
        f"From [`{path.name}`](results/{path.name}) (full tables: [`{path.with_suffix('.md').name}`]"
        f"(results/{path.with_suffix('.md').name})): {m.get('gpu')}, {m['date']}, torch "
        f"{v.get('torch')}, triton {v.get('triton')}, trl {v.get('trl')}, "
        f"liger-kernel {v.get('liger-kernel')}, cut-cross-entropy "
        f"{v.get('cut-cross-entropy')}; code sha256 {m['code']['sha256']}. Stages: "
        + ", ".join(f"{n} {s.get('status')}" for n, s in evidence["stages"].items())
        + ".\n",
        tests_section(evidence).replace("## ", "#### ", 1),
        versus_table(evidence).replace("### ", "#### ", 1),
        floor_table(evidence).replace("### ", "#### ", 1),
        trainer_table(evidence).replace("### ", "#### ", 1),
    ]
    return "\n".join(p for p in parts if p)


def update_readme(readme: Path = README, results_dir: Path = RESULTS_DIR, *, check: bool = False) -> bool:
    """Rewrite the text between the markers of ``readme``; with ``check``, only say whether it is current."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme} has no {BEGIN!r} … {END!r} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{readme_section(results_dir)}{END}{tail}"
    if check:
        return new == text
    readme.write_text(new)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_evidence_report", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--readme", action="store_true", help="rewrite the GPU section of benchmarks/README.md")
    ap.add_argument("--check", action="store_true", help="exit 1 if that section is not up to date")
    ap.add_argument("--markdown", type=Path, help="print the markdown report of this evidence JSON")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    if args.check:
        ok = update_readme(check=True)
        print("benchmarks/README.md GPU section is " + ("up to date" if ok else "stale: run --readme"))
        return 0 if ok else 1
    if args.readme:
        update_readme()
        return 0
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
