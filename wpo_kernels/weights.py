"""WPO's per-sequence weights (paper §3.2–3.3): how likely the policy is to have produced each output.

Input: per-token statistics from :func:`wpo_kernels.fused_linear_logprobs` (never logits).
Output: one detached weight per sequence.
"""

from __future__ import annotations

import math
import warnings
from enum import Enum

import torch
from torch import Tensor


class Alignment(str, Enum):
    """How each token's log-probability is aligned before averaging (paper §3.3).

    - ``NONE``: ``log p(y_t)``, the plain length-normalised probability;
    - ``GREEDY``: ``log p(y_t) - log max_v p(v)`` (a greedy decoder's output gets weight 1);
    - ``SAMPLED``: ``log p(y_t) - log Σ_v p(v)²`` (Eq. 2; ``Σ_v p(v)²`` is the expected probability of
      a token sampled at temperature 1, so a sampled output gets weight ≈ 1). The paper's default.

    Strings ``"none"``, ``"greedy"`` and ``"sampled"`` are accepted wherever an ``Alignment`` is.
    """

    NONE = "none"
    GREEDY = "greedy"
    SAMPLED = "sampled"


def parse_alignment(alignment: Alignment | str) -> Alignment:
    """``Alignment`` from an enum member or its string name; ``ValueError`` naming the choices otherwise."""
    if isinstance(alignment, Alignment):
        return alignment
    if isinstance(alignment, str):
        try:
            return Alignment(alignment.lower())
        except ValueError:
            pass
    choices = [a.value for a in Alignment]
    raise ValueError(f"alignment must be one of {choices} (or an Alignment), got {alignment!r}")


def _check_token_tensor(name: str, t: object, shape: tuple[int, ...] | None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if shape is None:
        if t.dim() != 2:
            raise ValueError(f"{name} must have shape [B, T], got shape {tuple(t.shape)}")
    elif tuple(t.shape) != shape:
        raise ValueError(f"{name} must have the shape of logprobs {shape}, got {tuple(t.shape)}")


def wpo_weights(
    logprobs: Tensor,
    log_max_prob: Tensor | None,
    log_sum_sq_probs: Tensor | None,
    mask: Tensor,
    alignment: Alignment | str = "sampled",
    *,
    clamp_max: float | None = None,
) -> Tensor:
    """Per-sequence WPO weights ``w = exp(mean_t a_t)`` over the non-ignored tokens, detached.

    ``a_t`` is ``log p(y_t)`` aligned as :class:`Alignment` says: ``NONE`` uses it as is, ``GREEDY``
    subtracts ``log max_v p(v)``, ``SAMPLED`` (default, Eq. 2) subtracts ``log Σ_v p(v)²``.

    Args:
        logprobs: ``[B, T]`` float, ``log p(y_t)`` (``LogprobOutput.logprobs``); any gradient is cut.
        log_max_prob: ``[B, T]``, ``log max_v p(v)``; required for ``"greedy"`` only, else may be None.
        log_sum_sq_probs: ``[B, T]``, ``log Σ_v p(v)²``; required for ``"sampled"`` only, else may be None.
        mask: ``[B, T]`` bool (or 0/1 integer; other values raise), True at the tokens of the output
            being weighted; on the device of ``logprobs``.
        alignment: an :class:`Alignment` or ``"none"`` / ``"greedy"`` / ``"sampled"``.
        clamp_max: if set, each sequence's weight is clamped to at most this. Aligned weights can exceed 1
            (a token the policy finds likelier than its typical sampled token), which scales that pair's
            gradient up like a larger learning rate. TRL before 1.0 clamped the *pair* weight
            ``w_w·w_l`` at 1 for that reason; TRL 1.16 does not clamp. Default None (the paper's
            definition, and TRL 1.16's); ``clamp_max=1.0`` bounds every pair weight by 1 too.

    Returns:
        ``[B]`` float32 (float64 for float64 inputs), detached, in ``[0, inf)``. A sequence with no
        tokens gets weight 0 (with a ``RuntimeWarning``, shown once per call site, for CPU tensors in
        eager mode; on other devices and under ``torch.compile`` the check would sync, so none); a ``-inf``
        log-probability gives weight 0; never NaN.

    Example:
        >>> w = wpo_weights(out.logprobs, None, out.log_sum_sq_probs, labels != -100, "sampled")
    """
    align = parse_alignment(alignment)
    _check_token_tensor("logprobs", logprobs, None)
    shape = tuple(logprobs.shape)
    if not logprobs.dtype.is_floating_point:
        raise TypeError(f"logprobs must be a floating-point tensor, got {logprobs.dtype}")
    _check_token_tensor("mask", mask, shape)
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"mask must be a bool (or 0/1 integer) tensor, got {mask.dtype}")
    if mask.device != logprobs.device:
        raise ValueError(f"mask must be on the device of logprobs ({logprobs.device}), got {mask.device}")
    needed = {
        Alignment.GREEDY: ("log_max_prob", log_max_prob),
        Alignment.SAMPLED: ("log_sum_sq_probs", log_sum_sq_probs),
    }
    if align in needed:
        name, stat = needed[align]
        if stat is None:
            raise ValueError(f"{name} is required for alignment={align.value!r}, got None")
        _check_token_tensor(name, stat, shape)
        if stat.device != logprobs.device:
            raise ValueError(
                f"{name} must be on the device of logprobs ({logprobs.device}), got {stat.device}"
            )
    if clamp_max is not None and (
        not isinstance(clamp_max, (int, float)) or math.isnan(clamp_max) or clamp_max <= 0
    ):
        raise ValueError(f"clamp_max must be a number > 0 or None, got {clamp_max!r}")

    dtype = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        aligned = logprobs.detach().to(dtype)
        if align in needed:
            aligned = aligned - needed[align][1].detach().to(dtype)
        keep = mask.bool()
        # where, not multiply: a -inf at an ignored position must not become NaN.
        total = torch.where(keep, aligned, torch.zeros_like(aligned)).sum(dim=-1)
        count = keep.sum(dim=-1)
        empty = count == 0
        if keep.device.type == "cpu" and not torch.compiler.is_compiling():
            # a 0/1 integer mask, not labels passed by mistake (-100 would count as a token); reading the
            # mask here costs no device sync and breaks no compiled graph
            binary = mask.dtype == torch.bool
            not_binary = empty.new_zeros(()) if binary else ((mask != 0) & (mask != 1)).any()
            any_empty, any_not_binary = torch.stack([empty.any(), not_binary]).tolist()
            if any_not_binary:
                found = mask[(mask != 0) & (mask != 1)][0].item()
                raise ValueError(f"mask must be bool or hold only 0 and 1, found {found}")
        else:
            # on a device or under torch.compile: checked there, asynchronously; no warning
            if mask.dtype != torch.bool:
                torch._assert_async(((mask == 0) | (mask == 1)).all(), "mask must hold only 0 and 1")
            any_empty = False
        if any_empty:
            warnings.warn(
                "wpo_weights: a sequence has no tokens in mask; its weight is set to 0",
                RuntimeWarning,
                stacklevel=2,
            )
        weights = torch.exp(total / count.clamp(min=1).to(dtype))
        weights = torch.where(empty, torch.zeros_like(weights), weights)
        if clamp_max is not None:
            weights = weights.clamp(max=clamp_max)
    return weights
