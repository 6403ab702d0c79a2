"""``wpo-study``: which of the WPO paper's claims hold on the shipped arithmetic task, counted across seeds.

Design (issue 23):

1. **Seed pairs.** ``--sft-seeds`` are paired in order, (s0, s1), (s2, s3), …; each pair is one replicate of
   the whole design, with models A and B.
2. **A controlled SFT start.** Each model trains on the correct answers of the training prompts until its
   greedy accuracy on a *validation* split (never an evaluation prompt) lies in ``--sft-band``, checked every
   ``--sft-check-every`` steps, at most ``--sft-max-steps``; a start outside the band stops the study. A
   *continued SFT, same steps* row per model is the control.
3. **Model-generated pairs, crossed.** Each SFT model samples ``--samples`` answers per training prompt at
   temperature 1 (chosen: a correct sample, rejected: a wrong one). Each model trains on its own samples
   (on-policy) and on the other model's (off-policy), with DPO and WPO (sampled alignment), at every
   learning rate of ``--lrs``; on its off-policy samples at the first learning rate also WPO with greedy
   and no alignment, WPO-W and WPO-L.
4. **Evaluation.** Greedy answer accuracy on the evaluation prompts with a 95% Wilson interval, McNemar's
   exact test per comparison, KL(policy ‖ SFT start) per answer; a validation curve per run; in the first
   pair, DPO and WPO on one off-policy cell at twice the steps (is ``--steps`` enough?).
5. **Claims** fixed in advance (:mod:`~wpo_kernels.integration.examples.study_claims`), each counted as
   "held in k of n seed pairs (significant in j)" with pooled tests.

Writes ``report.md``, ``report.json`` and ``claims.png`` to ``--output-dir``. Every training log-probability
goes through the fused head (:func:`wpo_kernels.fused_linear_wpo_loss`).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

METHODS = {  # method name -> (WPO variant, alignment)
    "DPO": ("none", "sampled"),
    "WPO": ("wpo", "sampled"),
    "WPO (greedy)": ("wpo", "greedy"),
    "WPO (none)": ("wpo", "none"),
    "WPO-W": ("wpo_w", "sampled"),
    "WPO-L": ("wpo_l", "sampled"),
}
#: Methods run on each model's off-policy samples at the first learning rate only.
ABLATION = ("WPO (greedy)", "WPO (none)", "WPO-W", "WPO-L")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options of ``wpo-study``."""
    p = argparse.ArgumentParser(
        prog="wpo-study",
        description="Which of the WPO paper's claims hold on model-generated arithmetic preference pairs, "
        "counted over seed pairs: controlled SFT starts, crossed on-/off-policy design, alignment and "
        "variant ablations, held-out greedy accuracy with McNemar tests (report.md, report.json, "
        "claims.png).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output-dir", type=Path, default=Path("outputs/wpo_study"), help="where reports go")
    p.add_argument(
        "--sft-seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2, 3, 4, 5, 6, 7],
        help="SFT seeds, paired in order: (s0, s1), (s2, s3), ... (an even number, >= 2)",
    )
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument(
        "--sft-band",
        type=float,
        nargs=2,
        default=[0.55, 0.70],
        metavar=("LOW", "HIGH"),
        help="validation accuracy band every SFT start must end in",
    )
    p.add_argument("--sft-max-steps", type=int, default=600, help="step cap of each SFT start")
    p.add_argument("--sft-check-every", type=int, default=10, help="SFT steps between validation checks")
    p.add_argument("--sft-lr", type=float, default=3e-3, help="SFT (and continued-SFT) learning rate")
    p.add_argument("--train-prompts", type=int, default=None, help="use the first N training prompts (2000)")
    p.add_argument("--val-prompts", type=int, default=1000, help="validation split of the held-out prompts")
    p.add_argument("--eval-prompts", type=int, default=None, help="evaluation prompts (default: the rest)")
    p.add_argument("--kl-prompts", type=int, default=1000, help="evaluation prompts of the KL estimate")
    p.add_argument("--samples", type=int, default=4, help="answers sampled per training prompt (T = 1)")
    p.add_argument("--steps", type=int, default=100, help="preference-training (and continued-SFT) steps")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per step")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=[1e-5],
        help="learning rates of DPO and WPO; the first is the claims' and the ablation's",
    )
    p.add_argument("--curve-every", type=int, default=None, help="validation checks per run (steps / 4)")
    p.add_argument("--device", default="cpu", help="'cpu' (default) or 'cuda'")
    p.add_argument("--kernel-backend", default="auto", choices=("auto", "triton", "torch"))
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; the models are tiny, so one thread per process (0: torch's choice)",
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    args = p.parse_args(argv)  # fmt: skip
    if len(args.sft_seeds) < 2 or len(args.sft_seeds) % 2 or len(set(args.sft_seeds)) < len(args.sft_seeds):
        p.error(f"--sft-seeds needs an even number (>= 2) of different seeds, got {args.sft_seeds}")
    if not 0.0 <= args.sft_band[0] < args.sft_band[1] <= 1.0:
        p.error(f"--sft-band needs 0 <= LOW < HIGH <= 1, got {args.sft_band}")
    if args.curve_every is None:
        args.curve_every = max(1, args.steps // 4)
    return args


class Recorder:
    """Rows of the study (one per evaluated model), their per-prompt correctness, and the progress bar."""

    def __init__(self, data: Any, total: int) -> None:
        self.data, self.rows, self.correct = data, [], []
        fmt = "{desc} run {n_fmt} of {total_fmt} |{bar}| {elapsed} elapsed, about {remaining} left"
        self.bar = tqdm(
            total=total, desc="wpo-study:", bar_format=fmt, position=0, smoothing=0, dynamic_ncols=True
        )

    def add(self, row: dict[str, Any], model: nn.Module, start: nn.Module | None, started: float) -> None:
        """Evaluate ``model`` (against its SFT ``start``), record ``row`` and advance the bar."""
        from wpo_kernels.integration.examples.significance import wilson_interval
        from wpo_kernels.integration.examples.study_runs import evaluate

        row["train_s"] = time.process_time() - started
        t = time.process_time()
        hits, kl = evaluate(model, start, self.data)
        k, n = int(hits.sum()), hits.numel()
        row.update(accuracy=k / n, correct=k, n_eval=n, ci95=list(wilson_interval(k, n)), kl_to_sft=kl)
        row["eval_s"] = time.process_time() - t
        self.rows.append(row)
        self.correct.append(hits)
        self.bar.update(1)
        tqdm.write(
            f"  pair {row['pair']} {row['model']} {row['method']:<14} {row['data']:<13} lr={row['lr']:<8g} "
            f"acc {row['accuracy']:.1%}  KL {kl:.3f}  (CPU s: train {row['train_s']:.1f}, "
            f"eval {row['eval_s']:.1f})"
        )


def planned_runs(args: argparse.Namespace) -> int:
    """Rows the study will record: per model an SFT start, continued SFT, DPO and WPO on two data sources
    at every learning rate, and the ablation; two steps-check runs."""
    per_model = 2 + 2 * 2 * len(args.lrs) + len(ABLATION)
    return len(args.sft_seeds) * per_model + 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``wpo-study`` (returns the exit status)."""
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device is available")
    args.output_dir.mkdir(parents=True, exist_ok=True)

    from transformers import logging as hf_logging

    from wpo_kernels.integration.examples.study_runs import StudyData

    hf_logging.set_verbosity_error()
    started_wall, started_cpu, load = time.perf_counter(), time.process_time(), _load_average()
    pairs = [tuple(args.sft_seeds[i : i + 2]) for i in range(0, len(args.sft_seeds), 2)]
    print(
        f"wpo-study: {len(pairs)} seed pairs {pairs}, {planned_runs(args)} runs; results go to "
        f"{args.output_dir.resolve()} (report.md, report.json"
        + ("" if args.no_plot else ", claims.png")
        + ")"
    )
    data = StudyData(args)
    print(
        f"  {len(data.train_records)} training prompts, {data.validation.size} validation prompts (SFT band "
        f"{args.sft_band[0]:.0%}-{args.sft_band[1]:.0%}), {data.evaluation.size} evaluation prompts"
    )
    recorder = Recorder(data, planned_runs(args))
    replicates = [SeedPair(index, seeds, data, args, recorder) for index, seeds in enumerate(pairs, start=1)]
    for pair in replicates:
        pair.run(steps_check=pair.index == 1)
    recorder.bar.close()
    runtime = {"wall_s": time.perf_counter() - started_wall, "cpu_s": time.process_time() - started_cpu,
               "load_average_start": load}  # fmt: skip
    return finish(args, argv, recorder, replicates, runtime)


class SeedPair:
    """One replicate of the design: seed pair ``index`` with models A and B (see the module docstring).

    :meth:`run` fills ``weights`` (the weight table rows), ``starts`` (how each SFT start was made) and
    ``sampling`` (how its samples came out), and records every evaluated model with ``recorder``.
    """

    def __init__(self, index: int, seeds: Sequence[int], data: Any, args: argparse.Namespace, rec: Recorder):
        self.index, self.seeds, self.data, self.args, self.rec = (
            index,
            dict(zip("AB", seeds, strict=True)),
            data,
            args,
            rec,
        )
        self.models: dict[str, nn.Module] = {}
        self.start_accuracy: dict[str, float] = {}
        self.sources: dict[tuple[str, str], Any] = {}
        self.weights: list[dict] = []
        self.starts: list[dict] = []
        self.sampling: list[dict] = []

    def run(self, steps_check: bool) -> None:
        """SFT starts and controls, samples, weights, then every preference run (and the steps check)."""
        examples = {name: self.sft_start(name) for name in self.seeds}
        for name in self.seeds:
            for kind in ("own", "other", "scripted"):
                pairs = self.data.scripted if kind == "scripted" else examples[self.owner(name, kind)]
                self.add_source(name, kind, pairs)
        lr = self.args.lrs[0]
        for name in self.seeds:
            for kind in ("own", "other"):
                for rate in self.args.lrs:
                    for method in ("DPO", "WPO"):
                        self.preference(name, kind, method, rate, self.args.steps)
            for method in ABLATION:
                self.preference(name, "other", method, lr, self.args.steps)
        if steps_check:
            for method in ("DPO", "WPO"):
                self.preference("A", "other", method, lr, 2 * self.args.steps, role="steps check")

    @staticmethod
    def owner(name: str, kind: str) -> str:
        """Whose samples model ``name`` trains on for ``kind`` ``"own"`` or ``"other"``."""
        return name if kind == "own" else ("B" if name == "A" else "A")

    def sft_start(self, name: str) -> list[dict]:
        """Train model ``name`` into the band, record it and its continued-SFT control; return its pairs."""
        from wpo_kernels.integration.examples.study_runs import continued_sft, sampled_pairs, sft_to_band

        seed, args = self.seeds[name], self.args
        tag = f"pair {self.index} · {name} (seed {seed})"
        t = time.process_time()
        model, record = sft_to_band(self.data, seed, args, desc=f"{tag} · SFT to the band")
        if not record.in_band:
            raise SystemExit(
                f"SFT start of seed {seed} ended outside --sft-band {args.sft_band} after {record.steps} "
                f"steps (validation accuracy {record.val_accuracy:.1%}): raise --sft-max-steps or pick "
                "another seed"
            )
        self.models[name], self.start_accuracy[name] = model, record.val_accuracy
        base = {"pair": self.index, "model": name, "sft_seed": seed, "data": "-", "on_policy": None,
                "lr": args.sft_lr, "role": "design"}  # fmt: skip
        self.rec.add({**base, "method": "SFT", "steps": record.steps}, model, None, t)
        t = time.process_time()
        cont = continued_sft(self.data, model, seed, args, desc=f"{tag} · continued SFT")
        self.rec.add({**base, "method": "continued SFT", "steps": args.steps}, cont, model, t)
        pairs, stats = sampled_pairs(model, self.data, args.samples, 10_000 + seed, f"{tag} · sampling")
        size = sum(p.numel() for p in model.parameters())
        self.starts.append({**vars(record), "pair": self.index, "model": name, "parameters": size})
        self.sampling.append({"pair": self.index, "model": name, "sft_seed": seed, **stats})
        if not pairs:
            raise SystemExit(
                f"SFT model of seed {seed} produced no usable pair (a correct and a wrong sample)"
            )
        return pairs

    def add_source(self, name: str, kind: str, pairs: list[dict]) -> None:
        """Score a data source under model ``name``: the DPO reference and its row of the weight table."""
        from wpo_kernels.integration.examples.study_runs import preference_data

        source = preference_data(self.models[name], pairs, self.data, self.args)
        self.sources[name, kind] = source
        stats = source.stats
        self.weights.append(
            {
                "pair": self.index,
                "model": name,
                "kind": kind,
                "data": "scripted" if kind == "scripted" else f"samples of {self.owner(name, kind)}",
                "on_policy": kind == "own",
                "pairs": stats.pair_weight.numel(),
                "chosen_weight": stats.chosen_weight.mean().item(),
                "rejected_weight": stats.rejected_weight.mean().item(),
                "pair_weight": stats.pair_weight.mean().item(),
                "pair_weight_sd": stats.pair_weight.std().item(),
            }
        )

    def preference(
        self, name: str, kind: str, method: str, lr: float, steps: int, role: str = "design"
    ) -> None:
        """Train and record one preference run of model ``name`` on its ``kind`` samples."""
        from wpo_kernels.integration.examples.preference_loop import PreferenceConfig
        from wpo_kernels.integration.examples.study_runs import preference_run, run_summary

        variant, alignment = METHODS[method]
        seed, owner, source = self.seeds[name], self.owner(name, kind), self.sources[name, kind]
        config = PreferenceConfig(
            steps, self.args.batch_size, lr, self.args.beta, variant, alignment, seed=seed
        )
        policy_kind = "on" if kind == "own" else "off"
        desc = f"pair {self.index} · {name} · {method} on {owner}'s samples ({policy_kind}-policy), lr {lr:g}"
        t = time.process_time()
        policy, history, curve = preference_run(
            self.models[name], source, config, self.data, self.args, desc, self.start_accuracy[name]
        )
        row = {
            "pair": self.index, "model": name, "sft_seed": seed, "method": method, "variant": variant,
            "alignment": alignment if variant != "none" else None, "data": f"samples of {owner}",
            "on_policy": kind == "own", "lr": lr, "beta": self.args.beta, "steps": steps, "role": role,
            "pairs": source.pairs.size, "data_pair_weight": source.stats.pair_weight.mean().item(),
            **run_summary(history), "curve": curve,
        }  # fmt: skip
        self.rec.add(row, policy, self.models[name], t)


def row_tests(rows: list[dict[str, Any]], correct: list[Tensor]) -> None:
    """McNemar's exact test of every run against its SFT start and continued SFT, and of every WPO-family
    run against DPO of the same model, data and learning rate (``p_vs_sft``, ``p_vs_continued_sft``,
    ``p_vs_dpo``)."""
    from wpo_kernels.integration.examples.significance import mcnemar_exact

    index = {
        (r["pair"], r["model"], r["method"], r["data"], r["lr"], r["steps"]): i for i, r in enumerate(rows)
    }
    base = {(r["pair"], r["model"], r["method"]): i for i, r in enumerate(rows) if r["data"] == "-"}
    for i, r in enumerate(rows):
        if r["method"] != "SFT":
            r["p_vs_sft"] = mcnemar_exact(correct[i], correct[base[r["pair"], r["model"], "SFT"]])[0]
        if r["data"] != "-":
            cont = base[r["pair"], r["model"], "continued SFT"]
            r["p_vs_continued_sft"] = mcnemar_exact(correct[i], correct[cont])[0]
        dpo = index.get((r["pair"], r["model"], "DPO", r["data"], r["lr"], r["steps"]))
        if r["method"] not in ("SFT", "continued SFT", "DPO") and dpo is not None:
            r["p_vs_dpo"], r["only_this_correct"], r["only_dpo_correct"] = mcnemar_exact(
                correct[i], correct[dpo]
            )


def finish(
    args: argparse.Namespace, argv: Sequence[str] | None, rec: Recorder, replicates: list[SeedPair],
    runtime: dict[str, float],
) -> int:  # fmt: skip
    """Count the claims, write the report, print the headline table and the paths."""
    from wpo_kernels.integration.examples.study_claims import count_claims, pack_bits
    from wpo_kernels.integration.examples.study_report import headline, plot_study, write_study_report

    row_tests(rec.rows, rec.correct)
    weights = [w for pair in replicates for w in pair.weights]
    claims = count_claims(rec.rows, rec.correct, weights, args.lrs[0])
    for row, hits in zip(rec.rows, rec.correct, strict=True):
        row["correct_bits"] = pack_bits(hits)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "no_plot"}
    env = {
        **runtime,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": _load_average(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "wpo-study " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    report = {
        "environment": env,
        "settings": settings,
        "sft_starts": [s for pair in replicates for s in pair.starts],
        "sampling": [s for pair in replicates for s in pair.sampling],
        "claims": claims,
        "runs": rec.rows,
        "weights": weights,
    }
    plot = None if args.no_plot else plot_study(report, args.output_dir / "claims.png")
    md, js = write_study_report(args.output_dir, report, plot)
    print("\n" + headline(claims))
    print(
        f"\n{len(rec.rows)} runs in {runtime['wall_s']:.0f} s ({runtime['cpu_s']:.0f} s CPU), load "
        f"average at the start {runtime['load_average_start']}, at the end {env['load_average']}."
    )
    print(f"Report: {md}\n        {js}" + (f"\n        {plot}" if plot else ""))
    return 0


def _load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


if __name__ == "__main__":
    raise SystemExit(main())
