"""``wpo-study``'s outputs: ``report.md`` (claims and tables), ``report.json`` (every run, start and claim)
and ``claims.png``; and the headline table it prints. Every sentence with a number is written here, from
the report's data."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Row = Mapping[str, Any]


def fmt_p(value: float | None) -> str:
    """A p-value for a table: two significant digits, ``< 1e-4`` below that."""
    if value is None:
        return "–"
    return f"{value:.2g}" if value >= 1e-4 else "< 1e-4"


def effect(claim: Row) -> str:
    """A claim's pooled effect: percentage points of accuracy, or a difference of mean weights."""
    return f"{claim['effect_pp']:+.1f} pp" if "effect_pp" in claim else f"{claim['effect']:+.3f}"


def held_text(claim: Row) -> str:
    """``"held in k of n seed pairs (significant in j)"``."""
    return f"held in {claim['held']} of {claim['of']} seed pairs (significant in {claim['significant']})"


def headline(claims: Sequence[Row]) -> str:
    """The claims as a plain-text table (what ``wpo-study`` prints at the end)."""
    width = max(len(c["claim"]) for c in claims)
    lines = [f"{'claim':<{width}}  held   signif.  pooled effect  p (pooled)  verdict"]
    for c in claims:
        lines.append(
            f"{c['claim']:<{width}}  {c['held']}/{c['of']:<4} {c['significant']:<8} {effect(c):>13}  "
            f"{fmt_p(c['p']):>10}  {c['verdict']}"
        )
    return "\n".join(lines)


def claims_table(claims: Sequence[Row]) -> str:
    """Markdown table of the claims with their counts, pooled tests and verdicts."""
    lines = [
        "| claim | the paper | across seed pairs | pooled effect | pooled p (test) | sign test over pairs "
        "| verdict |",
        "|---|---|---|---:|---|---:|---|",
    ]
    for c in claims:
        lines.append(
            f"| {c['claim']} | {c['paper']} | {held_text(c)} | {effect(c)} | {fmt_p(c['p'])} ({c['test']}) "
            f"| {fmt_p(c['sign_test_p'])} | **{c['verdict']}** |"
        )
    return "\n".join(lines)


