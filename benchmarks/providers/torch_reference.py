"""Plain PyTorch with materialised ``[N, V]`` logits: ``log_softmax`` in fp32, the target's entry, and
``log Σ_v p_v² = logsumexp(2 · log p)`` (TRL's ``use_weighting`` formula before its chunked kernel)."""

from __future__ import annotations

import torch
from torch import Tensor

from benchmarks.providers.base import PerToken, Provider, safe_targets
from benchmarks.shapes import Head


class TorchReference(Provider):
    name = "torch"
    label = "torch (materialised)"

    def per_token(
        self, hidden: Tensor, weight: Tensor, targets: Tensor, head: Head, *, masked: bool
    ) -> PerToken:
        logits = hidden @ weight.T
        if head.softcap is not None:
            logits = head.softcap * torch.tanh(logits / head.softcap)
        log_p = logits.float().log_softmax(-1)
        safe, ignored = safe_targets(targets)
        logprobs = log_p.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        if masked:
            logprobs = torch.where(ignored, torch.zeros_like(logprobs), logprobs)
        with torch.no_grad():
            log_sum_sq_probs = torch.logsumexp(2 * log_p, dim=-1)
        return logprobs, log_sum_sq_probs
