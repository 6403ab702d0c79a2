"""A framework-free preference-training loop for the study: every log-probability, weight and loss comes
from :func:`wpo_kernels.fused_linear_wpo_loss` on the backbone's hidden states (no ``[B, T, V]`` logits).

Pairs are in TRL's tokenised layout (``prompt_ids``, ``chosen_ids``, ``rejected_ids``); the reference is
the frozen starting model, whose summed log-probs are computed once (:func:`sequence_statistics`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from trl.trainer.dpo_trainer import DataCollatorForPreference

from wpo_kernels import fused_linear_wpo_loss, wpo_weights
from wpo_kernels.integration.hf import causal_lm_hidden_and_head


def _batch(collate: DataCollatorForPreference, examples: Sequence[dict], idx: Sequence[int], device: str):
    batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx]).items()}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
    return batch, labels


@dataclass
class SequenceStats:
    """Per-pair statistics of a model on a pair set, each ``[n_pairs]`` float32 on CPU: summed log-probs
    and WPO weights (of the given alignment) of the chosen and rejected completions."""

    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_weight: Tensor
    rejected_weight: Tensor

    @property
    def pair_weight(self) -> Tensor:
        """``w(x, y_w) · w(x, y_l)``, WPO's weight of each pair."""
        return self.chosen_weight * self.rejected_weight


@torch.no_grad()
def sequence_statistics(
    model: nn.Module,
    examples: Sequence[dict],
    *,
    pad_token_id: int,
    device: str,
    alignment: str = "sampled",
    batch_size: int = 256,
    backend: str = "auto",
) -> SequenceStats:
    """Score every pair of ``examples`` under ``model`` (eval mode): summed log-probs and WPO weights."""
    was_training = model.training
    model.eval()
    collate = DataCollatorForPreference(pad_token_id=pad_token_id)
    chosen_l, rejected_l, chosen_w, rejected_w = [], [], [], []
    for start in range(0, len(examples), batch_size):
        idx = range(start, min(start + batch_size, len(examples)))
        batch, labels = _batch(collate, examples, idx, device)
        hidden, head = causal_lm_hidden_and_head(model, batch)
        out = head.logprobs(
            hidden[:, :-1], labels, outputs=("log_max_prob", "log_sum_sq_probs"), backend=backend
        )
        w = wpo_weights(out.logprobs, out.log_max_prob, out.log_sum_sq_probs, labels != -100, alignment)
        logps, b = out.logprobs.sum(-1).cpu(), len(idx)  # each batch is [chosen; rejected]
        chosen_l.append(logps[:b])
        rejected_l.append(logps[b:])
        chosen_w.append(w[:b].cpu())
        rejected_w.append(w[b:].cpu())
    model.train(was_training)
    return SequenceStats(
        torch.cat(chosen_l), torch.cat(rejected_l), torch.cat(chosen_w), torch.cat(rejected_w)
    )


def warmup_cosine(steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier of step ``s``: linear warm-up over 10% of ``steps``, then cosine to 0."""
    warm = max(1, steps // 10)
    return lambda s: (
        (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))
    )


def train_preferences(
    policy: nn.Module,
    examples: Sequence[dict],
    reference: SequenceStats,
    *,
    pad_token_id: int,
    steps: int,
    batch_size: int,
    lr: float,
    beta: float,
    variant: str,
    alignment: str = "sampled",
    seed: int = 0,
    device: str = "cpu",
    backend: str = "auto",
) -> list[dict[str, float]]:
    """Train ``policy`` in place on the pairs with AdamW (warm-up + cosine, gradient norm clipped at 1).

    Args:
        policy: a ``transformers`` causal LM (float32), trained in place.
        examples: pairs in TRL's tokenised layout.
        reference: the reference model's statistics on ``examples`` (its ``*_logps`` are used).
        variant: ``"none"`` (DPO), ``"wpo"``, ``"wpo_w"`` or ``"wpo_l"``; ``alignment`` as in
            :func:`wpo_kernels.wpo_weights`; ``beta``: the sigmoid loss's β.

    Returns:
        One dict per step: ``loss``, ``reward_accuracy``, ``pair_weight`` (the mean applied pair
        weight; 1 for DPO).
    """
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
    collate = DataCollatorForPreference(pad_token_id=pad_token_id)
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    history = []
    for _ in range(steps):
        if len(order) < batch_size:  # epochs of a fresh permutation
            order += torch.randperm(len(examples), generator=g).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        batch, labels = _batch(collate, examples, idx, device)
        hidden, head = causal_lm_hidden_and_head(policy, batch)
        t = head.transform
        out = fused_linear_wpo_loss(
            hidden[:, :-1],
            head.weight,
            labels,
            reference.chosen_logps[idx].to(device),
            reference.rejected_logps[idx].to(device),
            bias=head.bias,
            temperature=t.temperature,
            softcap=t.softcap,
            logit_scale=t.logit_scale,
            alignment=alignment,
            variant=variant,
            beta=beta,
            backend=backend,
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        history.append(
            {
                "loss": out.loss.item(),
                "reward_accuracy": out.metrics["rewards/accuracies"].item(),
                "pair_weight": out.metrics["weights/pair_mean"].item() if variant != "none" else 1.0,
            }
        )
    policy.eval()
    return history
