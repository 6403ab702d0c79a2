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
        differentiable; every field is 0 at ignored positions.
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
    stats = {
        "lse": lse,
        "log_max_prob": z.max(dim=-1).values - lse,
        "log_sum_sq_probs": torch.log((p * p).sum(dim=-1)),
        "entropy": -(p * log_p.nan_to_num(neginf=0.0)).sum(dim=-1),
    }
    # ignored positions are not scored: every statistic is 0 there too
    zeroed = {name: torch.where(ignored, 0.0, value).detach() for name, value in stats.items()}
    return LogprobOutput(logprobs=logprobs, **zeroed)


def _reference_token_terms(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    logit_scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """From ``[S, T, V]`` materialised logits: ``log p(y_t)`` (differentiable), ``log max_v p(v)`` and
    ``log Σ_v p(v)²`` (detached), each ``[S, T]``, and the ``[S, T]`` mask of non-ignored tokens."""
    z = transformed_logits(
        hidden, weight, bias, temperature=temperature, softcap=softcap, logit_scale=logit_scale
    )
    p = torch.softmax(z, dim=-1)
    mask = targets != ignore_index
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    log_p_target = torch.log(p.gather(-1, safe.unsqueeze(-1)).squeeze(-1))
    log_max = torch.log(p.max(dim=-1).values).detach()
    log_sum_sq = torch.log((p**2).sum(dim=-1)).detach()
    return log_p_target, log_max, log_sum_sq, mask


def reference_wpo_weights(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    alignment: str = "sampled",
    clamp_max: float | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> Tensor:
    """WPO weights transcribed from the paper (§3.2–3.3), sequence by sequence, on materialised logits.

    ``w(x, y) = exp((1/|y|) Σ_t a_t)`` with ``a_t = log p(y_t)`` (``"none"``),
    ``log p(y_t) - log max_v p(v)`` (``"greedy"``) or ``log p(y_t) - log Σ_v p(v)²`` (``"sampled"``).
    A sequence with no tokens gets 0.

    Args:
        hidden: ``[S, T, H]``. weight: ``[V, H]``. targets: ``[S, T]``.

    Returns:
        ``[S]`` detached, in the inputs' dtype.
    """
    log_p, log_max, log_sum_sq, mask = _reference_token_terms(
        hidden,
        weight,
        targets,
        bias=bias,
        ignore_index=ignore_index,
        temperature=temperature,
        softcap=softcap,
        logit_scale=logit_scale,
    )
    baseline = {"none": torch.zeros_like(log_max), "greedy": log_max, "sampled": log_sum_sq}[
        str(getattr(alignment, "value", alignment))
    ]
    weights = []
    for s in range(targets.shape[0]):
        terms = [log_p[s, t].detach() - baseline[s, t] for t in range(targets.shape[1]) if mask[s, t]]
        w = torch.exp(sum(terms) / len(terms)) if terms else log_p.new_zeros(())
        if clamp_max is not None:
            w = torch.clamp(w, max=clamp_max)
        weights.append(w)
    return torch.stack(weights) if weights else log_p.new_zeros((0,))


def reference_wpo_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None,
    ref_bias: Tensor | None = None,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    ignore_index: int = -100,
    alignment: str = "sampled",
    clamp_max: float | None = None,
    loss_type: str = "sigmoid",
    variant: str = "wpo",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    kto_kl: float = 0.0,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> Tensor:
    """The WPO loss (paper Eq. 1, §4.2–4.3) transcribed pair by pair on materialised logits.

    ``hidden [2B, T, H]`` / ``targets [2B, T]`` hold the chosen sequences then the rejected ones. The
    reference log-probs are given, or computed from ``ref_weight`` on ``ref_hidden`` (default
    ``hidden``). See :func:`wpo_kernels.wpo_loss` for each loss's formula. Differentiable w.r.t. the
    policy ``hidden``, ``weight`` and ``bias`` only.

    Returns:
        0-d loss in the inputs' dtype (0 for an empty batch).
    """
    import torch.nn.functional as F

    transform = dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale)
    log_p, _, _, mask = _reference_token_terms(
        hidden, weight, targets, bias=bias, ignore_index=ignore_index, **transform
    )
    w = reference_wpo_weights(
        hidden,
        weight,
        targets,
        bias=bias,
        ignore_index=ignore_index,
        alignment=alignment,
        clamp_max=clamp_max,
        **transform,
    )
    n_pairs = targets.shape[0] // 2
    logps = torch.stack([log_p[s][mask[s]].sum() for s in range(targets.shape[0])])
    lengths = [max(int(mask[s].sum()), 1) for s in range(targets.shape[0])]
    if ref_chosen_logps is None and ref_weight is not None:
        with torch.no_grad():
            ref_log_p, _, _, _ = _reference_token_terms(
                hidden if ref_hidden is None else ref_hidden,
                ref_weight,
                targets,
                bias=ref_bias,
                ignore_index=ignore_index,
                **transform,
            )
            ref = torch.stack([ref_log_p[s][mask[s]].sum() for s in range(targets.shape[0])])
        ref_chosen_logps, ref_rejected_logps = ref[:n_pairs], ref[n_pairs:]

    eps, gamma = label_smoothing, simpo_gamma
    chosen_w, rejected_w = w[:n_pairs], w[n_pairs:]

    if loss_type == "kto":

        def normalised(ws: Tensor, weighted: bool) -> list[Tensor]:
            return [x / ws.sum() for x in ws] if weighted else [1.0 / n_pairs] * n_pairs

        hat_w = normalised(chosen_w, variant in ("wpo", "wpo_w"))
        hat_l = normalised(rejected_w, variant in ("wpo", "wpo_l"))
        loss = log_p.new_zeros(())
        for i in range(n_pairs):
            r_w = logps[i] - ref_chosen_logps[i]
            r_l = logps[n_pairs + i] - ref_rejected_logps[i]
            loss = loss + 0.5 * hat_w[i] * (1 - torch.sigmoid(beta * (r_w - kto_kl)))
            loss = loss + 0.5 * hat_l[i] * (1 - torch.sigmoid(beta * (kto_kl - r_l)))
        return loss

    total = log_p.new_zeros(())
    for i in range(n_pairs):
        j = n_pairs + i
        omega = {
            "wpo": chosen_w[i] * rejected_w[i],
            "wpo_w": chosen_w[i],
            "wpo_l": rejected_w[i],
            "none": 1.0,
        }[variant]
        if loss_type == "simpo":
            u = beta * (logps[i] / lengths[i] - logps[j] / lengths[j]) - gamma
            ell = -(1 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u)
        else:
            r_w = logps[i] - ref_chosen_logps[i]
            r_l = logps[j] - ref_rejected_logps[i]
            u = beta * (r_w - r_l)
            if loss_type == "sigmoid":
                ell = -(1 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u)
            elif loss_type == "robust":
                ell = (-(1 - eps) * F.logsigmoid(u) + eps * F.logsigmoid(-u)) / (1 - 2 * eps)
            elif loss_type == "hinge":
                ell = torch.relu(1 - u)
            elif loss_type == "ipo":
                ell = (r_w / lengths[i] - r_l / lengths[j] - 1 / (2 * beta)) ** 2
            else:
                raise ValueError(f"unknown loss_type {loss_type!r}")
        total = total + omega * ell
    return total / n_pairs if n_pairs else total
