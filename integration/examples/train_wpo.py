"""The trainer demo: offline WPO training of a small causal LM through ``WPOTrainer``, with DPO side by side.

This shows the plumbing (TRL trainer, fused head, report, curves), not what WPO is worth: on the shipped
scripted pairs, with an under-trained SFT start and no control rows, its numbers say little about the
method. ``wpo-study`` (:mod:`~wpo_kernels.integration.examples.study`) is the study that does.

Everything is local: the preference pairs ship with the package (two-digit addition, correct vs wrong
sum), the tokenizer is trained on them with ``tokenizers``, the model is a random-init ``transformers``
Llama (or Gemma-2, ``--model gemma2``, whose final-logit softcap the fused head reproduces).

Steps: SFT warm-up on the chosen answers → copy → WPO through :class:`~wpo_kernels.integration.trl.WPOTrainer`
and, from the same SFT weights with the same seed and steps, DPO (the same trainer, ``wpo_variant="none"``)
→ held-out evaluation → ``report.md``, ``report.json`` and ``curves.png`` in ``--output-dir``.

Defaults take about 30 s on 2 idle CPU cores (a few minutes on a busy machine); ``--device cuda`` and
larger ``--hidden-size``, ``--layers``, ``--steps``, ``--sft-steps`` scale it up. ``wpo-train --help``
lists every option.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from wpo_kernels.integration.examples.toy_setup import MODEL_KINDS


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options of ``wpo-train``."""
    p = argparse.ArgumentParser(
        prog="wpo-train",
        description="Offline WPO vs DPO on a shipped arithmetic preference set (SFT warm-up, then "
        "preference training through WPOTrainer, held-out report and curves).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output-dir", type=Path, default=Path("outputs/wpo_example"), help="where reports go")
    p.add_argument("--model", choices=MODEL_KINDS, default="llama", help="gemma2 exercises the logit softcap")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu' or 'cuda'")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--train-pairs", type=int, default=None, help="use the first N training pairs (all: 2000)")
    p.add_argument("--test-pairs", type=int, default=None, help="use the first N held-out pairs (all: 300)")
    p.add_argument("--sft-steps", type=int, default=300, help="SFT warm-up steps (0: none)")
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--steps", type=int, default=300, help="preference-training steps for each of WPO and DPO")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per step")
    p.add_argument("--lr", type=float, default=2e-4, help="preference-training learning rate")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument(
        "--loss-type", default="sigmoid", choices=("sigmoid", "ipo", "hinge", "simpo", "robust", "kto")
    )
    p.add_argument("--alignment", default="sampled", choices=("sampled", "greedy", "none"))
    p.add_argument("--variant", default="wpo", choices=("wpo", "wpo_w", "wpo_l"), help="WPO weighting")
    p.add_argument("--weight-clamp", type=float, default=None)
    p.add_argument("--eval-every", type=int, default=50, help="held-out evaluation every N steps (curves)")
    p.add_argument("--no-dpo", action="store_true", help="skip the unweighted (DPO) baseline run")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    p.add_argument("--kernel-backend", default="auto", choices=("auto", "triton", "torch"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    return p.parse_args(argv)


def _resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is available")
    return name


def _quiet_progress_callback() -> Any:
    """TRL's progress bar, with the loss and reward accuracy as a postfix instead of printed log dicts."""
    from transformers.trainer_callback import ProgressCallback

    class _Progress(ProgressCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if self.training_bar is not None and logs and "loss" in logs:
                acc = logs.get("rewards/accuracies", float("nan"))
                self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}", acc=f"{acc:.2f}")

    return _Progress


def run_preference_training(
    name: str,
    sft_model: torch.nn.Module,
    tokenizer: Any,
    train_records: list[dict],
    test_records: list[dict],
    args: argparse.Namespace,
    device: str,
    variant: str,
) -> tuple[torch.nn.Module, list[dict]]:
    """Train a copy of ``sft_model`` with :class:`WPOTrainer` (``variant="none"`` is DPO) against a
    frozen copy of it; returns the trained policy and ``log_history``."""
    from datasets import Dataset
    from transformers.trainer_callback import ProgressCallback

    from wpo_kernels.integration.trl import WPOConfig, WPOTrainer

    policy = copy.deepcopy(sft_model).train()
    reference = copy.deepcopy(sft_model).eval()
    fields = ("prompt", "chosen", "rejected")
    config = WPOConfig(
        output_dir=str(args.output_dir / ("trainer_" + "".join(c for c in name.lower() if c.isalnum()))),
        loss_type=args.loss_type,
        beta=args.beta,
        alignment=args.alignment,
        wpo_variant=variant,
        weight_clamp=args.weight_clamp,
        kernel_backend=args.kernel_backend,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 10),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=max(args.batch_size, 64),
        eval_strategy="steps" if args.eval_every > 0 else "no",
        eval_steps=args.eval_every if args.eval_every > 0 else None,
        logging_steps=max(1, args.steps // 50),
        seed=args.seed,
        data_seed=args.seed,
        gradient_checkpointing=False,
        bf16=bool(args.bf16),
        use_cpu=device == "cpu",
        max_length=64,
        report_to=[],
        save_strategy="no",
        disable_tqdm=False,
        dataloader_num_workers=0,
    )
    trainer = WPOTrainer(
        policy,
        ref_model=reference,
        args=config,
        train_dataset=Dataset.from_list([{k: r[k] for k in fields} for r in train_records]),
        eval_dataset=Dataset.from_list([{k: r[k] for k in fields} for r in test_records]),
        processing_class=tokenizer,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_quiet_progress_callback())
    print(f"\n== {name}: {args.steps} steps, loss={args.loss_type}, variant={variant}, beta={args.beta}")
    trainer.train()
    return trainer.model.eval(), list(trainer.state.log_history)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``wpo-train`` (returns the exit status)."""
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _resolve_device(args.device)
    args.output_dir.mkdir(parents=True, exist_ok=True)

    from transformers import logging as hf_logging
    from transformers import set_seed

    from wpo_kernels.integration.examples.evaluation import evaluate_preferences, sft_warmup
    from wpo_kernels.integration.examples.report import plot_curves, results_table, write_report
    from wpo_kernels.integration.examples.toy_setup import build_model, build_tokenizer, load_pairs

    hf_logging.set_verbosity_error()
    start = time.perf_counter()
    runtimes: dict[str, float] = {}
    train_records = load_pairs("train", args.train_pairs)
    test_records = load_pairs("test", args.test_pairs)
    tokenizer = build_tokenizer(load_pairs("train") + load_pairs("test"))
    set_seed(args.seed)
    model = build_model(
        args.model,
        len(tokenizer),
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=args.heads,
        seed=args.seed,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{args.model}: {n_params / 1e3:.0f}k parameters, vocabulary {len(tokenizer)}, device {device}; "
        f"{len(train_records)} training pairs, {len(test_records)} held-out pairs"
    )

    t = time.perf_counter()
    sft_warmup(
        model,
        tokenizer,
        train_records,
        steps=args.sft_steps,
        batch_size=64,
        lr=args.sft_lr,
        device=device,
        seed=args.seed,
        backend=args.kernel_backend,
    )
    runtimes["sft"] = time.perf_counter() - t
    model.eval()
    evaluate = lambda policy: evaluate_preferences(  # noqa: E731
        policy, model, tokenizer, test_records, beta=args.beta, device=device, backend=args.kernel_backend
    )
    evals = {"SFT (before)": evaluate(model)}

    sigmoid = args.loss_type == "sigmoid"
    weighted = args.variant.upper().replace("_", "-") + ("" if sigmoid else f" ({args.loss_type})")
    runs = [(weighted, args.variant)]
    if not args.no_dpo:  # the same trainer, unweighted: DPO for the sigmoid loss
        runs.append(("DPO" if sigmoid else f"unweighted ({args.loss_type})", "none"))
    histories = {}
    for name, variant in runs:
        t = time.perf_counter()
        set_seed(args.seed)
        policy, histories[name] = run_preference_training(
            name, model, tokenizer, train_records, test_records, args, device, variant
        )
        runtimes[name] = time.perf_counter() - t
        evals[name] = evaluate(policy)

    plot = None if args.no_plot else plot_curves(histories, args.output_dir / "curves.png")
    runtimes["total"] = time.perf_counter() - start
    settings = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("no_plot",)
    }
    settings["device"] = device
    md_path, json_path = write_report(
        args.output_dir, settings=settings, evals=evals, runtimes=runtimes, histories=histories, plot=plot
    )
    print("\nHeld-out results:\n" + results_table(evals))
    outputs = ", ".join(str(p) for p in (md_path, json_path, plot) if p is not None)
    print(f"\nTotal {runtimes['total']:.0f} s. Report: {outputs}")
    print(
        "Note: scripted pairs, one seed, no continued-SFT control: this run demonstrates the trainer, not "
        "WPO's effect. `wpo-study` runs the controlled comparison."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
