"""``wpo-score``: how on-policy is a preference data set for a model? WPO's weight of every pair, before
training (:func:`wpo_kernels.integration.score.score_preference_data`).

Reads TRL preference pairs (``prompt``, ``chosen``, ``rejected``; text or conversations) from a JSONL file
or every ``*.jsonl`` file of a directory, loads the model and tokenizer from a local directory (nothing is
downloaded) and writes to ``--out``:

- ``weights.jsonl``: one row per pair: ``id`` (the record's ``id``, else ``file:line``), the group, the
  pair / chosen / rejected weights, mean aligned log-probs and token counts; a pair the trainer would drop
  (its prompt fills ``--max-length``) has null weights and a ``dropped`` reason;
- ``summary.json``: mean, quantiles and the fraction below ``--thresholds`` of each weight, overall and per
  ``--split-by`` group;
- ``weights.png``: a histogram of the pair weights per group.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from trl import DPOConfig

from wpo_kernels.integration.score import PairScores, ScoreInputError, score_preference_data, summarize

#: Optional TRL fields passed on to the dataset preparation when the records carry them.
OPTIONAL_FIELDS = ("tools", "chat_template_kwargs")
OVERALL = "all"
AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options of ``wpo-score``."""
    p = argparse.ArgumentParser(
        prog="wpo-score",
        description="How on-policy is a preference data set for a model? Scores every pair with WPO's "
        "weights (forward only, as WPOTrainer would at step 0) and writes weights.jsonl, summary.json and "
        "weights.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model", type=Path, required=True, help="local directory of a saved causal LM + tokenizer"
    )
    p.add_argument("--data", type=Path, required=True, help="a JSONL file of pairs, or a directory of them")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--alignment", default="sampled", choices=("sampled", "greedy", "none"))
    p.add_argument("--split-by", default=None, metavar="FIELD", help="group the summary by this record field")
    p.add_argument("--batch-size", type=int, default=64, help="pairs per forward")
    p.add_argument(
        "--max-length", type=int, default=DPOConfig.max_length, help="TRL's max_length (0: no truncation)"
    )
    p.add_argument("--truncation-mode", default="keep_start", choices=("keep_start", "keep_end"))
    p.add_argument(
        "--weight-clamp", type=float, default=None, help="clamp each sequence's weight (as the trainer)"
    )
    p.add_argument(
        "--thresholds", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="report pairs below these"
    )
    p.add_argument("--device", default=None, help="'cpu' or 'cuda' (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "auto"))
    p.add_argument(
        "--mixed-precision",
        default="no",
        choices=("no", "bf16", "fp16"),
        help="autocast the forward like a trainer with bf16=True (TRL's default) / fp16=True",
    )
    p.add_argument("--kernel-backend", default="auto", choices=("auto", "triton", "torch"))
    p.add_argument("--no-plot", action="store_true", help="skip weights.png")
    return p.parse_args(argv)


# --- input ------------------------------------------------------------------------------------------------


def _data_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise ScoreInputError(f"--data {path}: the directory holds no .jsonl file")
        return files
    if not path.is_file():
        raise ScoreInputError(f"--data {path}: no such file or directory")
    return [path]


def _read_file(path: Path, split_by: str | None) -> list[tuple[dict, str, str]]:
    """``(pair, id, group)`` of each record of one JSONL file; named errors for anything unusable."""
    out = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ScoreInputError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ScoreInputError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
            for name in ("prompt", "chosen", "rejected", *([split_by] if split_by else [])):
                if record.get(name) is None:
                    need = "--split-by" if name == split_by else "a pair needs prompt, chosen, rejected"
                    raise ScoreInputError(f"{where}: missing field {name!r} ({need})")
            pair = {k: record[k] for k in ("prompt", "chosen", "rejected", *OPTIONAL_FIELDS) if k in record}
            group = str(record[split_by]) if split_by else OVERALL
            out.append((pair, str(record.get("id", f"{path.name}:{line_no}")), group))
    if not out:
        raise ScoreInputError(f"--data {path}: the file is empty (no JSON records)")
    return out


def load_pairs(path: Path, split_by: str | None) -> tuple[list[dict], list[str], list[str]]:
    """Pairs, ids and groups of every record under ``--data``."""
    rows = [row for file in _data_files(path) for row in _read_file(file, split_by)]
    optional = {k for k in OPTIONAL_FIELDS if k in rows[0][0]}
    for pair, pair_id, _ in rows:
        if {k for k in OPTIONAL_FIELDS if k in pair} != optional:
            raise ScoreInputError(
                f"record {pair_id}: fields {sorted(OPTIONAL_FIELDS)} must be in all records or none"
            )
    pairs, ids, groups = (list(col) for col in zip(*rows, strict=True))
    return pairs, ids, groups


def check_model_dir(path: Path) -> None:
    """``ScoreInputError`` unless ``path`` is a local directory holding a saved model."""
    if not path.is_dir():
        raise ScoreInputError(
            f"--model {path}: no such directory (a local directory saved with save_pretrained)"
        )
    if not (path / "config.json").is_file():
        raise ScoreInputError(f"--model {path}: no config.json (not a directory saved with save_pretrained)")


def load_model(path: Path, device: str, dtype: str) -> tuple[Any, Any]:
    """Model and tokenizer from a local directory (``local_files_only``: nothing is downloaded)."""
    check_model_dir(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), tokenizer


# --- output -----------------------------------------------------------------------------------------------


def _write_weights(
    path: Path, scores: PairScores, ids: list[str], groups: list[str], max_length: int | None
) -> None:
    reason = f"prompt fills max_length={max_length}: no completion token left (the trainer drops it)"
    scored = {row.pop("index"): row for row in scores.rows()}
    with path.open("w", encoding="utf-8") as f:
        for i, (pair_id, group) in enumerate(zip(ids, groups, strict=True)):
            row = scored.get(i, {"pair_weight": None, "dropped": reason})
            f.write(json.dumps({"id": pair_id, "group": group, **row}) + "\n")


def build_summary(scores: PairScores, groups: list[str], thresholds: Sequence[float]) -> dict[str, Any]:
    """``summary.json``'s statistics: each weight summarised overall and per group."""
    kept = [groups[i] for i in scores.index.tolist()]
    names = sorted(set(groups))

    def stats(select: list[bool]) -> dict[str, Any]:
        mask = torch.tensor(select, dtype=torch.bool)
        return {
            k: summarize(getattr(scores, k)[mask], thresholds)
            for k in ("pair_weight", "chosen_weight", "rejected_weight")
        }

    per_group = {g: stats([k == g for k in kept]) for g in names}
    for g in names:
        per_group[g]["dropped"] = sum(groups[i] == g for i in scores.dropped)
    return {"overall": {**stats([True] * len(kept)), "dropped": len(scores.dropped)}, "groups": per_group}


def format_table(summary: dict[str, Any], thresholds: Sequence[float]) -> str:
    """The printed table: pairs, mean and quantiles of the pair weight, fraction below each threshold."""
    head = ["group", "pairs", "mean", "p10", "median", "p90", *(f"<{t:g}" for t in thresholds)]
    rows = [head]
    items = [(OVERALL, summary["overall"])]
    if summary["split_by"] is not None:
        items = [*summary["groups"].items(), ("(all)", summary["overall"])]
    for name, s in items:
        w = s["pair_weight"]
        if w["n"] == 0:
            rows.append([name, "0", *["-"] * (len(head) - 2)])
            continue
        q = w["quantiles"]
        fractions = [f"{w['fraction_below'][f'{t:g}']:.1%}" for t in thresholds]
        rows.append([name, str(w["n"]), f"{w['mean']:.3f}", f"{q['0.1']:.3f}", f"{q['0.5']:.3f}",
                     f"{q['0.9']:.3f}", *fractions])  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def plot_histograms(path: Path, scores: PairScores, groups: list[str], title: str) -> Path:
    """``weights.png``: one histogram of the pair weights per group (shared axis, mean marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = scores.pair_weight.numpy()
    kept = np.array([groups[i] for i in scores.index.tolist()])
    names = sorted(set(kept.tolist()))
    top = max(1.0, float(np.quantile(weights, 0.995))) if weights.size else 1.0
    bins = np.linspace(0.0, top, 41)
    fig, axes = plt.subplots(len(names), 1, figsize=(6.4, 0.6 + 1.5 * len(names)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        w = weights[kept == name]
        ax.hist(np.clip(w, 0.0, top), bins=bins, color="C0", alpha=0.8)
        ax.axvline(float(w.mean()), color="C3", linestyle="--", linewidth=1)
        ax.set_ylabel("pairs")
        ax.set_title(f"{name}: n = {w.size}, mean {w.mean():.2f} (dashed)", loc="left", fontsize=9)
    axes[-1, 0].set_xlabel(f"WPO pair weight w(x, y_w)·w(x, y_l)  (values above {top:.2f} in the last bin)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- main -------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Score ``--data`` under ``--model`` and write the three outputs; returns the summary."""
    check_model_dir(args.model)
    pairs, ids, groups = load_pairs(args.data, args.split_by)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ScoreInputError(f"--device {device}: no CUDA device is available")
    model, tokenizer = load_model(args.model, device, args.dtype)
    from datasets.utils.logging import disable_progress_bar
    from tqdm.auto import tqdm

    disable_progress_bar()  # the data set preparation's bars; ours counts pairs
    max_length = args.max_length or None
    started = time.perf_counter()
    with tqdm(total=len(pairs), unit="pair", desc="wpo-score", dynamic_ncols=True) as bar:
        scores = score_preference_data(
            model, tokenizer, pairs, alignment=args.alignment, batch_size=args.batch_size,
            max_length=max_length, truncation_mode=args.truncation_mode, weight_clamp=args.weight_clamp,
            backend=args.kernel_backend, autocast_dtype=AUTOCAST[args.mixed_precision], progress=bar.update,
        )  # fmt: skip
    elapsed = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    _write_weights(args.out / "weights.jsonl", scores, ids, groups, max_length)
    summary = {
        "model": str(args.model),
        "data": str(args.data),
        "alignment": args.alignment,
        "split_by": args.split_by,
        "pairs": len(pairs),
        "scored": len(scores),
        "thresholds": list(args.thresholds),
        "max_length": max_length,
        "truncation_mode": args.truncation_mode,
        "weight_clamp": args.weight_clamp,
        "device": device,
        "dtype": args.dtype,
        "mixed_precision": args.mixed_precision,
        "elapsed_s": elapsed,
        "pairs_per_s": len(pairs) / elapsed if elapsed > 0 else None,
        **build_summary(scores, groups, args.thresholds),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if not args.no_plot and len(scores):
        title = f"{args.model.name} on {args.data.name} ({args.alignment} alignment)"
        plot_histograms(args.out / "weights.png", scores, groups, title)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``wpo-score``: 0 on success, 2 on input it refuses (the message names it)."""
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        summary = run(args)
    except ScoreInputError as e:
        print(f"wpo-score: error: {e}", file=sys.stderr)
        return 2
    print(format_table(summary, args.thresholds))
    dropped = summary["overall"]["dropped"]
    note = f" ({dropped} dropped: prompt fills --max-length)" if dropped else ""
    print(f"\n{summary['scored']} pairs scored{note} in {summary['elapsed_s']:.1f} s "
          f"({summary['pairs_per_s']:.0f} pairs/s); outputs in {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
