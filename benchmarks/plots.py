"""PNG plots of a result: for each mode, one figure with a row per head and two panels, time and peak
memory against N (log-log), one line per implementation; the bare-GEMM floor dashed in the time panel."""

from __future__ import annotations

from pathlib import Path

from benchmarks.report import MODE_TITLES

_STYLE = {
    "ours": dict(color="tab:red", marker="o", linewidth=2.2),
    "torch": dict(color="tab:gray", marker="s"),
    "trl": dict(color="tab:blue", marker="^"),
    "liger": dict(color="tab:green", marker="v"),
    "liger-flce": dict(color="tab:olive", marker="<"),
    "cce": dict(color="tab:purple", marker="D"),
}


def plot_mode(result: dict, mode: str, path: Path) -> Path | None:
    """One figure for ``mode``; None when the mode has no successful row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter, NullFormatter
    from matplotlib.transforms import blended_transform_factory

    rows = [r for r in result["rows"] if r["mode"] == mode and r["status"] == "ok"]
    oom = [r for r in result["rows"] if r["mode"] == mode and r["status"] == "oom"]
    if not rows:
        return None
    heads = list(dict.fromkeys(r["head"] for r in rows))
    fig, axes = plt.subplots(len(heads), 2, figsize=(11, 3.1 * len(heads)), squeeze=False)
    for i, head in enumerate(heads):
        ax_t, ax_m = axes[i]
        mine = [r for r in rows if r["head"] == head]
        for name in dict.fromkeys(r["provider"] for r in mine):
            pts = sorted(
                (r["n_tokens"], r["time_ms"], r["peak_mib"], r["label"])
                for r in mine
                if r["provider"] == name
            )
            xs = [p[0] for p in pts]
            label = pts[0][3] + (
                " [DPO]"
                if mode == "step" and any(r.get("loss") == "dpo" for r in mine if r["provider"] == name)
                else ""
            )
            style = _STYLE.get(name, {})
            ax_t.plot(xs, [p[1] for p in pts], label=label, **style)
            ax_m.plot(xs, [p[2] for p in pts], label=label, **style)
        floor = sorted({(r["n_tokens"], r["floor_ms"]) for r in mine})
        ax_t.plot(
            [f[0] for f in floor], [f[1] for f in floor], "k--", linewidth=1, label="floor (bare GEMMs)"
        )
        ns = sorted({r["n_tokens"] for r in mine})
        for ax, unit in ((ax_t, "time (ms)"), (ax_m, "peak memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(ns, [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in ns])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
            ax.set_xlabel("N tokens")
            ax.set_ylabel(unit)
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{head}: {unit.split(' (')[0]}", fontsize=10)
        for r in oom:
            if r["head"] == head:
                color = _STYLE.get(r["provider"], {}).get("color", "k")
                for ax in (ax_t, ax_m):
                    trans = blended_transform_factory(ax.transData, ax.transAxes)
                    ax.text(
                        r["n_tokens"],
                        0.96,
                        f"{r['provider']} OOM",
                        color=color,
                        transform=trans,
                        ha="center",
                        va="top",
                        fontsize=7,
                        fontweight="bold",
                    )
        ax_t.legend(fontsize=7)
    meta = result["meta"]
    where = meta.get("gpu") or meta["cpu"]
    fig.suptitle(f"{MODE_TITLES[mode]}\n{where}, {meta['dtype']}, {meta['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(result: dict, stem: Path) -> list[Path]:
    """``<stem>-<mode>.png`` for each mode with results."""
    paths = [plot_mode(result, mode, Path(f"{stem}-{mode}.png")) for mode in result["config"]["modes"]]
    return [p for p in paths if p is not None]
