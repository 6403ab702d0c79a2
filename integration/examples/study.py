"""``wpo-study``: what WPO does and does not do on the shipped arithmetic task, with the statistics to tell.

Design (issue 12):

1. Two or more SFT models that differ by seed (initialisation and data order), each warmed up on the
   correct answers of the 2000 training prompts; a *continued SFT, same steps* row per model.
2. Model-generated pairs: each SFT model samples ``--samples`` answers per training prompt at temperature 1;
   chosen = a correct sample, rejected = a wrong one (prompts without both are dropped). Crossed design:
   every model trains on its own samples (on-policy) and on the next model's samples (off-policy), with
   DPO and WPO (sampled alignment), each at every learning rate of ``--lrs``.
3. On one off-policy cell (the first model on the second's samples, at ``--ablation-lr``): the alignment
   ablation (sampled / greedy / none) and the variants (WPO / WPO-W / WPO-L); the shipped scripted pairs
   as a third data source (DPO and WPO on the first model, and in the weight table).
4. Greedy answer accuracy on every two-digit addition prompt not among the training prompts (8000), with
   a 95% Wilson interval; McNemar's exact test against the run's SFT start, against its continued-SFT
   row, and WPO against DPO of the same cell and learning rate; the distance each model moved:
   KL(policy ‖ SFT start) per answer on held-out prompts (exact next-token KL summed along answers sampled
   from the policy).
5. The mean WPO pair weight (sampled alignment) of every data source under every SFT model.

Writes ``report.md``, ``report.json`` and ``accuracy.png`` to ``--output-dir``. Every log-probability in
training and scoring goes through the fused head; decoding computes ``[B, V]`` last-position logits.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

#: Answer tokens sampled per prompt: three digits and EOS.
ANSWER_TOKENS = 4


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options of ``wpo-study``."""
    p = argparse.ArgumentParser(
        prog="wpo-study",
        description="WPO vs DPO on model-generated arithmetic preference pairs: crossed on-/off-policy "
        "design, learning-rate sweep, alignment and variant ablations, held-out greedy accuracy with "
        "intervals and McNemar tests (report.md, report.json, accuracy.png).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output-dir", type=Path, default=Path("outputs/wpo_study"), help="where reports go")
    p.add_argument("--sft-seeds", type=int, nargs="+", default=[0, 1], help="one SFT model per seed (>= 2)")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--sft-steps", type=int, default=300, help="SFT steps of each start model")
    p.add_argument("--sft-lr", type=float, default=3e-3, help="SFT (and continued-SFT) learning rate")
    p.add_argument("--train-prompts", type=int, default=None, help="use the first N training prompts (2000)")
    p.add_argument("--samples", type=int, default=4, help="answers sampled per training prompt (T = 1)")
    p.add_argument("--steps", type=int, default=150, help="preference-training steps of every run")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per step")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 3e-5, 1e-4], help="learning-rate sweep")
    p.add_argument("--ablation-lr", type=float, default=None, help="lr of the ablation rows (last of --lrs)")
    p.add_argument("--eval-prompts", type=int, default=None, help="a random subset of the 8000 held-out")
    p.add_argument("--kl-prompts", type=int, default=1000, help="held-out prompts of the KL estimate")
    p.add_argument("--device", default="cpu", help="'cpu' (default) or 'cuda'")
    p.add_argument("--kernel-backend", default="auto", choices=("auto", "triton", "torch"))
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; the models are tiny, so one thread per process (0: torch's choice)",
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    args = p.parse_args(argv)
    if len(set(args.sft_seeds)) < 2:
        p.error(f"--sft-seeds needs at least two different seeds (the crossed design), got {args.sft_seeds}")
    if len(args.lrs) < 1:
        p.error("--lrs needs at least one learning rate")
    if args.ablation_lr is None:
        args.ablation_lr = args.lrs[-1]
    return args


def addition_records(exclude: set[str]) -> list[dict[str, str]]:
    """Every two-digit addition prompt (``"4 7 + 0 8 ="``, 10 000 of them) not in ``exclude``, with its
    correct answer as ``chosen`` (``" 0 5 5"``)."""
    spaced = lambda n, width: " ".join(f"{n:0{width}d}")  # noqa: E731
    records = []
    for a in range(100):
        for b in range(100):
            prompt = f"{spaced(a, 2)} + {spaced(b, 2)} ="
            if prompt not in exclude:
                records.append({"prompt": prompt, "chosen": " " + spaced(a + b, 3)})
    return records


class Study:
    """Shared state of one study: tokenizer, prompts, SFT models and their evaluations."""

    def __init__(self, args: argparse.Namespace) -> None:
        from wpo_kernels.integration.examples.evaluation import tokenize_answers, tokenize_pairs
        from wpo_kernels.integration.examples.toy_setup import build_tokenizer, load_pairs

        self.args = args
        self.device = args.device
        shipped = load_pairs("train")
        self.tokenizer = build_tokenizer(shipped + load_pairs("test"))
        self.train_records = shipped[: args.train_prompts]
        held_out = addition_records({r["prompt"] for r in shipped})
        if args.eval_prompts is not None:
            held_out = random.Random(0).sample(held_out, min(args.eval_prompts, len(held_out)))
        self.eval_records = held_out
        self.kl_answers = tokenize_answers(self.tokenizer, held_out[: args.kl_prompts])
        self.train_answers = tokenize_answers(self.tokenizer, self.train_records)
        self.scripted_pairs = tokenize_pairs(self.tokenizer, self.train_records)
        self.pad, self.eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id

    # --- models ---------------------------------------------------------------------------------------
    def sft_model(self, seed: int, steps: int) -> torch.nn.Module:
        from wpo_kernels.integration.examples.evaluation import sft_warmup
        from wpo_kernels.integration.examples.toy_setup import build_model

        a = self.args
        model = build_model(
            "llama", len(self.tokenizer), hidden_size=a.hidden_size, num_layers=a.layers, num_heads=a.heads,
            seed=seed, pad_token_id=self.pad, eos_token_id=self.eos,
        ).to(self.device)  # fmt: skip
        sft_warmup(
            model, self.tokenizer, self.train_records, steps=steps, batch_size=64, lr=a.sft_lr,
            device=self.device, seed=seed, backend=a.kernel_backend,
        )  # fmt: skip
        return model.eval()

    def continued_sft(self, start: torch.nn.Module, seed: int) -> torch.nn.Module:
        """``start`` trained ``--steps`` more SFT steps (batch 64, the SFT learning rate)."""
        from wpo_kernels.integration.examples.evaluation import sft_warmup

        model = copy.deepcopy(start)
        sft_warmup(
            model, self.tokenizer, self.train_records, steps=self.args.steps, batch_size=64,
            lr=self.args.sft_lr, device=self.device, seed=seed + 1000, backend=self.args.kernel_backend,
        )  # fmt: skip
        return model.eval()

    # --- data -----------------------------------------------------------------------------------------
    def _samples(self, model: torch.nn.Module, answers: list, n: int, seed: int, batch: int = 1024) -> list:
        """``n`` answers (token lists, cut after EOS) sampled at temperature 1 for each prompt."""
        from wpo_kernels.integration.examples.decoding import decode

        g = torch.Generator().manual_seed(seed)
        out: list[list[list[int]]] = [[] for _ in answers]
        order = sorted(range(len(answers)), key=lambda i: len(answers[i][0]))
        for _ in range(n):
            for start in range(0, len(order), batch):
                chunk = order[start : start + batch]
                by_len: dict[int, list[int]] = {}
                for i in chunk:
                    by_len.setdefault(len(answers[i][0]), []).append(i)
                for members in by_len.values():
                    ids = torch.tensor([answers[i][0] for i in members], device=self.device)
                    rows = decode(
                        model, ids, ANSWER_TOKENS, eos_token_id=self.eos, pad_token_id=self.pad,
                        temperature=1.0, generator=g,
                    ).tolist()  # fmt: skip
                    for i, row in zip(members, rows, strict=True):
                        out[i].append(row[: row.index(self.eos) + 1] if self.eos in row else row)
        return out

    def sampled_pairs(self, model: torch.nn.Module, seed: int) -> tuple[list[dict], dict[str, float]]:
        """Pairs from ``model``'s own samples on the training prompts (chosen: the first correct sample,
        rejected: the first wrong one), and how they came out (sample accuracy, pairs kept)."""
        samples = self._samples(model, self.train_answers, self.args.samples, seed)
        pairs, n_correct = [], 0
        for (prompt, answer), drawn in zip(self.train_answers, samples, strict=True):
            right = [s for s in drawn if s == answer]
            wrong = [s for s in drawn if s != answer]
            n_correct += len(right)
            if right and wrong:
                pairs.append({"prompt_ids": prompt, "chosen_ids": right[0], "rejected_ids": wrong[0]})
        stats = {
            "sample_accuracy": n_correct / max(1, len(samples) * self.args.samples),
            "pairs": len(pairs),
            "prompts": len(samples),
        }
        return pairs, stats

    # --- evaluation -----------------------------------------------------------------------------------
    def greedy_correct(self, model: torch.nn.Module) -> torch.Tensor:
        from wpo_kernels.integration.examples.evaluation import greedy_correct

        return greedy_correct(model, self.tokenizer, self.eval_records, device=self.device)

    def kl_to(
        self, policy: torch.nn.Module, start: torch.nn.Module, seed: int = 0, batch: int = 1024
    ) -> float:
        """``KL(policy ‖ start)`` in nats per answer on the held-out KL prompts: one answer sampled from the
        policy per prompt (the same seed for every policy), exact next-token KL summed along it
        (:func:`~wpo_kernels.integration.examples.evaluation.answer_kl`)."""
        from wpo_kernels.integration.examples.decoding import decode
        from wpo_kernels.integration.examples.evaluation import answer_kl

        g = torch.Generator().manual_seed(seed)
        by_len: dict[int, list[list[int]]] = {}
        for prompt, _ in self.kl_answers:
            by_len.setdefault(len(prompt), []).append(prompt)
        total, count = 0.0, 0
        for prompts in by_len.values():
            for i in range(0, len(prompts), batch):
                ids = torch.tensor(prompts[i : i + batch], device=self.device)
                answers = decode(
                    policy, ids, ANSWER_TOKENS, eos_token_id=self.eos, pad_token_id=self.pad,
                    temperature=1.0, generator=g,
                )  # fmt: skip
                total += answer_kl(policy, start, ids, answers, eos_token_id=self.eos).sum().item()
                count += ids.shape[0]
        return total / max(1, count)


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

    from wpo_kernels.integration.examples.preference_loop import sequence_statistics, train_preferences
    from wpo_kernels.integration.examples.significance import mcnemar_exact, wilson_interval
    from wpo_kernels.integration.examples.study_report import plot_study, write_study_report

    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    study = Study(args)
    names = [chr(ord("A") + i) for i in range(len(args.sft_seeds))]
    print(
        f"wpo-study: {len(names)} SFT models (seeds {args.sft_seeds}), {len(study.train_records)} training "
        f"prompts, {len(study.eval_records)} held-out prompts, lrs {args.lrs}, {args.steps} steps per run"
    )

    rows: list[dict[str, Any]] = []
    correct: dict[int, torch.Tensor] = {}
    starts, sources, weight_table, sampling = {}, {}, [], {}

    def evaluate(row: dict[str, Any], model: torch.nn.Module, start: torch.nn.Module | None) -> None:
        t = time.perf_counter()
        hits = study.greedy_correct(model)
        correct[len(rows)] = hits
        k, n = int(hits.sum()), hits.numel()
        row.update(accuracy=k / n, correct=k, n_eval=n, ci95=list(wilson_interval(k, n)))
        row["kl_to_sft"] = 0.0 if start is None else study.kl_to(model, start)
        row["eval_s"] = time.perf_counter() - t
        rows.append(row)
        print(
            f"  {row['model']} {row['method']:<14} {row['data']:<16} lr={row['lr']!s:<8} "
            f"acc {row['accuracy']:.1%}  KL {row['kl_to_sft']:.3f}  (train {row.get('train_s', 0):.0f} s, "
            f"eval {row['eval_s']:.0f} s)"
        )

    # 1. SFT starts, continued SFT, model-generated pairs
    for name, seed in zip(names, args.sft_seeds, strict=True):
        t = time.perf_counter()
        starts[name] = study.sft_model(seed, args.sft_steps)
        base = {"model": name, "sft_seed": seed, "data": "-", "on_policy": None, "alignment": None}
        evaluate(
            {**base, "method": "SFT", "lr": args.sft_lr, "train_s": time.perf_counter() - t},
            starts[name],
            None,
        )
        t = time.perf_counter()
        cont = study.continued_sft(starts[name], seed)
        evaluate(
            {**base, "method": "continued SFT", "lr": args.sft_lr, "train_s": time.perf_counter() - t},
            cont,
            starts[name],
        )
        sources[f"samples of {name}"], sampling[name] = study.sampled_pairs(starts[name], seed=10_000 + seed)
        print(f"  {name}: samples {sampling[name]}")
        if not sources[f"samples of {name}"]:
            raise SystemExit(
                f"SFT model {name} (seed {seed}) produced no usable pair (a pair needs a correct and a wrong "
                f"sample of one prompt; sample accuracy {sampling[name]['sample_accuracy']:.1%}): "
                "raise --sft-steps"
            )
    sources["scripted"] = study.scripted_pairs

    # 2. weight table: every data source under every SFT start (sampled alignment, before training)
    stats: dict[tuple[str, str], Any] = {}
    for name in names:
        for source, pairs in sources.items():
            s = sequence_statistics(
                starts[name], pairs, pad_token_id=study.pad, device=args.device, backend=args.kernel_backend
            )
            stats[name, source] = s
            weight_table.append(
                {
                    "model": name,
                    "data": source,
                    "on_policy": source == f"samples of {name}",
                    "pairs": len(pairs),
                    "chosen_weight": s.chosen_weight.mean().item(),
                    "rejected_weight": s.rejected_weight.mean().item(),
                    "pair_weight": s.pair_weight.mean().item(),
                }
            )

    # 3. preference runs
    def run(name: str, source: str, method: str, variant: str, alignment: str, lr: float) -> None:
        seed = args.sft_seeds[names.index(name)]
        policy = copy.deepcopy(starts[name])
        t = time.perf_counter()
        history = train_preferences(
            policy, sources[source], stats[name, source], pad_token_id=study.pad, steps=args.steps,
            batch_size=args.batch_size, lr=lr, beta=args.beta, variant=variant, alignment=alignment,
            seed=seed, device=args.device, backend=args.kernel_backend,
        )  # fmt: skip
        row = {
            "model": name,
            "sft_seed": seed,
            "method": method,
            "variant": variant,
            "alignment": alignment if variant != "none" else None,
            "data": source,
            "on_policy": source == f"samples of {name}",
            "lr": lr,
            "beta": args.beta,
            "steps": args.steps,
            "pairs": len(sources[source]),
            "data_pair_weight": stats[name, source].pair_weight.mean().item(),
            "applied_weight": sum(h["pair_weight"] for h in history) / len(history),
            "final_train_reward_accuracy": sum(h["reward_accuracy"] for h in history[-10:])
            / len(history[-10:]),
            "train_s": time.perf_counter() - t,
        }
        evaluate(row, policy, starts[name])

    for i, name in enumerate(names):
        other = names[(i + 1) % len(names)]
        for source in (f"samples of {name}", f"samples of {other}"):
            for lr in args.lrs:
                run(name, source, "DPO", "none", "sampled", lr)
                run(name, source, "WPO", "wpo", "sampled", lr)
    first, second = names[0], names[1]
    ablation_cell = f"samples of {second}"
    for method, variant, alignment in (
        ("WPO (greedy)", "wpo", "greedy"),
        ("WPO (none)", "wpo", "none"),
        ("WPO-W", "wpo_w", "sampled"),
        ("WPO-L", "wpo_l", "sampled"),
    ):
        run(first, ablation_cell, method, variant, alignment, args.ablation_lr)
    run(first, "scripted", "DPO", "none", "sampled", args.ablation_lr)
    run(first, "scripted", "WPO", "wpo", "sampled", args.ablation_lr)

    # 4. McNemar tests (paired on the same held-out prompts)
    index = {(r["model"], r["method"], r["data"], r["lr"]): i for i, r in enumerate(rows)}
    for i, r in enumerate(rows):
        if r["method"] != "SFT":
            sft = index[r["model"], "SFT", "-", args.sft_lr]
            r["p_vs_sft"] = mcnemar_exact(correct[i], correct[sft])[0]
        if r["method"] not in ("SFT", "continued SFT"):
            cont = index[r["model"], "continued SFT", "-", args.sft_lr]
            r["p_vs_continued_sft"] = mcnemar_exact(correct[i], correct[cont])[0]
        if r.get("variant") not in (None, "none") and (r["model"], "DPO", r["data"], r["lr"]) in index:
            dpo = index[r["model"], "DPO", r["data"], r["lr"]]
            r["p_wpo_vs_dpo"], r["wpo_only_correct"], r["dpo_only_correct"] = mcnemar_exact(
                correct[i], correct[dpo]
            )

    total = time.perf_counter() - started
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "no_plot"}
    env = {
        "runtime_s": total,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "wpo-study " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
    }
    plot = None if args.no_plot else plot_study(rows, args.output_dir / "accuracy.png")
    md, js = write_study_report(
        args.output_dir,
        rows=rows,
        weights=weight_table,
        sampling=sampling,
        settings=settings,
        env=env,
        plot=plot,
    )
    print(f"\nTotal {total:.0f} s. Report: {md}, {js}" + (f", {plot}" if plot else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
