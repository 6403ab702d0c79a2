"""The example's outputs: a Markdown + JSON report and a PNG of the training curves."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from wpo_kernels.integration.examples.evaluation import PreferenceEval

_COLUMNS = (
    ("reward_accuracy", "reward acc.", "{:.1%}"),
    ("reward_margin", "reward margin", "{:+.3f}"),
    ("likelihood_accuracy", "prefers chosen", "{:.1%}"),
    ("answer_accuracy", "greedy answer acc.", "{:.1%}"),
)


def results_table(evals: Mapping[str, PreferenceEval]) -> str:
    """A Markdown table, one row per model (``"SFT (before)"``, ``"WPO"``, ...)."""
    head = "| model | " + " | ".join(c[1] for c in _COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(_COLUMNS)
    rows = [
        f"| {name} | " + " | ".join(fmt.format(getattr(ev, key)) for key, _, fmt in _COLUMNS) + " |"
        for name, ev in evals.items()
    ]
    return "\n".join([head, rule, *rows])


def error_table(evals: Mapping[str, PreferenceEval]) -> str:
    """Held-out reward accuracy per kind of mistake in the rejected answer (Markdown)."""
    kinds = sorted({k for ev in evals.values() for k in ev.by_error})
    head = "| model | " + " | ".join(kinds) + " |"
    rule = "|---|" + "---:|" * len(kinds)
    rows = [
        f"| {name} | " + " | ".join(f"{ev.by_error.get(k, float('nan')):.1%}" for k in kinds) + " |"
        for name, ev in evals.items()
    ]
    return "\n".join([head, rule, *rows])


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(h["step"], h[key]) for h in history if key in h]
    return [p[0] for p in points], [p[1] for p in points]


def _applied_weight(name: str, history: Sequence[Mapping[str, Any]]) -> float:
    """Mean of the logged ``weights/pair_mean`` (1 for the unweighted DPO run)."""
    _, values = _series(history, "weights/pair_mean")
    return sum(values) / len(values) if values else float("nan")


def plot_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> Path:
    """Training curves of each run (``trainer.state.log_history``) as a 2×2 PNG: loss, train reward
    accuracy, held-out reward accuracy (``eval_rewards/accuracies``) and WPO weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = (
        (axes[0, 0], "loss", "training loss (WPO's is weighted by its pair weights)"),
        (axes[0, 1], "rewards/accuracies", "train reward accuracy"),
        (axes[1, 0], "eval_rewards/accuracies", "held-out reward accuracy (TRL's eval, ties count 0)"),
    )
    for ax, key, title in panels:
        for name, history in histories.items():
            steps, values = _series(history, key)
            if steps:
                ax.plot(steps, values, marker="o" if key.startswith("eval") else None, ms=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes[1, 1]
    for name, history in histories.items():
        for side, style in (("chosen", "-"), ("rejected", "--")):
            steps, values = _series(history, f"weights/{side}_mean")
            if steps:
                ax.plot(steps, values, style, label=f"{name}: w({side})")
    ax.set_title("mean WPO weight per side (DPO: logged, not applied)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    out_dir: Path,
    *,
    settings: Mapping[str, Any],
    evals: Mapping[str, PreferenceEval],
    runtimes: Mapping[str, float],
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    plot: Path | None,
) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.json`` to ``out_dir``; returns their paths."""
    md = [
        "# WPO vs DPO on held-out arithmetic preferences",
        "",
        "Held-out pairs: correct sum (chosen) vs a plausible mistake (rejected), prompts never seen in "
        "training. Reward accuracy counts pairs with β·(r_chosen − r_rejected) > 0 (ties ½, so the SFT "
        "model, equal to its reference, scores 50%); *prefers chosen* is log π(chosen) > log π(rejected); "
        "*greedy answer acc.* decodes the answer and checks it.",
        "",
        results_table(evals),
        "",
        "Reward accuracy per kind of mistake in the rejected answer:",
        "",
        error_table(evals),
        "",
        "Mean pair weight applied during training: "
        + ", ".join(f"{name} {_applied_weight(name, h):.3f}" for name, h in histories.items())
        + " (WPO's weights shrink its steps relative to DPO at the same learning rate).",
        "",
        "Runtime (s): " + ", ".join(f"{k} {v:.1f}" for k, v in runtimes.items()),
        "",
        "Settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items()),
    ]
    if plot is not None:
        md += ["", f"![training curves]({plot.name})"]
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(md) + "\n")
    json_path = out_dir / "report.json"
    payload = {
        "settings": dict(settings),
        "held_out": {name: asdict(ev) for name, ev in evals.items()},
        "runtime_s": dict(runtimes),
        "log_history": {name: list(h) for name, h in histories.items()},
    }
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return md_path, json_path
