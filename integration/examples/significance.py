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


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test: ``p`` of ``wins`` against ``losses`` under ``Binomial(wins + losses, 1/2)``
    (``1`` when both are 0). Ties are left out by the caller.

    Example:
        >>> sign_test(5, 0)  # 0.0625
    """
    if wins < 0 or losses < 0:
        raise ValueError(f"wins and losses must be >= 0, got {wins} and {losses}")
    n = wins + losses
    return min(1.0, 2.0 * _binomial_cdf_half(min(wins, losses), n)) if n else 1.0


def pooled_mcnemar(net_wins: Tensor) -> tuple[float, int, int]:
    """McNemar's exact test pooled over several comparisons scored on the same prompts.

    Args:
        net_wins: ``[N]`` integer: for each prompt, the number of comparisons the first side got right
            and the second wrong, minus the number the second got right and the first wrong.

    Returns:
        ``(p_value, b, c)``: ``b`` prompts with a positive net, ``c`` with a negative one, and the exact
        two-sided sign test of ``b`` against ``c``. The prompt is the unit, so comparisons that share
        prompts (or models) count each prompt once; with one comparison this is :func:`mcnemar_exact`.

    Example:
        >>> pooled_mcnemar(torch.tensor([2, 1, 0, -1]))  # (1.0, 2, 1)
    """
    if net_wins.dim() != 1:
        raise ValueError(f"net_wins must be an [N] vector, got shape {tuple(net_wins.shape)}")
    b, c = int((net_wins > 0).sum()), int((net_wins < 0).sum())
    return sign_test(b, c), b, c


def welch_z(first: tuple[float, float, int], second: tuple[float, float, int]) -> float:
    """Two-sided ``p`` of Welch's z-test (normal approximation) that two means are equal.

    Args:
        first, second: ``(mean, standard deviation, count)`` of each sample (counts in the hundreds or
            more, so that the normal approximation holds).

    Example:
        >>> welch_z((1.0, 0.5, 400), (0.9, 0.5, 400))  # 0.0047
    """
    (m1, s1, n1), (m2, s2, n2) = first, second
    if n1 < 2 or n2 < 2:
        raise ValueError(f"each sample needs at least 2 values, got {n1} and {n2}")
    se = math.sqrt(s1 * s1 / n1 + s2 * s2 / n2)
    if se == 0.0:
        return 1.0 if m1 == m2 else 0.0
    return math.erfc(abs(m1 - m2) / se / math.sqrt(2.0))
