"""Framework-free pieces of the example: batching, SFT warm-up and held-out evaluation, all through
:func:`wpo_kernels.integration.hf.causal_lm_hidden_and_head` (the fused head: no ``[B, T, V]`` logits)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from trl.trainer.dpo_trainer import DataCollatorForPreference

from wpo_kernels.integration.examples.decoding import decode, head_logits
from wpo_kernels.integration.hf import causal_lm_hidden_and_head


def tokenize_pairs(tokenizer: PreTrainedTokenizerBase, records: Sequence[dict[str, str]]) -> list[dict]:
    """TRL's tokenised layout: ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (completions end in EOS)."""
    if not records:
        return []
    eos = tokenizer.eos_token
    ids = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = ids([r["prompt"] for r in records])
    chosen = ids([r["prompt"] + r["chosen"] + eos for r in records])
    rejected = ids([r["prompt"] + r["rejected"] + eos for r in records])
    return [
        {"prompt_ids": p, "chosen_ids": c[len(p) :], "rejected_ids": r[len(p) :]}
        for p, c, r in zip(prompts, chosen, rejected, strict=True)
    ]


def preference_batches(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[dict[str, str]], batch_size: int, device: str
) -> Iterator[dict[str, Tensor]]:
    """Batches as TRL's ``DataCollatorForPreference`` makes them: ``input_ids``, ``attention_mask``,
    ``completion_mask`` ``[2B, T]`` long, chosen rows first, on ``device``."""
    collate = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)
    examples = tokenize_pairs(tokenizer, records)
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size])
        yield {k: v.to(device) for k, v in batch.items()}


def completion_logps(model: nn.Module, batch: dict[str, Tensor], backend: str = "auto") -> Tensor:
    """``[N]`` float32 summed log-probabilities of each row's completion tokens (``completion_mask``)."""
    hidden, head = causal_lm_hidden_and_head(model, batch)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    return head.logprobs(hidden[:, :-1], labels[:, 1:], backend=backend).logprobs.sum(dim=-1)


def sft_loss(model: nn.Module, batch: dict[str, Tensor], backend: str = "auto") -> Tensor:
    """Mean NLL of the completion tokens (``completion_mask``) of ``batch`` (``input_ids``,
    ``attention_mask``, ``completion_mask`` ``[B, T]`` long), computed by the fused head; a scalar."""
    hidden, head = causal_lm_hidden_and_head(model, batch)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
    logps = head.logprobs(hidden[:, :-1], labels, backend=backend).logprobs
    return -logps.sum() / (labels != -100).sum().clamp(min=1)


def sft_warmup(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict[str, str]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    device: str,
    seed: int = 0,
    backend: str = "auto",
    desc: str = "SFT warm-up",
) -> list[float]:
    """Supervised warm-up on the chosen completions: AdamW on the mean completion-token NLL, computed by
    the fused head. Returns the loss of every step."""
    if steps <= 0:
        return []
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * max(0.0, 1 - s / steps) ** 0.5
    )
    collate = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)
    examples = tokenize_pairs(tokenizer, records)
    g = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(range(steps), desc=desc, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(len(examples), (batch_size,), generator=g).tolist()
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx]).items()}
        loss = sft_loss(model, {k: v[:batch_size] for k, v in batch.items()}, backend)  # chosen rows first
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    model.eval()
    return losses


@dataclass
class PreferenceEval:
    """Held-out preference metrics of a policy against a reference.

    - ``reward_accuracy``: fraction of pairs with ``β·(r_w - r_l) > 0`` (ties count ½, so a policy equal to
      its reference scores 0.5);
    - ``reward_margin``: mean ``β·(r_w - r_l)``;
    - ``likelihood_accuracy``: fraction with ``log π(y_w) > log π(y_l)`` (the policy's own preference);
    - ``answer_accuracy``: greedy decoding reproduces the correct answer exactly;
    - ``by_error``: ``reward_accuracy`` per kind of mistake in the rejected answer.
    """

    reward_accuracy: float
    reward_margin: float
    likelihood_accuracy: float
    answer_accuracy: float
    by_error: dict[str, float]


