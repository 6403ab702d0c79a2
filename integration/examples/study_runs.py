"""The steps of ``wpo-study``: its prompts, SFT starts trained into a validation band, model-generated pairs,
preference runs and their evaluation. :mod:`~wpo_kernels.integration.examples.study` runs them in order.

Prompts: the 2000 shipped training prompts (SFT and preference data) and the 8000 other two-digit additions,
shuffled once (seed 0) and split into a *validation* split (the SFT band and the training curves) and the
*evaluation* prompts (every reported accuracy and KL). No prompt is in two of these sets.
"""

from __future__ import annotations

import argparse
import copy
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from wpo_kernels.integration.examples.decoding import decode
from wpo_kernels.integration.examples.evaluation import (
    AnswerSet,
    answer_kl,
    sft_loss,
    teacher_forced_correct,
    tokenize_answers,
    tokenize_pairs,
)
from wpo_kernels.integration.examples.preference_loop import (
    CollatedPairs,
    PreferenceConfig,
    SequenceStats,
    sequence_statistics,
    train_preferences,
    warmup_cosine,
)
from wpo_kernels.integration.examples.toy_setup import build_model, build_tokenizer, load_pairs

#: Answer tokens sampled per prompt: three digits and EOS.
ANSWER_TOKENS = 4
#: SFT batch size (correct answers per step) and the SFT start's linear warm-up (steps) to a constant rate.
SFT_BATCH, SFT_WARMUP = 64, 30


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


class StudyData:
    """The tokenizer and every prompt set of one study (see the module docstring)."""

    def __init__(self, args: argparse.Namespace) -> None:
        shipped = load_pairs("train")
        self.tokenizer = build_tokenizer(shipped + load_pairs("test"))
        self.pad, self.eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        self.train_records = shipped[: args.train_prompts]
        held_out = addition_records({r["prompt"] for r in shipped})
        random.Random(0).shuffle(held_out)
        validation, evaluation = held_out[: args.val_prompts], held_out[args.val_prompts :]
        evaluation = evaluation[: args.eval_prompts]
        self.validation = AnswerSet.of(tokenize_answers(self.tokenizer, validation))
        self.evaluation = AnswerSet.of(tokenize_answers(self.tokenizer, evaluation))
        self.kl_prompts = [p for p, _ in tokenize_answers(self.tokenizer, evaluation[: args.kl_prompts])]
        self.train_answers = tokenize_answers(self.tokenizer, self.train_records)
        self.scripted = tokenize_pairs(self.tokenizer, self.train_records)
        self.sft_examples = CollatedPairs.of(self.scripted, self.pad)  # the chosen rows: correct answers


@dataclass
class SFTStart:
    """How an SFT start was made: ``steps`` taken, validation accuracy at every check ``(step, acc)``,
    and the last one (inside the band when ``in_band``)."""

    seed: int
    steps: int
    val_accuracy: float
    in_band: bool
    checks: list[tuple[int, float]] = field(default_factory=list)


class SFTLoop:
    """AdamW on the mean NLL of the correct answers (fused head), batches of :data:`SFT_BATCH` drawn with
    replacement from ``seed``; step ``s`` (from 0) at ``lr * schedule(s)``."""

    def __init__(
        self, model: nn.Module, data: StudyData, lr: float, seed: int, args: argparse.Namespace,
        schedule: Callable[[int], float],
    ) -> None:  # fmt: skip
        self.model, self.data, self.lr, self.args, self.schedule = model, data, lr, args, schedule
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(seed)
        self.step_count = 0

    def step(self) -> float:
        """One optimizer step; returns its loss."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * self.schedule(self.step_count)
        self.step_count += 1
        idx = torch.randint(self.data.sft_examples.size, (SFT_BATCH,), generator=self.generator).tolist()
        batch, _ = self.data.sft_examples.chosen(idx, self.args.device)
        loss = sft_loss(self.model, batch, self.args.kernel_backend)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return loss.item()


def validation_accuracy(model: nn.Module, data: StudyData) -> float:
    """Greedy answer accuracy on the validation split."""
    return teacher_forced_correct(model, data.validation).float().mean().item()


def study_model(data: StudyData, seed: int, args: argparse.Namespace) -> nn.Module:
    """A fresh random-init Llama of the study's size, initialised from ``seed``."""
    return build_model(
        "llama", len(data.tokenizer), hidden_size=args.hidden_size, num_layers=args.layers,
        num_heads=args.heads, seed=seed, pad_token_id=data.pad, eos_token_id=data.eos,
    ).to(args.device)  # fmt: skip


