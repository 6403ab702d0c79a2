"""Plain-PyTorch oracle: materialises the full ``[N, V]`` logits and computes every statistic directly.

Written to be obviously correct, not fast. Every test compares against it (usually in float64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from wpo_kernels.types import LogprobOutput


def transformed_logits(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> Tensor:
    """``z = transform(hidden @ weight.T + bias)`` as one ``[N, V]`` tensor.

    The transform is: multiply by ``logit_scale``, then ``softcap * tanh(. / softcap)`` if ``softcap`` is
    set, then divide by ``temperature``. Computed in the inputs' dtype.
    """
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature


def reference_linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> LogprobOutput:
    """Every per-token statistic of :func:`wpo_kernels.fused_linear_logprobs`, from materialised logits.

    Args:
        hidden: ``[N, H]``. weight: ``[V, H]``. targets: ``[N]`` integer. bias: ``[V]`` or None.

    Returns:
        :class:`LogprobOutput` with all five fields, ``[N]`` in the inputs' dtype. ``logprobs`` is
        differentiable; ignored positions have ``logprobs == 0``.
    """
    z = transformed_logits(
        hidden, weight, bias, temperature=temperature, softcap=softcap, logit_scale=logit_scale
    )
    log_p = torch.log_softmax(z, dim=-1)
    lse = torch.logsumexp(z, dim=-1)
    ignored = targets == ignore_index
    safe_targets = torch.where(ignored, torch.zeros_like(targets), targets)
    logprobs = log_p.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    logprobs = torch.where(ignored, torch.zeros_like(logprobs), logprobs)
    p = log_p.exp()
    return LogprobOutput(
        logprobs=logprobs,
        lse=lse.detach(),
        log_max_prob=(z.max(dim=-1).values - lse).detach(),
        log_sum_sq_probs=torch.log((p * p).sum(dim=-1)).detach(),
        entropy=-(p * log_p.nan_to_num(neginf=0.0)).sum(dim=-1).detach(),
    )
