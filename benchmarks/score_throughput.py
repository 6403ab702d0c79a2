"""Throughput of ``wpo-score``'s scorer on the CPU with the study's model: pairs per minute.

The model is the study's (``wpo-study``'s default architecture, SFT-trained as the study trains it, so its
distributions are as peaked as the ones the study scores); the data are the shipped 2000 training pairs.
Each timing is one full :func:`~wpo_kernels.integration.score.score_preference_data` call (TRL's dataset
preparation, batching, the fused forward-only head, the weights), the median of ``--repeats``.

    python -m benchmarks.score_throughput [--threads 1] [--batch-sizes 64 256] [--output results.json]

Target (issue 24): at least 1,000 pairs a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

TARGET_PAIRS_PER_MIN = 1000


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256], help="pairs per forward")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--sft-steps", type=int, default=None, help="SFT steps (default: the study's SFT start, in its band)"
    )
    p.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    from datasets.utils.logging import disable_progress_bar

    from wpo_kernels.integration.examples import study
    from wpo_kernels.integration.examples.study_runs import StudyData, sft_fixed_steps, sft_to_band
    from wpo_kernels.integration.score import score_preference_data

    disable_progress_bar()
    options = study.parse_args(["--eval-prompts", "16", "--kl-prompts", "8", "--device", "cpu"])
    setup = StudyData(options)
    started = time.perf_counter()
    if args.sft_steps is None:
        model, start = sft_to_band(setup, options.sft_seeds[0], options, "SFT start")
        steps = start.steps
    else:
        model, steps = sft_fixed_steps(setup, options.sft_seeds[0], options, args.sft_steps), args.sft_steps
    sft_s = time.perf_counter() - started
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in setup.train_records]
    score_preference_data(model, setup.tokenizer, pairs[:64], batch_size=64)  # warm-up
    rows = []
    for batch_size in args.batch_sizes:
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            score_preference_data(model, setup.tokenizer, pairs, batch_size=batch_size)
            times.append(time.perf_counter() - t)
        median = statistics.median(times)
        rows.append({"batch_size": batch_size, "seconds": times, "pairs_per_min": len(pairs) / median * 60})
        print(f"batch {batch_size:>4}: {len(pairs)} pairs in {median:.2f} s (median of {args.repeats}) = "
              f"{rows[-1]['pairs_per_min']:,.0f} pairs/min (target {TARGET_PAIRS_PER_MIN:,})")  # fmt: skip
    result = {
        "model": {
            "hidden_size": options.hidden_size,
            "layers": options.layers,
            "heads": options.heads,
            "vocab": len(setup.tokenizer),
            "sft_steps": steps,
            "sft_s": sft_s,
        },  # fmt: skip
        "pairs": len(pairs),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rows": rows,
    }
    print(f"load average {result['load_average']}, {result['cpu_count']} CPUs, {result['threads']} threads")
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if min(r["pairs_per_min"] for r in rows) >= TARGET_PAIRS_PER_MIN else 1


if __name__ == "__main__":
    raise SystemExit(main())