def starts_table(report: Row) -> str:
    """Markdown table: every SFT start (steps, validation accuracy in the band, evaluation accuracy), its
    continued-SFT control and its samples."""
    runs = {(r["pair"], r["model"], r["method"]): r for r in report["runs"] if r["data"] == "-"}
    sampling = {(s["pair"], s["model"]): s for s in report["sampling"]}
    low, high = report["settings"]["sft_band"]
    lines = [
        f"| pair | model | seed | SFT steps | validation acc. (band {low:.0%}–{high:.0%}) "
        "| evaluation acc. [95% CI] | continued SFT (+ steps) | sample acc. | pairs |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in report["sft_starts"]:
        sft, cont = runs[s["pair"], s["model"], "SFT"], runs[s["pair"], s["model"], "continued SFT"]
        samp = sampling[s["pair"], s["model"]]
        lo, hi = sft["ci95"]
        lines.append(
            f"| {s['pair']} | {s['model']} | {s['seed']} | {s['steps']} | {s['val_accuracy']:.1%} "
            f"| {sft['accuracy']:.1%} [{lo:.1%}, {hi:.1%}] | {cont['accuracy']:.1%} (+{cont['steps']}) "
            f"| {samp['sample_accuracy']:.1%} | {samp['pairs']} |"
        )
    return "\n".join(lines)


def _cell(row: Row) -> str:
    owner = row["data"].removeprefix("samples of ")
    return f"{owner}'s samples ({'on' if row['on_policy'] else 'off'}-policy)"


def design_table(rows: Sequence[Row]) -> str:
    """Markdown matrix of the design runs: one line per (pair, model, data), one column per method and
    learning rate; each cell the evaluation accuracy and, in brackets, the KL to the SFT start."""
    runs = [r for r in rows if r["data"] != "-" and r["role"] == "design"]
    columns = list(dict.fromkeys((r["method"], r["lr"]) for r in runs))
    cells = list(dict.fromkeys((r["pair"], r["model"], r["data"]) for r in runs))
    by_key = {(r["pair"], r["model"], r["data"], r["method"], r["lr"]): r for r in runs}
    lines = [
        "| pair | model | trained on | " + " | ".join(f"{m} {lr:g}" for m, lr in columns) + " |",
        "|---:|---|---|" + "---:|" * len(columns),
    ]
    for pair, model, data in cells:
        found = [by_key.get((pair, model, data, m, lr)) for m, lr in columns]
        first = next(r for r in found if r is not None)
        values = ["–" if r is None else f"{r['accuracy']:.1%} ({r['kl_to_sft']:.2f})" for r in found]
        lines.append(f"| {pair} | {model} | {_cell(first)} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def steps_check(rows: Sequence[Row]) -> dict[int, dict[str, Row]]:
    """The steps check's cell: ``{steps: {"DPO": row, "WPO": row}}`` at the design's steps and at twice
    as many (empty without a steps check)."""
    check = [r for r in rows if r["role"] == "steps check"]
    cell = lambda r: (r["pair"], r["model"], r["data"], r["lr"])  # noqa: E731
    cells = {cell(r) for r in check}
    out: dict[int, dict[str, Row]] = {}
    for r in rows:
        if cell(r) in cells and r["method"] in ("DPO", "WPO"):
            out.setdefault(r["steps"], {})[r["method"]] = r
    return dict(sorted(out.items()))


def mean_curves(rows: Sequence[Row], lr: float) -> dict[str, dict[int, float]]:
    """Mean validation accuracy of each method at each checked step, over its off-policy design runs at
    ``lr`` (the runs every method has, so that the curves compare like with like)."""
    sums: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        if r["role"] == "design" and r["on_policy"] is False and r["lr"] == lr:
            for step, acc in r["curve"]:
                sums.setdefault(r["method"], {}).setdefault(step, []).append(acc)
    return {m: {s: sum(v) / len(v) for s, v in sorted(by.items())} for m, by in sums.items()}


def steps_evidence(rows: Sequence[Row], lr: float) -> list[str]:
    """Markdown: the steps check (DPO and WPO at the design's steps and twice as many, one cell) and the
    mean validation curve of each method."""
    out = ["| run | steps | evaluation acc. | KL to SFT | WPO − DPO |", "|---|---:|---:|---:|---:|"]
    for n, runs in steps_check(rows).items():
        gap = 100 * (runs["WPO"]["accuracy"] - runs["DPO"]["accuracy"])
        for method, r in runs.items():
            out.append(
                f"| pair {r['pair']} {r['model']} {method} on {_cell(r)}, lr {r['lr']:g} | {n} "
                f"| {r['accuracy']:.1%} | {r['kl_to_sft']:.3f} | {gap:+.1f} pp |"
            )
    curves = mean_curves(rows, lr)
    steps = sorted({s for c in curves.values() for s in c})
    out += [
        "",
        f"Mean validation accuracy during training (off-policy runs at lr {lr:g}, every method):",
        "",
        "| method | " + " | ".join(f"step {s}" for s in steps) + " |",
        "|---|" + "---:|" * len(steps),
    ]
    for method, curve in curves.items():
        values = [f"{curve[s]:.1%}" if s in curve else "–" for s in steps]
        out.append(f"| {method} | " + " | ".join(values) + " |")
    return out


def weight_table(weights: Sequence[Row]) -> str:
    """Markdown table: mean WPO weights (sampled alignment) of each data source under each SFT start."""
    lines = [
        "| pair | SFT model | data source | pairs | mean w(chosen) | mean w(rejected) "
        "| mean pair weight (sd) |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for w in weights:
        kind = {"own": " (on-policy)", "other": " (off-policy)"}.get(w["kind"], "")
        lines.append(
            f"| {w['pair']} | {w['model']} | {w['data']}{kind} | {w['pairs']} | {w['chosen_weight']:.3f} "
            f"| {w['rejected_weight']:.3f} | {w['pair_weight']:.3f} ({w['pair_weight_sd']:.3f}) |"
        )
    return "\n".join(lines)


def runs_table(rows: Sequence[Row]) -> str:
    """Markdown table of every run: accuracy with its 95% interval and the per-run McNemar p-values."""
    lines = [
        "| pair | model | method | trained on | lr | steps | acc. [95% CI] | p vs SFT | p vs cont. SFT "
        "| p vs DPO | KL to SFT | applied weight |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lo, hi = r["ci95"]
        weight = r.get("applied_weight")
        lines.append(
            f"| {r['pair']} | {r['model']} | {r['method']} | {'–' if r['data'] == '-' else _cell(r)} "
            f"| {r['lr']:g} | {r['steps']} | {r['accuracy']:.1%} [{lo:.1%}, {hi:.1%}] "
            f"| {fmt_p(r.get('p_vs_sft'))} | {fmt_p(r.get('p_vs_continued_sft'))} "
            f"| {fmt_p(r.get('p_vs_dpo'))} "
            f"| {r['kl_to_sft']:.3f} | {'–' if weight is None else f'{weight:.2f}'} |"
        )
    return "\n".join(lines)


def _intro(report: Row) -> list[str]:
    env, s = report["environment"], report["settings"]
    low, high = s["sft_band"]
    n_eval, n_pairs = report["runs"][0]["n_eval"], len(report["sft_starts"]) // 2
    return [
        "# wpo-study: which of the WPO paper's claims hold on the arithmetic task",
        "",
        f"Command: `{env['command']}` — {env['date_utc']}, {env['machine']}, {env['cpu_count']} CPUs, "
        f"{env['torch_threads']} torch threads, load average (1, 5, 15 min) at the start "
        f"{env['load_average_start']}, at the end {env['load_average']}; "
        f"{env['wall_s']:.0f} s wall, {env['cpu_s']:.0f} s CPU.",
        "",
        f"{n_pairs} seed pairs, each a full replicate: two SFT models trained until their greedy accuracy on "
        f"{s['val_prompts']} validation prompts lay in {low:.0%}–{high:.0%}; each trained with DPO and WPO "
        f"on its own samples (on-policy) and the other model's (off-policy), {s['steps']} steps of "
        f"{s['batch_size']} pairs, β = {s['beta']}, learning rate {', '.join(f'{x:g}' for x in s['lrs'])}; "
        f"the ablation on its off-policy samples. Accuracy: greedy answers on {n_eval} evaluation prompts "
        "never used in training or validation. The claims were fixed in `study_claims.py` before the runs.",
    ]


def markdown(report: Row, plot: Path | None) -> str:
    """The whole ``report.md``."""
    from wpo_kernels.integration.examples.study_claims import COUNTING

    s = report["settings"]
    md = [
        *_intro(report), "",
        "## Claims", "", claims_table(report["claims"]), "",
        "How each claim is counted (`study_claims.py`):", "", COUNTING, "",
        "## SFT starts", "", starts_table(report), "",
        "## Accuracy per seed pair, data and method (in brackets: KL to the SFT start, nats per answer)", "",
        design_table(report["runs"]), "",
        "## Are the steps enough?", "", *steps_evidence(report["runs"], s["lrs"][0]), "",
        "## Mean WPO weights per data source (sampled alignment, under each SFT start, before training)", "",
        weight_table(report["weights"]), "",
        "## Every run", "", runs_table(report["runs"]), "",
        "Settings: " + ", ".join(f"`{k}={v}`" for k, v in s.items()),
    ]  # fmt: skip
    if plot is not None:
        md += ["", f"![claims per seed pair]({plot.name})"]
    return "\n".join(md) + "\n"


def write_study_report(out_dir: Path, report: Row, plot: Path | None) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.json`` to ``out_dir``; returns their paths."""
    md_path, json_path = out_dir / "report.md", out_dir / "report.json"
    md_path.write_text(markdown(report, plot))
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    return md_path, json_path


def plot_study(report: Row, path: Path) -> Path:
    """Two panels: each accuracy claim's effect per seed pair (dots) and pooled (diamond); and the mean
    validation accuracy of each method during training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    claims = [c for c in report["claims"] if "effect_pp" in c]
    fig, (ax, ax_curve) = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [1.6, 1]})
    for y, c in enumerate(reversed(claims)):
        xs = [p["effect_pp"] for p in c["per_pair"]]
        ax.scatter(xs, [y] * len(xs), color="tab:blue", s=18, alpha=0.7)
        ax.scatter([c["effect_pp"]], [y], marker="D", color="k", s=40)
    ax.axvline(0.0, color="grey", lw=1)
    ax.set_yticks(range(len(claims)), [c["claim"] for c in reversed(claims)], fontsize=8)
    ax.set_xlabel("first − second, evaluation accuracy (pp): dots = seed pairs, diamond = pooled")
    ax.set_title("accuracy claims across seed pairs")
    ax.grid(axis="x", alpha=0.3)
    for method, curve in mean_curves(report["runs"], report["settings"]["lrs"][0]).items():
        ax_curve.plot(list(curve), list(curve.values()), marker="o", label=method)
    ax_curve.set_xlabel("preference-training step")
    ax_curve.set_ylabel("validation accuracy (mean over runs)")
    ax_curve.set_title("validation curves, off-policy runs")
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


if __name__ == "__main__":  # re-render report.md and claims.png from a report.json
    import sys

    source = Path(sys.argv[1])
    data = json.loads(source.read_text())
    figure = plot_study(data, source.parent / "claims.png")
    print(*write_study_report(source.parent, data, figure), figure)