def sft_schedule(step: int) -> float:
    """The SFT learning-rate factor: linear warm-up over :data:`SFT_WARMUP` steps, then constant."""
    return min(1.0, (step + 1) / SFT_WARMUP)


def sft_fixed_steps(data: StudyData, seed: int, args: argparse.Namespace, steps: int) -> nn.Module:
    """A model of ``seed`` after exactly ``steps`` SFT steps (the band's loop without its checks), for
    callers that need the study's model at a set training length (``wpo-score``'s tests and examples)."""
    model = study_model(data, seed, args)
    loop = SFTLoop(model, data, args.sft_lr, seed, args, sft_schedule)
    for _ in range(steps):
        loop.step()
    return model.eval()


def sft_to_band(
    data: StudyData, seed: int, args: argparse.Namespace, desc: str
) -> tuple[nn.Module, SFTStart]:
    """A model of ``seed`` trained by :class:`SFTLoop` until its validation accuracy, checked every
    ``--sft-check-every`` steps, lies in ``--sft-band``; at most ``--sft-max-steps`` steps. A start that
    ends outside the band is returned with ``in_band=False`` (the caller refuses it)."""
    low, high = args.sft_band
    model = study_model(data, seed, args)
    loop = SFTLoop(model, data, args.sft_lr, seed, args, sft_schedule)
    checks: list[tuple[int, float]] = []
    bar = tqdm(total=args.sft_max_steps, desc=desc, leave=False, dynamic_ncols=True, position=1)
    acc = 0.0
    while loop.step_count < args.sft_max_steps:
        loss = loop.step()
        bar.update(1)
        if loop.step_count % args.sft_check_every == 0:
            acc = validation_accuracy(model, data)
            checks.append((loop.step_count, acc))
            bar.set_postfix(loss=f"{loss:.3f}", val=f"{acc:.1%}", band=f"{low:.0%}-{high:.0%}")
            if low <= acc <= high:
                break
    bar.close()
    start = SFTStart(seed, loop.step_count, acc, low <= acc <= high, checks)
    return model.eval(), start


def continued_sft(
    data: StudyData, start: nn.Module, seed: int, args: argparse.Namespace, desc: str
) -> nn.Module:
    """``start`` trained ``--steps`` more SFT steps at the SFT learning rate with the preference runs'
    schedule (:func:`~wpo_kernels.integration.examples.preference_loop.warmup_cosine`), batches from
    ``seed + 1000``: the control that spends the same steps on the correct answers."""
    model = copy.deepcopy(start)
    loop = SFTLoop(model, data, args.sft_lr, seed + 1000, args, warmup_cosine(args.steps))
    for _ in tqdm(range(args.steps), desc=desc, leave=False, dynamic_ncols=True, position=1):
        loop.step()
    return model.eval()


@torch.no_grad()
def sample_answers(
    model: nn.Module, data: StudyData, n: int, seed: int, desc: str, batch: int = 1024
) -> list[list[list[int]]]:
    """``n`` answers (token lists, cut after EOS) sampled at temperature 1 for each training prompt."""
    answers = data.train_answers
    g = torch.Generator().manual_seed(seed)
    out: list[list[list[int]]] = [[] for _ in answers]
    by_len: dict[int, list[int]] = {}
    for i, (prompt, _) in enumerate(answers):
        by_len.setdefault(len(prompt), []).append(i)
    chunks = [m[s : s + batch] for m in by_len.values() for s in range(0, len(m), batch)]
    for _ in tqdm(range(n), desc=desc, leave=False, dynamic_ncols=True, position=1):
        for members in chunks:
            ids = torch.tensor([answers[i][0] for i in members], device=next(model.parameters()).device)
            rows = decode(
                model, ids, ANSWER_TOKENS, eos_token_id=data.eos, pad_token_id=data.pad, temperature=1.0,
                generator=g,
            ).tolist()  # fmt: skip
            for i, row in zip(members, rows, strict=True):
                out[i].append(row[: row.index(data.eos) + 1] if data.eos in row else row)
    return out


