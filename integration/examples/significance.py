"""The study's statistics: a binomial confidence interval for an accuracy and McNemar's exact test for two
models scored on the same prompts. Plain Python (no SciPy)."""

from __future__ import annotations

import math

from torch import Tensor


def wilson_interval(successes: int, total: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` of a binomial proportion (95% for the default ``z``).

    Example:
        >>> wilson_interval(50, 100)  # (0.4038..., 0.5961...)
    """
    if total <= 0:
        raise ValueError(f"total must be positive, got {total}")
    if not 0 <= successes <= total:
        raise ValueError(f"successes must lie in [0, total={total}], got {successes}")
    p = successes / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == total else min(1.0, centre + half)
    return low, high


def _binomial_cdf_half(k: int, n: int) -> float:
    """``P(X <= k)`` for ``X ~ Binomial(n, 1/2)``, summed in log space (exact enough for any ``n``)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    logs = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
        for i in range(k + 1)
    ]
    top = max(logs)
    return math.exp(top) * sum(math.exp(v - top) for v in logs)


def mcnemar_exact(first_correct: Tensor, second_correct: Tensor) -> tuple[float, int, int]:
    """McNemar's exact two-sided test of two models scored on the same prompts.

    Args:
        first_correct, second_correct: ``[N]`` bool, whether each model answered prompt ``i`` correctly.

    Returns:
        ``(p_value, b, c)``: ``b`` prompts only the first model got right, ``c`` only the second; under
        the null hypothesis (equal accuracy) ``b ~ Binomial(b + c, 1/2)``. ``p = 1`` when ``b + c = 0``.

    Example:
        >>> mcnemar_exact(torch.tensor([True, True]), torch.tensor([False, True]))  # (1.0, 1, 0)
    """
    if first_correct.shape != second_correct.shape or first_correct.dim() != 1:
        raise ValueError(
            "first_correct and second_correct must be [N] vectors of the same length, got "
            f"{tuple(first_correct.shape)} and {tuple(second_correct.shape)}"
        )
    b = int((first_correct & ~second_correct).sum())
    c = int((~first_correct & second_correct).sum())
    p = min(1.0, 2.0 * _binomial_cdf_half(min(b, c), b + c)) if b + c else 1.0
    return p, b, c
