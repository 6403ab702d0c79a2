"""``wpo-study``'s outputs: ``report.md`` (tables), ``report.json`` (every row) and ``accuracy.png``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Row = Mapping[str, Any]


def _p(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2g}" if value >= 1e-4 else "<1e-4"


def _cell(row: Row) -> str:
    """``"A on A's samples (on-policy)"``-style label of a run's training data."""
    if row["data"] == "-":
        return "–"
    if row["data"] == "scripted":
        return "scripted pairs"
    owner = row["data"].removeprefix("samples of ")
    return f"{owner}'s samples ({'on' if row['on_policy'] else 'off'}-policy)"


def runs_table(rows: Sequence[Row]) -> str:
    """Markdown table of runs: accuracy with its 95% interval, McNemar p-values, distance moved, weights."""
    head = (
        "| model | data | method | lr | held-out greedy acc. [95% CI] | Δ vs SFT | p vs SFT "
        "| p vs cont. SFT | p WPO vs DPO | KL to SFT | mean applied weight |"
    )
    rule = "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    sft = {r["model"]: r["accuracy"] for r in rows if r["method"] == "SFT"}
    lines = [head, rule]
    for r in rows:
        lo, hi = r["ci95"]
        delta = r["accuracy"] - sft[r["model"]] if r["model"] in sft else float("nan")
        weight = r.get("applied_weight")
        lines.append(
            f"| {r['model']} | {_cell(r)} | {r['method']} | {r['lr']:g} | {r['accuracy']:.1%} "
            f"[{lo:.1%}, {hi:.1%}] | {delta * 100:+.1f} pp | {_p(r.get('p_vs_sft'))} "
            f"| {_p(r.get('p_vs_continued_sft'))} | {_p(r.get('p_wpo_vs_dpo'))} | {r['kl_to_sft']:.3f} "
            f"| {'–' if weight is None else f'{weight:.2f}'} |"
        )
    return "\n".join(lines)


