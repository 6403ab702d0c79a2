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


@dataclass
class CollatedPairs:
    """Every pair of a set collated once, as TRL's ``DataCollatorForPreference`` lays out a batch:
    ``input_ids``, ``attention_mask``, ``completion_mask`` ``[2N, T]`` long, chosen rows ``0..N-1`` then
    rejected rows ``N..2N-1``, right-padded to the longest row of the set."""

    tensors: dict[str, Tensor]
    size: int

    @classmethod
    def of(cls, examples: Sequence[dict], pad_token_id: int) -> CollatedPairs:
        """Collate ``examples`` (TRL's tokenised layout) in one call."""
        return cls(DataCollatorForPreference(pad_token_id=pad_token_id)(list(examples)), len(examples))

    def batch(self, idx: Sequence[int], device: str) -> tuple[dict[str, Tensor], Tensor]:
        """The collator's batch of pairs ``idx`` (``[2B, T_b]``, padded to its own longest row, as the
        collator pads) on ``device``, and its labels ``[2B, T_b - 1]`` (``-100`` outside completions)."""
        rows = torch.tensor(list(idx))
        return self.rows(torch.cat([rows, rows + self.size]), device)

    def chosen(self, idx: Sequence[int], device: str) -> tuple[dict[str, Tensor], Tensor]:
        """Like :meth:`batch`, the chosen rows only (``[B, T_b]``): SFT batches of the correct answers."""
        return self.rows(torch.tensor(list(idx)), device)

    def rows(self, rows: Tensor, device: str) -> tuple[dict[str, Tensor], Tensor]:
        """Rows ``rows`` of the collated set, cut to their longest row, and their labels."""
        width = int(self.tensors["attention_mask"][rows].sum(dim=1).max())
        batch = {k: v[rows, :width].to(device) for k, v in self.tensors.items()}
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
    pairs: CollatedPairs,
    *,
    device: str,
    alignment: str = "sampled",
    batch_size: int = 256,
    backend: str = "auto",
) -> SequenceStats:
    """Score every pair under ``model`` (eval mode): summed log-probs and WPO weights of ``alignment``."""
    was_training = model.training
    model.eval()
    chosen_l, rejected_l, chosen_w, rejected_w = [], [], [], []
    for start in range(0, pairs.size, batch_size):
        idx = range(start, min(start + batch_size, pairs.size))
        batch, labels = pairs.batch(idx, device)
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


@dataclass
class PreferenceConfig:
    """One preference run's settings: ``variant`` ``"none"`` (DPO), ``"wpo"``, ``"wpo_w"`` or ``"wpo_l"``;
    ``alignment`` as in :func:`wpo_kernels.wpo_weights`; ``beta``: the sigmoid loss's β; AdamW at ``lr``
    with warm-up + cosine over ``steps`` steps of ``batch_size`` pairs (pairs drawn in epochs of a fresh
    permutation from ``seed``)."""

    steps: int
    batch_size: int
    lr: float
    beta: float
    variant: str
    alignment: str = "sampled"
    seed: int = 0


def _wpo_step(
    policy: nn.Module, pairs: CollatedPairs, reference: SequenceStats, idx: list[int], config, device, backend
):
    """The loss of one batch, through :func:`wpo_kernels.fused_linear_wpo_loss` (no ``[B, T, V]`` logits)."""
    batch, labels = pairs.batch(idx, device)
    hidden, head = causal_lm_hidden_and_head(policy, batch)
    t = head.transform
    return fused_linear_wpo_loss(
        hidden[:, :-1],
        head.weight,
        labels,
        reference.chosen_logps[idx].to(device),
        reference.rejected_logps[idx].to(device),
        bias=head.bias,
        temperature=t.temperature,
        softcap=t.softcap,
        logit_scale=t.logit_scale,
        alignment=config.alignment,
        variant=config.variant,
        beta=config.beta,
        backend=backend,
    )


def train_preferences(
    policy: nn.Module,
    pairs: CollatedPairs,
    reference: SequenceStats,
    config: PreferenceConfig,
    *,
    device: str = "cpu",
    backend: str = "auto",
    on_step: Callable[[int, nn.Module], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``policy`` in place on ``pairs`` with AdamW (warm-up + cosine, gradient norm clipped at 1).

    Args:
        policy: a ``transformers`` causal LM (float32), trained in place.
        pairs: the training pairs, collated once (:class:`CollatedPairs`).
        reference: the reference model's statistics on ``pairs`` (its ``*_logps`` are used).
        config: the run's settings (:class:`PreferenceConfig`).
        on_step: called as ``on_step(step, policy)`` after every optimizer step (``step`` from 1).

    Returns:
        One dict per step: ``loss``, ``reward_accuracy``, ``pair_weight`` (the mean applied pair
        weight; 1 for DPO).
    """
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.steps))
    g = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    history = []
    for step in range(1, config.steps + 1):
        if len(order) < config.batch_size:  # epochs of a fresh permutation
            order += torch.randperm(pairs.size, generator=g).tolist()
        idx, order = order[: config.batch_size], order[config.batch_size :]
        out = _wpo_step(policy, pairs, reference, idx, config, device, backend)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        history.append(
            {
                "loss": out.loss.item(),
                "reward_accuracy": out.metrics["rewards/accuracies"].item(),
                "pair_weight": out.metrics["weights/pair_mean"].item() if config.variant != "none" else 1.0,
            }
        )
        if on_step is not None:
            on_step(step, policy)
    policy.eval()
    return history