def sampled_pairs(
    model: nn.Module, data: StudyData, n: int, seed: int, desc: str
) -> tuple[list[dict], dict[str, float]]:
    """Pairs from ``model``'s own samples of the training prompts (chosen: the first correct sample,
    rejected: the first wrong one; prompts without both are dropped), and how the sampling came out."""
    samples = sample_answers(model, data, n, seed, desc)
    pairs, n_correct = [], 0
    for (prompt, answer), drawn in zip(data.train_answers, samples, strict=True):
        right = [s for s in drawn if s == answer]
        wrong = [s for s in drawn if s != answer]
        n_correct += len(right)
        if right and wrong:
            pairs.append({"prompt_ids": prompt, "chosen_ids": right[0], "rejected_ids": wrong[0]})
    stats = {
        "sample_accuracy": n_correct / max(1, len(samples) * n),
        "pairs": len(pairs),
        "prompts": len(samples),
    }
    return pairs, stats


@torch.no_grad()
def kl_to_start(
    policy: nn.Module, start: nn.Module, data: StudyData, seed: int = 0, batch: int = 1024
) -> float:
    """``KL(policy ‖ start)`` in nats per answer on the KL prompts: one answer sampled from the policy per
    prompt (the same seed for every policy), the exact next-token KL summed along it
    (:func:`~wpo_kernels.integration.examples.evaluation.answer_kl`)."""
    g = torch.Generator().manual_seed(seed)
    by_len: dict[int, list[list[int]]] = {}
    for prompt in data.kl_prompts:
        by_len.setdefault(len(prompt), []).append(prompt)
    total, count = 0.0, 0
    for prompts in by_len.values():
        for i in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[i : i + batch], device=next(policy.parameters()).device)
            answers = decode(
                policy, ids, ANSWER_TOKENS, eos_token_id=data.eos, pad_token_id=data.pad, temperature=1.0,
                generator=g,
            )  # fmt: skip
            total += answer_kl(policy, start, ids, answers, eos_token_id=data.eos).sum().item()
            count += ids.shape[0]
    return total / max(1, count)


def evaluate(model: nn.Module, start: nn.Module | None, data: StudyData) -> tuple[Tensor, float]:
    """``[n_eval]`` bool (greedy answer correct, per evaluation prompt) and the KL to ``start`` (0 when
    None)."""
    correct = teacher_forced_correct(model, data.evaluation)
    return correct, 0.0 if start is None else kl_to_start(model, start, data)


@dataclass
class PreferenceData:
    """One data source of one model: its pairs collated once, and the model's statistics on them (the
    DPO reference log-probs and the WPO weights before training)."""

    pairs: CollatedPairs
    stats: SequenceStats


def preference_data(model: nn.Module, examples: list[dict], data: StudyData, args: argparse.Namespace):
    """:class:`PreferenceData` of ``examples`` under ``model``."""
    pairs = CollatedPairs.of(examples, data.pad)
    stats = sequence_statistics(model, pairs, device=args.device, backend=args.kernel_backend)
    return PreferenceData(pairs, stats)


def preference_run(
    start: nn.Module,
    source: PreferenceData,
    config: PreferenceConfig,
    data: StudyData,
    args: argparse.Namespace,
    desc: str,
    start_accuracy: float,
) -> tuple[nn.Module, list[dict[str, float]], list[tuple[int, float]]]:
    """Train a copy of ``start`` on ``source``: the policy, its per-step history and its validation curve
    (``start_accuracy``, the start's validation accuracy, at step 0, then every ``--curve-every`` steps)."""
    policy = copy.deepcopy(start)
    curve = [(0, start_accuracy)]
    bar = tqdm(total=config.steps, desc=desc, leave=False, dynamic_ncols=True, position=1)

    def on_step(step: int, model: nn.Module) -> None:
        bar.update(1)
        if step % args.curve_every == 0 or step == config.steps:
            curve.append((step, validation_accuracy(model, data)))
            bar.set_postfix(val=f"{curve[-1][1]:.1%}")

    history = train_preferences(
        policy, source.pairs, source.stats, config, device=args.device, backend=args.kernel_backend,
        on_step=on_step,
    )  # fmt: skip
    bar.close()
    return policy, history, curve


def run_summary(history: list[dict[str, float]]) -> dict[str, float]:
    """Mean applied pair weight over the run and training reward accuracy over its last 10 steps."""
    last = history[-10:]
    return {
        "applied_weight": sum(h["pair_weight"] for h in history) / len(history),
        "final_train_reward_accuracy": sum(h["reward_accuracy"] for h in last) / len(last),
    }