def wpo_vs_dpo_table(rows: Sequence[Row]) -> str:
    """Markdown table: WPO − DPO held-out accuracy per training cell at each learning rate, with the
    McNemar p-value, the discordant prompts and how far each moved (KL to the SFT start)."""
    lines = [
        "| model | data | lr | DPO acc. | WPO acc. | WPO − DPO | p | prompts only WPO / only DPO got right "
        "| KL DPO | KL WPO |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    dpo = {(r["model"], r["data"], r["lr"]): r for r in rows if r["method"] == "DPO"}
    for r in rows:
        d = dpo.get((r["model"], r["data"], r["lr"]))
        if r["method"] != "WPO" or d is None:
            continue
        lines.append(
            f"| {r['model']} | {_cell(r)} | {r['lr']:g} | {d['accuracy']:.1%} | {r['accuracy']:.1%} "
            f"| {(r['accuracy'] - d['accuracy']) * 100:+.1f} pp | {_p(r['p_wpo_vs_dpo'])} "
            f"| {r['wpo_only_correct']} / {r['dpo_only_correct']} "
            f"| {d['kl_to_sft']:.3f} | {r['kl_to_sft']:.3f} |"
        )
    return "\n".join(lines)


def summary(rows: Sequence[Row], weights: Sequence[Row], alpha: float = 0.05) -> list[str]:
    """Findings read off the rows (Markdown bullets): WPO against DPO at the same learning rate and at no
    more distance moved, runs against their SFT start and continued SFT, and the mean pair weights."""
    out = []
    paired = [r for r in rows if r["method"] == "WPO" and "p_wpo_vs_dpo" in r]
    dpo = {(r["model"], r["data"], r["lr"]): r for r in rows if r["method"] == "DPO"}
    better = [r for r in paired if r["accuracy"] > dpo[r["model"], r["data"], r["lr"]]["accuracy"]]
    sig = lambda rs: sum(r["p_wpo_vs_dpo"] < alpha for r in rs)  # noqa: E731
    worse = [r for r in paired if r not in better]
    out.append(
        f"- WPO vs DPO at the same learning rate: WPO higher in {len(better)} of {len(paired)} comparisons "
        f"({sig(better)} with p < {alpha}), DPO higher or equal in {len(worse)} "
        f"({sig(worse)} with p < {alpha})."
    )
    matched = []  # (WPO run, the best DPO run of its cell that moved no further)
    for r in paired:
        closer = [
            d for d in dpo.values()
            if (d["model"], d["data"]) == (r["model"], r["data"]) and d["kl_to_sft"] <= r["kl_to_sft"]
        ]  # fmt: skip
        if closer:
            matched.append((r, max(closer, key=lambda d: d["accuracy"])))
    dpo_wins = [(r, d) for r, d in matched if d["accuracy"] >= r["accuracy"]]
    detail = "; ".join(
        f"{r['model']} on {_cell(r)}: DPO lr {d['lr']:g} {d['accuracy']:.1%} at KL {d['kl_to_sft']:.3f} "
        f"vs WPO lr {r['lr']:g} {r['accuracy']:.1%} at KL {r['kl_to_sft']:.3f}"
        for r, d in dpo_wins
    )
    out.append(
        "- At no more distance moved (the best DPO run of the same cell whose KL to SFT is ≤ the WPO run's): "
        f"{len(matched)} of {len(paired)} WPO runs have such a DPO run; DPO is as good or better for "
        f"{len(dpo_wins)} of them" + (f" ({detail})." if detail else ".")
    )
    sft = {r["model"]: r for r in rows if r["method"] == "SFT"}
    cont = {r["model"]: r for r in rows if r["method"] == "continued SFT"}
    prefs = [r for r in rows if r["data"] != "-"]
    above = [r for r in prefs if r["accuracy"] > sft[r["model"]]["accuracy"] and r["p_vs_sft"] < alpha]
    below = [r for r in prefs if r["accuracy"] < sft[r["model"]]["accuracy"] and r["p_vs_sft"] < alpha]
    names = ", ".join(f"{r['model']} {r['method']} lr {r['lr']:g} on {_cell(r)}" for r in above)
    out.append(
        f"- Against the SFT start (p < {alpha}): {len(above)} of {len(prefs)} preference runs are better, "
        f"{len(below)} worse" + (f"; the better ones: {names}." if names else ".")
    )
    for m in sft:
        best = max((r for r in prefs if r["model"] == m), key=lambda r: r["accuracy"], default=None)
        if best is not None and m in cont:
            out.append(
                f"- Model {m}: SFT start {sft[m]['accuracy']:.1%}, continued SFT (same steps) "
                f"{cont[m]['accuracy']:.1%}, best preference run {best['accuracy']:.1%} "
                f"({best['method']} lr {best['lr']:g} on {_cell(best)})."
            )
    kinds: dict[str, list[float]] = {}
    for w in weights:
        kind = "scripted" if w["data"] == "scripted" else "on-policy" if w["on_policy"] else "off-policy"
        kinds.setdefault(kind, []).append(w["pair_weight"])
    out.append(
        "- Mean WPO pair weight under the SFT starts: "
        + ", ".join(f"{k} {sum(v) / len(v):.2f}" for k, v in kinds.items())
        + "."
    )
    return out


def weight_table(weights: Sequence[Row]) -> str:
    """Markdown table: mean WPO weights (sampled alignment) of each data source under each SFT model."""
    lines = [
        "| SFT model | data source | pairs | mean w(chosen) | mean w(rejected) | mean pair weight |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for w in weights:
        kind = "" if w["data"] == "scripted" else (" (on-policy)" if w["on_policy"] else " (off-policy)")
        lines.append(
            f"| {w['model']} | {w['data']}{kind} | {w['pairs']} | {w['chosen_weight']:.3f} "
            f"| {w['rejected_weight']:.3f} | {w['pair_weight']:.3f} |"
        )
    return "\n".join(lines)


def _method_colours(methods: Sequence[tuple[str, float]]) -> dict[tuple[str, float], Any]:
    """DPO in blues and WPO in oranges (darker: larger learning rate), the ablation rows in other hues."""
    import matplotlib.pyplot as plt

    others = iter(plt.get_cmap("Set2")(range(8)))
    colours = {}
    for method, lr in methods:
        family = {"DPO": "Blues", "WPO": "Oranges"}.get(method)
        if family is None:
            colours[method, lr] = next(others)
            continue
        lrs = sorted(x for m, x in methods if m == method)
        colours[method, lr] = plt.get_cmap(family)(0.45 + 0.45 * lrs.index(lr) / max(1, len(lrs) - 1))
    return colours


def plot_study(rows: Sequence[Row], path: Path) -> Path:
    """Two panels: held-out accuracy (95% CI) per training cell and method, SFT and continued SFT as
    lines; and accuracy against the distance moved (KL to the SFT start)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in rows if r["data"] != "-"]
    cells = list(dict.fromkeys((r["model"], r["data"]) for r in runs))
    methods = list(dict.fromkeys((r["method"], r["lr"]) for r in runs))
    colours = _method_colours(methods)
    fig, (ax, ax_kl) = plt.subplots(1, 2, figsize=(15, 7), gridspec_kw={"width_ratios": [2.2, 1]})
    width = 0.8 / len(methods)
    labelled: set[tuple[str, float]] = set()
    for x, (model, data) in enumerate(cells):
        for j, key in enumerate(methods):
            match = [r for r in runs if (r["model"], r["data"], r["method"], r["lr"]) == (model, data, *key)]
            if not match:
                continue
            r = match[0]
            lo, hi = r["ci95"]
            ax.bar(
                x - 0.4 + (j + 0.5) * width, r["accuracy"], width, color=colours[key],
                yerr=[[r["accuracy"] - lo], [hi - r["accuracy"]]], capsize=2,
                label=None if key in labelled else f"{key[0]} lr={key[1]:g}",
            )  # fmt: skip
            labelled.add(key)
        for method, style in (("SFT", "-"), ("continued SFT", "--")):
            base = [r for r in rows if r["model"] == model and r["method"] == method]
            if base:
                ax.hlines(base[0]["accuracy"], x - 0.45, x + 0.45, colors="k", linestyles=style, lw=1.2)
    ax.plot([], [], "k-", label="SFT start")
    ax.plot([], [], "k--", label="continued SFT")
    labels = [f"{m} on {_cell({'data': d, 'on_policy': d == f'samples of {m}'})}" for m, d in cells]
    ax.set_xticks(range(len(cells)), [lbl.replace(" (", "\n(") for lbl in labels], fontsize=8)
    accs = [r["accuracy"] for r in rows]
    ax.set_ylim(max(0.0, min(accs) - 0.08), min(1.0, max(accs) + 0.05))
    ax.set_ylabel("held-out greedy answer accuracy")
    ax.set_title("accuracy per training cell and method (95% Wilson intervals)")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    ax.grid(axis="y", alpha=0.3)
    markers = {"DPO": "o", "WPO": "s"}
    for r in rows:
        marker = markers.get(r["method"], "^" if r["data"] != "-" else "x")
        colour = "tab:blue" if r["method"] == "DPO" else "tab:orange" if r["method"] == "WPO" else "tab:gray"
        ax_kl.scatter(r["kl_to_sft"], r["accuracy"], marker=marker, color=colour, s=25)
    for label, marker, colour in (
        ("DPO", "o", "tab:blue"),
        ("WPO", "s", "tab:orange"),
        ("ablation / scripted", "^", "tab:gray"),
        ("SFT start / continued SFT", "x", "tab:gray"),
    ):
        ax_kl.scatter([], [], marker=marker, color=colour, label=label)
    ax_kl.set_xlabel("KL(policy ‖ SFT start), nats per answer")
    ax_kl.set_ylabel("held-out greedy answer accuracy")
    ax_kl.set_title("accuracy vs distance moved")
    ax_kl.grid(alpha=0.3)
    ax_kl.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_study_report(
    out_dir: Path,
    *,
    rows: Sequence[Row],
    weights: Sequence[Row],
    sampling: Mapping[str, Mapping[str, float]],
    settings: Mapping[str, Any],
    env: Mapping[str, Any],
    plot: Path | None,
) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.json`` to ``out_dir``; returns their paths."""
    base = [r for r in rows if r["data"] == "-"]
    crossed = [r for r in rows if r["data"].startswith("samples of") and r["method"] in ("DPO", "WPO")]
    ablation = [r for r in rows if r["data"] != "-" and r not in crossed and r["data"] != "scripted"]
    first_cell = ablation[0] if ablation else None
    if first_cell is not None:  # DPO and WPO (sampled) of the ablation cell, for comparison
        ablation = [
            r for r in crossed
            if (r["model"], r["data"], r["lr"]) == (first_cell["model"], first_cell["data"], first_cell["lr"])
        ] + ablation  # fmt: skip
    scripted = [r for r in rows if r["data"] == "scripted"]
    with_base = lambda runs: [r for r in base if r["model"] in {x["model"] for x in runs}] + list(runs)  # noqa: E731
    n_eval = rows[0]["n_eval"]
    md = [
        "# wpo-study: WPO vs DPO on the arithmetic task",
        "",
        f"Command: `{env['command']}` — {env['date_utc']}, {env['machine']}, {env['cpu_count']} CPUs, "
        f"{env['torch_threads']} torch threads, load average at the end {env['load_average']}, "
        f"total runtime {env['runtime_s']:.0f} s.",
        "",
        f"Held-out greedy answer accuracy on {n_eval} two-digit addition prompts never used in training "
        "(95% Wilson interval). p-values: McNemar's exact test on the same prompts, against the run's SFT "
        "start, its continued-SFT row, and WPO against DPO of the same cell and learning rate. KL: "
        "KL(policy ‖ SFT start) in nats per answer on held-out prompts, the exact next-token KL summed along "
        "one answer sampled from the policy per prompt (how far the model moved). "
        "Mean applied weight: WPO's pair weight during training (1 for DPO).",
        "",
        "## Summary (computed from the rows below)",
        "",
        *summary(rows, weights),
        "",
        "## SFT starts",
        "",
        runs_table(base),
        "",
        "Sampling (4 answers per training prompt at temperature 1; a pair needs a correct and a wrong one): "
        + "; ".join(
            f"{m}: sample accuracy {s['sample_accuracy']:.1%}, {s['pairs']} pairs from {s['prompts']} prompts"
            for m, s in sampling.items()
        ),
        "",
        "## Model-generated pairs, crossed design (DPO vs WPO, sampled alignment)",
        "",
        runs_table(with_base(crossed)),
        "",
        "WPO against DPO at the same learning rate:",
        "",
        wpo_vs_dpo_table(rows),
        "",
        "## Alignment ablation and variants (one off-policy cell)",
        "",
        runs_table(with_base(ablation)),
        "",
        "## Scripted pairs (the shipped data set)",
        "",
        runs_table(with_base(scripted)),
        "",
        "## Mean WPO weights per data source (sampled alignment, under each SFT start, before training)",
        "",
        weight_table(weights),
        "",
        "Settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items()),
    ]
    if plot is not None:
        md += ["", f"![accuracy per cell and method]({plot.name})"]
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(md) + "\n")
    json_path = out_dir / "report.json"
    payload = {
        "environment": dict(env),
        "settings": dict(settings),
        "runs": [dict(r) for r in rows],
        "weights": [dict(w) for w in weights],
        "sampling": {k: dict(v) for k, v in sampling.items()},
    }
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    return md_path, json_path