@torch.no_grad()
def evaluate_preferences(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict[str, str]],
    *,
    beta: float,
    device: str,
    batch_size: int = 64,
    backend: str = "auto",
) -> PreferenceEval:
    """Score every held-out pair under ``policy`` and ``reference`` (see :class:`PreferenceEval`)."""
    was_training = policy.training
    policy.eval()
    margins, lik = [], []
    for batch in preference_batches(tokenizer, records, batch_size, device):
        pi_w, pi_l = completion_logps(policy, batch, backend).chunk(2)
        ref_w, ref_l = completion_logps(reference, batch, backend).chunk(2)
        margins.append(beta * ((pi_w - ref_w) - (pi_l - ref_l)))
        lik.append((pi_w > pi_l).float())
    margin = torch.cat(margins).cpu()
    wins = (margin > 0).float() + 0.5 * (margin == 0).float()
    by_error: dict[str, list[float]] = {}
    for r, w in zip(records, wins.tolist(), strict=True):
        by_error.setdefault(r.get("error", "all"), []).append(w)
    result = PreferenceEval(
        reward_accuracy=wins.mean().item(),
        reward_margin=margin.mean().item(),
        likelihood_accuracy=torch.cat(lik).mean().item(),
        answer_accuracy=greedy_answer_accuracy(policy, tokenizer, records, device=device),
        by_error={k: sum(v) / len(v) for k, v in sorted(by_error.items())},
    )
    policy.train(was_training)
    return result


def tokenize_answers(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[dict[str, str]]
) -> list[tuple[list[int], list[int]]]:
    """``(prompt_ids, answer_ids)`` of each record's ``prompt`` and correct ``chosen`` answer (+ EOS)."""
    if not records:
        return []
    eos = tokenizer.eos_token
    prompts = tokenizer([r["prompt"] for r in records], add_special_tokens=False)["input_ids"]
    full = tokenizer([r["prompt"] + r["chosen"] + eos for r in records], add_special_tokens=False)[
        "input_ids"
    ]
    return [(p, f[len(p) :]) for p, f in zip(prompts, full, strict=True)]


@dataclass
class AnswerSet:
    """Prompts and their correct answers as tensors, grouped by (prompt length, answer length).

    ``groups``: ``(positions [k] long, prompt_ids [k, P] long, answer_ids [k, n] long)`` per length
    pair, ``positions`` indexing the items in their original order; ``size``: the number of items.
    """

    groups: list[tuple[Tensor, Tensor, Tensor]]
    size: int

    @classmethod
    def of(cls, items: Sequence[tuple[list[int], list[int]]]) -> AnswerSet:
        """Group ``(prompt_ids, answer_ids)`` pairs (:func:`tokenize_answers`) into tensors."""
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, (prompt, answer) in enumerate(items):
            by_shape.setdefault((len(prompt), len(answer)), []).append(i)
        groups = [
            (
                torch.tensor(members),
                torch.tensor([items[i][0] for i in members]),
                torch.tensor([items[i][1] for i in members]),
            )
            for members in by_shape.values()
        ]
        return cls(groups, len(items))


