"""Preference losses with WPO weighting (paper Eq. 1, §4.2–4.3), on per-sequence log-probabilities.

Input: summed per-sequence log-probabilities and the detached weights of :func:`wpo_kernels.wpo_weights`.
Output: the loss and the metrics a trainer logs. Nothing here sees logits or tokens.

Notation: ``r_w = log π(y_w) - log π_ref(y_w)``, ``r_l`` likewise, ``Δ = r_w - r_l``, ``ε`` the label
smoothing, ``σ`` the logistic function. Each paired loss ``ℓ`` is multiplied by its pair weight and
averaged over pairs: ``L = mean_i[ω_i · ℓ_i]`` with ``ω = w_w·w_l`` (``"wpo"``), ``w_w`` (``"wpo_w"``),
``w_l`` (``"wpo_l"``) or 1 (``"none"``, the unweighted loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

#: Loss types accepted by :func:`wpo_loss`; all but ``"kto"`` are paired.
LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge", "simpo", "robust", "kto")
#: Weighting variants (paper §4.3).
VARIANTS: tuple[str, ...] = ("wpo", "wpo_w", "wpo_l", "none")
#: Loss types that need a reference model's log-probabilities.
_NEEDS_REF = {"sigmoid", "ipo", "hinge", "robust", "kto"}
#: Loss types that need the completions' token counts.
_NEEDS_LENGTHS = {"ipo", "simpo"}
#: Label-smoothing range accepted per loss type (closed interval unless noted); others take none.
_SMOOTHING = {"sigmoid": (0.0, 0.5, True), "simpo": (0.0, 0.5, True), "robust": (0.0, 0.5, False)}


@dataclass
class WPOLossOutput:
    """What :func:`wpo_loss` returns.

    - ``loss``: 0-d, differentiable w.r.t. the policy log-probabilities;
    - ``metrics``: detached 0-d tensors by name (``rewards/chosen``, ``rewards/rejected``,
      ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``,
      ``weights/{chosen,rejected,pair}_{mean,min,max}``; ``kl`` for KTO). Call ``.item()`` when logging.
    """

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


# --- the per-pair losses, each a function of the score difference h (Δ, or its length-normalised form) ---


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """Conservative DPO (cDPO): ``-(1-ε) log σ(z) - ε log σ(-z)``; at ``ε = 0`` the second term is left
    out, not multiplied by 0 (at ``z = +∞`` it is ``0 · ∞``, a NaN)."""
    loss = -(1 - eps) * F.logsigmoid(z)
    return loss - eps * F.logsigmoid(-z) if eps else loss


def _sigmoid_loss(h: Tensor, beta: float, eps: float, gamma: float) -> Tensor:
    return _smoothed_logistic(beta * h, eps)


def _simpo_loss(h: Tensor, beta: float, eps: float, gamma: float) -> Tensor:
    return _smoothed_logistic(beta * h - gamma, eps)


def _robust_loss(h: Tensor, beta: float, eps: float, gamma: float) -> Tensor:
    """rDPO: an unbiased estimate of the clean DPO loss under label-flip rate ε (the ε term left out at
    ``ε = 0``, as in :func:`_smoothed_logistic`)."""
    loss = -(1 - eps) * F.logsigmoid(beta * h)
    return (loss + eps * F.logsigmoid(-beta * h) if eps else loss) / (1 - 2 * eps)


def _hinge_loss(h: Tensor, beta: float, eps: float, gamma: float) -> Tensor:
    return torch.relu(1 - beta * h)


def _ipo_loss(h: Tensor, beta: float, eps: float, gamma: float) -> Tensor:
    """IPO (Eq. 17 of arXiv 2310.12036), β playing the role of τ."""
    return (h - 1 / (2 * beta)) ** 2


_PAIRED: dict[str, Callable[[Tensor, float, float, float], Tensor]] = {
    "sigmoid": _sigmoid_loss,
    "simpo": _simpo_loss,
    "robust": _robust_loss,
    "hinge": _hinge_loss,
    "ipo": _ipo_loss,
}


# --- validation, once, at the entry ---


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _check_finite(name: str, value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_vector(
    name: str, t: object, batch: int | None, *, floating: bool = True, device: torch.device | None = None
) -> int:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B], got {type(t).__name__}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on the device of policy_chosen_logps ({device}), got {t.device}")
    if t.dim() != 1:
        raise ValueError(f"{name} must have shape [B], got shape {tuple(t.shape)}")
    if floating and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not floating and (t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"{name} must be a real tensor of token counts, got {t.dtype}")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(
            f"{name} must have the batch size of policy_chosen_logps (B={batch}), got B={t.shape[0]}"
        )
    return t.shape[0]


def _check_weights(chosen_weight: Tensor, rejected_weight: Tensor) -> None:
    """WPO weights are ``exp(·) >= 0``; a negative or NaN one (log-weights passed by mistake, say) would
    turn its pair's term into gradient ascent or a NaN loss, so it is refused: at once for CPU tensors in
    eager mode, asynchronously (no host sync) on a device or under ``torch.compile``."""
    named = (("chosen_weight", chosen_weight), ("rejected_weight", rejected_weight))
    if chosen_weight.device.type != "cpu" or torch.compiler.is_compiling():
        for name, w in named:
            torch._assert_async(((w >= 0) & ~w.isnan()).all(), f"{name} must be >= 0 (WPO weights)")
        return
    bad = torch.stack([((w < 0) | w.isnan()).any() for _, w in named]).tolist()
    for (name, w), is_bad in zip(named, bad, strict=True):
        if is_bad:
            value = w[(w < 0) | w.isnan()][0].item()
            raise ValueError(
                f"{name} must be >= 0 (WPO weights are exp(mean aligned log-prob), as wpo_weights returns "
                f"them, not log-weights), found {value}"
            )


def _kl_baseline(kto_kl: Tensor | float | None, like: Tensor) -> Tensor:
    if kto_kl is None:
        return like.new_zeros(())
    if isinstance(kto_kl, Tensor):
        if kto_kl.numel() != 1:
            raise ValueError(f"kto_kl must be a scalar (0-d or one element), got shape {tuple(kto_kl.shape)}")
        return kto_kl.detach().reshape(()).to(like)
    return like.new_tensor(_check_finite("kto_kl", kto_kl))


# --- reductions that are 0, never NaN, on an empty batch ---


def _mean(x: Tensor) -> Tensor:
    return x.mean() if x.numel() else x.new_zeros(())


def _min(x: Tensor) -> Tensor:
    return x.min() if x.numel() else x.new_zeros(())


def _max(x: Tensor) -> Tensor:
    return x.max() if x.numel() else x.new_zeros(())


def _weight_metrics(prefix: str, w: Tensor) -> dict[str, Tensor]:
    name = f"weights/{prefix}"
    return {f"{name}_mean": _mean(w), f"{name}_min": _min(w), f"{name}_max": _max(w)}


def pair_weight(chosen_weight: Tensor, rejected_weight: Tensor, variant: str) -> Tensor:
    """``ω`` per pair: ``w_w·w_l`` (``"wpo"``), ``w_w`` (``"wpo_w"``), ``w_l`` (``"wpo_l"``) or 1."""
    if variant == "wpo":
        return chosen_weight * rejected_weight
    if variant == "wpo_w":
        return chosen_weight
    if variant == "wpo_l":
        return rejected_weight
    return torch.ones_like(chosen_weight)


def _normalised(w: Tensor, use: bool) -> Tensor:
    """Weights that sum to 1 over the batch (``w / Σw``), or uniform ``1/B`` if ``use`` is False."""
    if not use:
        return torch.full_like(w, 1.0 / max(w.shape[0], 1))
    total = w.sum()
    return torch.where(total > 0, w / total.clamp(min=torch.finfo(w.dtype).tiny), torch.zeros_like(w))


def check_loss_options(
    loss_type: str,
    variant: str,
    beta: float,
    label_smoothing: float,
    simpo_gamma: float,
    kto_kl: Tensor | float | None = None,
) -> tuple[str, str, float, float, float]:
    """Validate :func:`wpo_loss`'s scalar options (``ValueError`` naming the argument); returns
    ``(loss_type, variant, beta, label_smoothing, simpo_gamma)`` as plain Python values.

    Example:
        >>> check_loss_options("sigmoid", "wpo", 0.1, 0.0, 0.5)
    """
    loss_type = _check_choice("loss_type", loss_type, LOSS_TYPES)
    variant = _check_choice("variant", variant, VARIANTS)
    beta = _check_finite("beta", beta, positive=True)
    eps = _check_finite("label_smoothing", label_smoothing)
    gamma = _check_finite("simpo_gamma", simpo_gamma)
    if loss_type in _SMOOTHING:
        lo, hi, closed = _SMOOTHING[loss_type]
        if not (lo <= eps <= hi if closed else lo <= eps < hi):
            raise ValueError(
                f"label_smoothing must lie in [{lo}, {hi}{']' if closed else ')'} for loss_type="
                f"{loss_type!r}, got {eps}"
            )
    elif eps != 0.0:
        raise ValueError(f"label_smoothing must be 0 for loss_type={loss_type!r} (it has none), got {eps}")
    if kto_kl is not None and loss_type != "kto":
        raise ValueError(f"kto_kl is only used by loss_type='kto', got kto_kl={kto_kl!r} with {loss_type!r}")

    return loss_type, variant, beta, eps, gamma


def wpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    chosen_weight: Tensor,
    rejected_weight: Tensor,
    *,
    loss_type: str = "sigmoid",
    variant: str = "wpo",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    kto_kl: Tensor | float | None = None,
    metrics: bool = True,
) -> WPOLossOutput:
    """A preference loss weighted per pair (or per output, for KTO) by WPO weights.

    Paired losses, ``ℓ_i`` per pair and ``L = mean_i[ω_i ℓ_i]`` (ω: see ``variant``):

    - ``"sigmoid"`` (DPO; cDPO when ``ε > 0``): ``-(1-ε) log σ(βΔ) - ε log σ(-βΔ)``;
    - ``"ipo"``: ``(Δ̄ - 1/(2β))²`` with the length-normalised ``Δ̄ = r_w/|y_w| - r_l/|y_l|``, as TRL
      1.16's ``DPOTrainer`` computes it; pass lengths of ones for the summed form of the IPO paper;
    - ``"hinge"`` (SLiC): ``relu(1 - βΔ)``;
    - ``"simpo"`` (reference-free): ``-(1-ε) log σ(βs - γ) - ε log σ(γ - βs)`` with
      ``s = log π(y_w)/|y_w| - log π(y_l)/|y_l|``, γ = ``simpo_gamma`` (TRL's CPO trainer form);
    - ``"robust"`` (rDPO): ``[-(1-ε) log σ(βΔ) + ε log σ(-βΔ)] / (1-2ε)``, ``0 ≤ ε < 0.5``.

    Unpaired ``"kto"`` (paper §4.2): each output is weighted by its own weight, normalised so the
    chosen weights sum to 1 and the rejected weights sum to 1 over the batch (``ŵ = w / Σw``; uniform
    ``1/B`` for an output ``variant`` leaves unweighted), and
    ``L = ½[Σ ŵ_w (1 - σ(β(r_w - z))) + Σ ŵ_l (1 - σ(β(z - r_l)))]``, ``z`` the KL baseline. With
    ``variant="none"`` this is TRL's KTO loss (``desirable_weight = undesirable_weight = 1``). The
    baseline ``z = kto_kl`` is a detached scalar computed by the caller: TRL estimates it as
    ``clamp(mean_j[log π(y'_j|x_j) - log π_ref(y'_j|x_j)], min=0)`` over *mismatched* pairs (each prompt
    with another example's completion, cycled by one), gathered across ranks. Default 0 (no baseline).
    A side whose weights are all 0 contributes 0.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` float, ``Σ_t log π(y_t)`` per sequence; the
            loss is differentiable w.r.t. these only.
        ref_chosen_logps, ref_rejected_logps: ``[B]``, the same under the reference model (detached
            here); required except for ``"simpo"``, which ignores them.
        chosen_weight, rejected_weight: ``[B]`` WPO weights (:func:`wpo_weights`), ``>= 0``: a negative
            or NaN weight raises ``ValueError`` (checked with one host sync); detached here.
        loss_type: one of :data:`LOSS_TYPES`.
        variant: ``"wpo"`` (``ω = w_w·w_l``), ``"wpo_w"`` (``w_w``), ``"wpo_l"`` (``w_l``) or
            ``"none"`` (``ω = 1``: plain DPO / IPO / ...; for KTO, uniform weights).
        beta: β > 0. label_smoothing: ε, for sigmoid / simpo (``[0, 0.5]``) and robust (``[0, 0.5)``).
        simpo_gamma: SimPO's target margin γ (on the ``β``-scaled score).
        chosen_lengths, rejected_lengths: ``[B]`` token counts (clamped to ≥ 1), required for ipo/simpo.
        kto_kl: KTO's KL baseline, a float or one-element tensor (detached); KTO only.
        metrics: False to skip the metrics (an empty dict), e.g. for a loss only differentiated.

    Returns:
        :class:`WPOLossOutput`. An empty batch (``B = 0``) gives ``loss = 0`` (still connected to the
        inputs, so ``backward()`` works) and zero metrics.

    Example:
        >>> out = wpo_loss(pc, pr, rc, rr, wc, wr, loss_type="sigmoid", variant="wpo", beta=0.1)
    """
    loss_type, variant, beta, eps, gamma = check_loss_options(
        loss_type, variant, beta, label_smoothing, simpo_gamma, kto_kl
    )
    batch = _check_vector("policy_chosen_logps", policy_chosen_logps, None)
    device = policy_chosen_logps.device
    _check_vector("policy_rejected_logps", policy_rejected_logps, batch, device=device)
    _check_vector("chosen_weight", chosen_weight, batch, device=device)
    _check_vector("rejected_weight", rejected_weight, batch, device=device)
    _check_weights(chosen_weight, rejected_weight)
    if loss_type in _NEEDS_REF:
        for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
            if t is None:
                raise ValueError(
                    f"{name} is required for loss_type={loss_type!r} (only simpo is reference-free), got None"
                )
            _check_vector(name, t, batch, device=device)
    if loss_type in _NEEDS_LENGTHS:
        for name, t in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
            if t is None:
                raise ValueError(
                    f"{name} ([B] token counts) is required for loss_type={loss_type!r}, got None"
                )
            _check_vector(name, t, batch, floating=False, device=device)

    dtype = policy_chosen_logps.dtype
    pi_w, pi_l = policy_chosen_logps, policy_rejected_logps.to(dtype)
    w_w, w_l = chosen_weight.detach().to(dtype), rejected_weight.detach().to(dtype)
    if loss_type in _NEEDS_LENGTHS:
        len_w = chosen_lengths.detach().to(dtype).clamp(min=1)
        len_l = rejected_lengths.detach().to(dtype).clamp(min=1)

    if loss_type == "simpo":
        score_w, score_l = pi_w / len_w, pi_l / len_l
    else:
        score_w = pi_w - ref_chosen_logps.detach().to(dtype)
        score_l = pi_l - ref_rejected_logps.detach().to(dtype)
    logged: dict[str, Tensor] = {}

    if loss_type == "kto":
        kl = _kl_baseline(kto_kl, pi_w)
        chosen_losses = 1 - torch.sigmoid(beta * (score_w - kl))
        rejected_losses = 1 - torch.sigmoid(beta * (kl - score_l))
        hat_w = _normalised(w_w, variant in ("wpo", "wpo_w"))
        hat_l = _normalised(w_l, variant in ("wpo", "wpo_l"))
        loss = 0.5 * ((hat_w * chosen_losses).sum() + (hat_l * rejected_losses).sum())
        logged["kl"] = kl
    else:
        h = score_w / len_w - score_l / len_l if loss_type == "ipo" else score_w - score_l
        omega = pair_weight(w_w, w_l, variant)
        # a pair of weight 0 adds nothing, even when its log-probs are -inf (0 · inf would be NaN)
        h = torch.where(omega > 0, h, torch.zeros_like(h))
        per_pair = _PAIRED[loss_type](h, beta, eps, gamma)
        loss = (omega * per_pair).mean() if batch else per_pair.sum()  # sum of nothing: a connected 0
    if not metrics:
        return WPOLossOutput(loss=loss)

    with torch.no_grad():
        if loss_type != "kto":
            logged.update(_weight_metrics("pair", omega))
        rewards_w, rewards_l = beta * score_w.detach(), beta * score_l.detach()
        logged.update(
            {
                "rewards/chosen": _mean(rewards_w),
                "rewards/rejected": _mean(rewards_l),
                "rewards/margins": _mean(rewards_w - rewards_l),
                "rewards/accuracies": _mean((rewards_w > rewards_l).to(dtype)),
                "logps/chosen": _mean(pi_w.detach()),
                "logps/rejected": _mean(pi_l.detach()),
                **_weight_metrics("chosen", w_w),
                **_weight_metrics("rejected", w_l),
            }
        )
    return WPOLossOutput(loss=loss, metrics={k: v.detach() for k, v in logged.items()})
