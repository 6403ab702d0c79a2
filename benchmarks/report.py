"""Markdown tables from a result JSON: one table per mode, a summary at the largest N, the skips."""

from __future__ import annotations

from collections import defaultdict

MODE_TITLES = {
    "forward": "Forward: per-token log-probs + log Σp² (no graph)",
    "forward_backward": "Forward + backward: log-probs, then d/dhidden and d/dweight",
    "step": "Full loss step: WPO (or DPO where marked) loss + backward, on [chosen; rejected] pairs",
}


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _fmt_mib(mib: float) -> str:
    return f"{mib:.3g}" if mib < 1000 else f"{mib:.0f}"


def _cell(row: dict | None, tflops: bool) -> str:
    if row is None:
        return "–"
    if row["status"] != "ok":
        return row["status"].upper()
    rate = f", {row['tflops']:.0f} TF/s" if tflops else ""
    return f"{_fmt_ms(row['time_ms'])} ms ({row['x_floor']:.1f}×{rate}) · {_fmt_mib(row['peak_mib'])} MiB"


def header(result: dict) -> str:
    m = result["meta"]
    v = m["versions"]
    threads = m["torch_threads"]
    host = f"{m['cpu']} ({m['cpu_count']} cores, {threads} torch thread{'s' if threads != 1 else ''})"
    if m.get("gpu"):
        where = f"{m['gpu']} ({m['gpu_memory_gib']} GiB, CUDA {m['cuda']}); host CPU {host}"
    else:
        where = f"CPU {host}"
    interleaved = ", the implementations called in turn, round after round" if m.get("interleaved") else ""
    load = ""
    if m.get("load_before") and m.get("load_after"):
        load = (
            f"; load average (1, 5, 15 min) {', '.join(f'{x:.1f}' for x in m['load_before'])} before, "
            f"{', '.join(f'{x:.1f}' for x in m['load_after'])} after"
        )
    versions = " · ".join(f"{k} {val or '—'}" for k, val in v.items())
    return (
        f"# WPO kernels benchmark: {m['tag']}, {m['date']}\n\n"
        f"- device: {where}\n"
        f"- versions: {versions} · Python {m['python']}\n"
        f"- dtype {m['dtype']}; time: median wall time of ≥ {m.get('min_repeats', 3)} calls after a "
        f"warm-up{interleaved}; memory: "
        f"{m['memory_method']} (inputs excluded, outputs and gradients included)\n"
        f"- each cell: **time (× floor{', TFLOP/s' if m.get('gpu') else ''}) · peak memory**; the floor is "
        f"the fastest bare `h @ W.T` of the same shape (×3 with a backward: the forward GEMM and the two "
        f"gradient GEMMs){'; TFLOP/s count 2·N·V·H (×3 with a backward)' if m.get('gpu') else ''}; "
        f"`OOM`: out of memory; "
        f"`–`: not run (see *Skipped*)\n"
        f"- every implementation in the tables passed a check of values and gradients against the fp64 "
        f"oracle before being timed; run took {m.get('wall_s', '?')} s{load}\n"
    )


def _providers(rows: list[dict]) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for r in rows:
        seen.setdefault(r["provider"], r["label"] + (" [DPO]" if r.get("loss") == "dpo" else ""))
    return list(seen.items())