@torch.no_grad()
def teacher_forced_correct(model: nn.Module, answers: AnswerSet, *, batch_size: int = 4096) -> Tensor:
    """``[answers.size]`` bool: would greedy decoding reproduce each correct answer token for token?

    Greedy decoding emits the answer exactly when, at every answer position, the argmax of the next-token
    distribution given the prompt and the *correct* preceding answer tokens is the correct token. So one
    teacher-forced forward pass over ``[prompt; answer]`` decides it, instead of one decoding step per
    answer token (the same result as :func:`greedy_correct` up to exact logit ties). Evaluation, not
    training: it takes the ``[B, n, V]`` logits of the ``n`` answer positions.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = torch.zeros(answers.size, dtype=torch.bool)
    for positions, prompts, targets in answers.groups:
        n = targets.shape[1]
        for start in range(0, len(positions), batch_size):
            chunk = slice(start, start + batch_size)
            ids = torch.cat([prompts[chunk], targets[chunk, :-1]], dim=1).to(device)  # the last predicts none
            hidden, head = causal_lm_hidden_and_head(model, {"input_ids": ids})
            predicted = head_logits(head, hidden[:, -n:]).argmax(dim=-1).cpu()
            correct[positions[chunk]] = (predicted == targets[chunk]).all(dim=1)
    model.train(was_training)
    return correct


@torch.no_grad()
def greedy_correct(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict[str, str]],
    *,
    device: str,
    batch_size: int = 2048,
) -> Tensor:
    """``[len(records)]`` bool: does the greedy continuation of each prompt equal its ``chosen`` answer
    (and EOS) token for token (see :func:`~wpo_kernels.integration.examples.decoding.decode`)."""
    was_training = model.training
    model.eval()
    groups: dict[int, list[int]] = {}
    items = tokenize_answers(tokenizer, records)
    for i, (prompt, _) in enumerate(items):
        groups.setdefault(len(prompt), []).append(i)
    correct = torch.zeros(len(items), dtype=torch.bool)
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            ids = torch.tensor([items[i][0] for i in chunk], device=device)
            n_new = max(len(items[i][1]) for i in chunk)
            out = decode(
                model, ids, n_new, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
            ).tolist()
            for i, row in zip(chunk, out, strict=True):
                correct[i] = row[: len(items[i][1])] == items[i][1]
    model.train(was_training)
    return correct


def greedy_answer_accuracy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict[str, str]],
    *,
    device: str,
    batch_size: int = 2048,
) -> float:
    """Fraction of prompts whose greedy continuation equals the chosen answer (see :func:`greedy_correct`)."""
    if not records:
        return 0.0
    return (
        greedy_correct(model, tokenizer, records, device=device, batch_size=batch_size).float().mean().item()
    )


@torch.no_grad()
def answer_kl(
    policy: nn.Module,
    start: nn.Module,
    prompt_ids: Tensor,
    answers: Tensor,
    *,
    eos_token_id: int,
) -> Tensor:
    """Per-prompt ``KL(policy ‖ start)`` in nats along answers sampled from ``policy``: the sum over the
    answer's positions of the exact next-token KL, ``Σ_t KL(π(·|x, y<t) ‖ π_start(·|x, y<t))``. Its mean
    over ``y ~ π`` is the sequence KL, with far less variance than ``log π(y) − log π_start(y)``.

    Evaluation, not training: it takes the ``[B, n, V]`` distributions of the ``n`` answer positions.

    Args:
        prompt_ids: ``[B, P]`` long, equal-length prompts; answers: ``[B, n]`` long samples from ``policy``
            (:func:`~wpo_kernels.integration.examples.decoding.decode`), padding after their EOS.

    Returns:
        ``[B]`` float32 on CPU.
    """
    ids = torch.cat([prompt_ids, answers], dim=1)
    n = answers.shape[1]
    after_eos = torch.cumsum((answers == eos_token_id).int(), dim=1) - (answers == eos_token_id).int()
    scored = (after_eos == 0).float()  # positions up to and including the EOS
    logp = []
    for model in (policy, start):
        hidden, head = causal_lm_hidden_and_head(model, {"input_ids": ids})
        logp.append(torch.log_softmax(head_logits(head, hidden[:, -n - 1 : -1]), dim=-1))
    per_token = (logp[0].exp() * (logp[0] - logp[1])).sum(-1)
    return (per_token * scored).sum(-1).cpu()
