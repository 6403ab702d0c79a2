"""``wpo-score`` on the study's three data sources: the picture and summary of ``integration/README.md``.

Builds the study's first two SFT starts (``wpo-study``'s settings, seeds and band), writes model A
(``save_pretrained``) and one JSONL of pairs with a ``source`` field (A's own samples, B's samples, the
shipped scripted pairs), then runs the ``wpo-score`` command on them. Copies ``weights.png``,
``summary.json`` and the printed table (``summary.md``) to ``--output-dir``; the rest stays in
``--work-dir``.

    python -m wpo_kernels.integration.examples.score_study_data --output-dir integration/results/wpo_score \
        [any wpo-study option, e.g. --sft-seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path


def write_sources(work: Path, study_argv: Sequence[str]) -> tuple[Path, Path]:
    """Model A's directory and the pairs file of the three sources, as the study builds them."""
    import torch

    from wpo_kernels.integration.examples.study import parse_args
    from wpo_kernels.integration.examples.study_runs import StudyData, sampled_pairs, sft_to_band

    options = parse_args(study_argv)
    if options.threads:
        torch.set_num_threads(options.threads)
    data = StudyData(options)
    tok = data.tokenizer
    (a, seed_a), (b, seed_b) = ("A", options.sft_seeds[0]), ("B", options.sft_seeds[1])
    models = {
        name: sft_to_band(data, seed, options, f"SFT {name}")[0]
        for name, seed in ((a, seed_a), (b, seed_b))
    }
    text = lambda ids: " " + tok.decode(ids)  # noqa: E731 - completions after the prompt, as TRL joins them
    rows = []
    for name, seed, source in ((a, seed_a, "A's own samples"), (b, seed_b, "B's samples")):
        # the study's sampling seed
        pairs, _ = sampled_pairs(models[name], data, options.samples, 10_000 + seed, f"sampling {name}")
        rows += [
            {"source": source, "prompt": tok.decode(p["prompt_ids"]), "chosen": text(p["chosen_ids"]),
             "rejected": text(p["rejected_ids"])}
            for p in pairs
        ]  # fmt: skip
    rows += [
        {"source": "scripted", **{k: r[k] for k in ("prompt", "chosen", "rejected")}}
        for r in data.train_records
    ]
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = work / "model_A"
    models[a].save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir, data


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", type=Path, default=Path("integration/results/wpo_score"))
    p.add_argument("--work-dir", type=Path, default=None, help="model, data, weights.jsonl (default: temp)")
    args, study_argv = p.parse_known_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="wpo_score_"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, data = write_sources(work, study_argv)

    from wpo_kernels.integration import score_cli

    out = work / "scores"
    cli = ["--model", str(model_dir), "--data", str(data), "--out", str(out), "--split-by", "source"]
    if score_cli.main(cli) != 0:
        return 1
    args.output_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "weights.png", args.output_dir / "weights.png")
    summary = json.loads((out / "summary.json").read_text())
    summary.update(model="model_A", data="pairs.jsonl")  # paths inside the work directory
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    command = "python -m wpo_kernels.integration.examples.score_study_data " + " ".join(argv or [])
    table = score_cli.format_table(summary, summary["thresholds"])
    (args.output_dir / "summary.md").write_text(
        f"`{command.strip()}` ran `wpo-score --model model_A --data pairs.jsonl --out scores --split-by "
        f"source` (model A, {summary['scored']} pairs, {summary['alignment']} alignment, "
        f"{summary['device']}):\n\n"
        f"```\n{table}\n```\n"
    )
    print(f"Copied weights.png, summary.json, summary.md to {args.output_dir}; model, data in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