def mode_table(result: dict, mode: str) -> str:
    rows = [r for r in result["rows"] if r["mode"] == mode]
    if not rows:
        return ""
    providers = _providers(rows)
    by_key: dict[tuple[str, int], dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by_key[(r["head"], r["n_tokens"])][r["provider"]] = r
    heads = {h["name"]: h for h in result["config"]["heads"]}
    gpu = bool(result["meta"].get("gpu"))
    lines = [
        f"## {MODE_TITLES[mode]}\n",
        "| head (H, V) | N | floor ms | " + " | ".join(label for _, label in providers) + " |",
        "|---|---:|---:|" + "---:|" * len(providers),
    ]
    for (head, n), cells in by_key.items():
        h = heads.get(head, {})
        cap = ", cap" if h.get("softcap") else ""
        floor = next(iter(cells.values()))["floor_ms"]
        lines.append(
            f"| {head} ({h.get('hidden')}, {h.get('vocab')}{cap}) | {n} | {_fmt_ms(floor)} | "
            + " | ".join(_cell(cells.get(name), gpu) for name, _ in providers)
            + " |"
        )
    return "\n".join(lines) + "\n"


def summary_table(result: dict) -> str:
    """Ours against the materialised reference (and TRL) at each head's largest N."""
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    lines = [
        "## Summary at the largest N: ours vs the materialised reference (and TRL)\n",
        "| head | N | mode | ours ms | torch ms | speed-up | ours MiB | torch MiB | memory ÷ | "
        "TRL ms | TRL MiB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    index = {(r["head"], r["n_tokens"], r["mode"], r["provider"]): r for r in result["rows"]}
    any_line = False
    for mode in result["config"]["modes"]:
        for head in dict.fromkeys(r["head"] for r in ok):
            ns = [
                r["n_tokens"]
                for r in ok
                if r["head"] == head and r["mode"] == mode and r["provider"] == "ours"
            ]
            if not ns:
                continue
            n = max(ns)
            ours = index[(head, n, mode, "ours")]
            ref = index.get((head, n, mode, "torch"))
            trl = index.get((head, n, mode, "trl"))
            ref_ok = ref is not None and ref["status"] == "ok"
            missing = ref["status"].upper() if ref is not None and not ref_ok else "–"
            cells = [head, str(n), mode, _fmt_ms(ours["time_ms"])]
            if ref_ok:
                cells += [_fmt_ms(ref["time_ms"]), f"{ref['time_ms'] / ours['time_ms']:.2f}×"]
            else:
                cells += [missing, "–"]
            cells.append(_fmt_mib(ours["peak_mib"]))
            if ref_ok:
                cells += [_fmt_mib(ref["peak_mib"]), f"{ref['peak_mib'] / max(ours['peak_mib'], 1e-9):.1f}×"]
            else:
                cells += [missing, "–"]
            if trl is not None and trl["status"] == "ok":
                cells += [_fmt_ms(trl["time_ms"]), _fmt_mib(trl["peak_mib"])]
            else:
                cells += ["–", "–"]
            lines.append("| " + " | ".join(cells) + " |")
            any_line = True
    return "\n".join(lines) + "\n" if any_line else ""


def fastest_alternative_table(result: dict) -> str:
    """Ours against the fastest other implementation (and the lowest peak memory among them), at every
    head, N and mode: the ratios ``ours ÷ fastest`` and ``ours ÷ lowest``."""
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    by_key: dict[tuple[str, int, str], dict[str, dict]] = defaultdict(dict)
    for r in ok:
        by_key[(r["head"], r["n_tokens"], r["mode"])][r["provider"]] = r
    lines = [
        "## Ours against the fastest alternative, every shape\n",
        "Alternatives marked [DPO] compute the cheaper DPO step (no WPO weights); they are counted anyway.\n",
        "| head | N | mode | ours ms | fastest alternative | its ms | ours ÷ fastest | ours MiB | "
        "lowest alternative MiB | ours ÷ lowest |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    worst = 0.0
    for mode in result["config"]["modes"]:
        for (head, n, row_mode), cells in by_key.items():
            others = [r for name, r in cells.items() if name != "ours"]
            if row_mode != mode or "ours" not in cells or not others:
                continue
            ours = cells["ours"]
            fastest = min(others, key=lambda r: r["time_ms"])
            lowest = min(r["peak_mib"] for r in others)
            ratio = ours["time_ms"] / fastest["time_ms"]
            worst = max(worst, ratio)
            name = fastest["provider"] + (" [DPO]" if fastest.get("loss") == "dpo" else "")
            lines.append(
                f"| {head} | {n} | {mode} | {_fmt_ms(ours['time_ms'])} | {name} | "
                f"{_fmt_ms(fastest['time_ms'])} | {ratio:.2f} | {_fmt_mib(ours['peak_mib'])} | "
                f"{_fmt_mib(lowest)} | {ours['peak_mib'] / max(lowest, 1e-9):.2f} |"
            )
    if worst == 0.0:
        return ""
    lines.append(f"\nLargest ours ÷ fastest: {worst:.2f}.")
    return "\n".join(lines) + "\n"


def skipped_list(result: dict) -> str:
    if not result["skipped"]:
        return ""
    grouped: dict[tuple[str, str], list[str]] = defaultdict(list)
    for s in result["skipped"]:
        where = "everywhere" if s["head"] == "*" else f"{s['head']} / {s['mode']}"
        grouped[(s["label"], s["reason"])].append(where)
    lines = ["## Skipped\n"]
    for (label, reason), where in grouped.items():
        lines.append(f"- **{label}** ({', '.join(dict.fromkeys(where))}): {reason}")
    return "\n".join(lines) + "\n"


NOTES = """## Notes

- *ours*, *torch* and *TRL* compute the WPO step (sigmoid loss pair-weighted by `w_chosen · w_rejected`,
  `w = exp(mean_t[log p(y_t) − log Σ_v p_v²])`). *Liger* and *CCE* cannot give `log Σ_v p_v²`, so their step
  is the plain DPO loss [DPO]: a lower bound on what WPO would cost them. Liger takes no precomputed reference
  log-probs (it runs with `use_ref_model=False`) and has no logit softcap (Gemma-2 skipped).
- TRL, as its `DPOTrainer` does, scores only the completion tokens in the step (1/8 of each sequence is
  prompt); so does ours on a CPU (the torch fallback's one-pass step skips ignored tokens); the torch
  reference and ours on a GPU score every position and mask.
- The torch reference is `log_softmax` over materialised fp32 logits and `logsumexp(2 · log p)` (TRL's
  `use_weighting` formula before its chunked kernel).
"""


def markdown(result: dict) -> str:
    """The whole markdown report of ``result``."""
    parts = [header(result), summary_table(result), fastest_alternative_table(result)]
    parts += [mode_table(result, mode) for mode in result["config"]["modes"]]
    parts += [skipped_list(result), NOTES]
    return "\n".join(p for p in parts if p)
