"""The claims ``wpo-study`` tests, fixed here before any run, and how each is counted across seed pairs
(:data:`COUNTING`, which the report quotes)."""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from wpo_kernels.integration.examples.significance import pooled_mcnemar, sign_test, welch_z

#: Significance level of every test in the study.
ALPHA = 0.05
#: How a claim is counted, in the report's words (Markdown).
COUNTING = f"""\
Accuracy claims compare two runs of the same SFT model on the same evaluation prompts (first > second).
In one seed pair a claim *held* when, summed over its comparisons (both models of the pair; both data
sources where the claim names none), the first side answered more evaluation prompts correctly than the
second; it was *significant* when it held and McNemar's exact test pooled per prompt over those
comparisons (each prompt's net wins, first minus second, as one sign; a prompt counts once however many
comparisons share it) gives p < {ALPHA}. *Pooled p*: the same test over every comparison of every seed
pair. *Sign test over pairs*: exact two-sided sign test of the pairs where the claim held against those
where the opposite held; it treats the seed pair as the unit, so with n pairs its p is at least 2^(1-n).

Weight claims compare the mean WPO pair weight (sampled alignment, under each SFT start, before training)
of two data sources; a seed pair's test (and the pooled one) is Welch's z-test on the pair weights of its
models.

Verdict: **holds** when a claim held in every seed pair and its pooled p < {ALPHA}; **reversed** when the
opposite held in every seed pair and the pooled p < {ALPHA}; otherwise **not shown**."""
#: The pooled accuracy test and the weight test, as the report names them.
MCNEMAR = "McNemar exact, pooled per prompt"
WELCH = "Welch z on pair weights"


@dataclass(frozen=True)
class Claim:
    """One claim: ``first`` beats ``second``.

    Accuracy claims: sides are ``(method, data)`` runs of the same SFT model, ``data`` one of ``"own"``
    (its own samples, on-policy), ``"other"`` (the other model's, off-policy), ``"any"`` (both, one
    comparison each) or ``"-"`` (no preference data: the SFT start, continued SFT). Weight claims
    (``kind="weight"``): sides are data sources, ``"own"``, ``"other"`` or ``"scripted"``.
    ``paper``: what the WPO paper says about it.
    """

    key: str
    text: str
    paper: str
    first: tuple[str, str] | str
    second: tuple[str, str] | str
    kind: str = "accuracy"


#: The claims, in the report's order.
CLAIMS: tuple[Claim, ...] = (
    Claim("wpo_vs_dpo_off", "WPO beats DPO on off-policy pairs", "yes, its main result (§4.1)",
          ("WPO", "other"), ("DPO", "other")),
    Claim("wpo_vs_dpo_on", "WPO beats DPO on on-policy pairs", "yes (§4.1, on-policy and hybrid)",
          ("WPO", "own"), ("DPO", "own")),
    Claim("sampled_vs_greedy", "sampled alignment beats greedy alignment (WPO, off-policy)",
          "yes (§3.3 ablation)", ("WPO", "other"), ("WPO (greedy)", "other")),
    Claim("greedy_vs_none", "greedy alignment beats no alignment (WPO, off-policy)", "yes (§3.3 ablation)",
          ("WPO (greedy)", "other"), ("WPO (none)", "other")),
    Claim("on_vs_off_dpo", "on-policy pairs beat off-policy pairs for DPO", "yes (§4.1)",
          ("DPO", "own"), ("DPO", "other")),
    Claim("on_vs_off_wpo", "on-policy pairs beat off-policy pairs for WPO", "yes (§4.1)",
          ("WPO", "own"), ("WPO", "other")),
    Claim("wpo_vs_wpo_w", "WPO beats WPO-W (chosen weight only; off-policy)", "yes (§4.3)",
          ("WPO", "other"), ("WPO-W", "other")),
    Claim("wpo_vs_wpo_l", "WPO beats WPO-L (rejected weight only; off-policy)",
          "yes, narrowly: WPO-L recovers most of the gain (§4.3)", ("WPO", "other"), ("WPO-L", "other")),
    Claim("weight_own_vs_other", "on-policy pairs weigh more than off-policy pairs",
          "yes, the mechanism (§3)", "own", "other", "weight"),
    Claim("weight_other_vs_scripted", "off-policy model samples weigh more than scripted pairs",
          "implied: weight tracks how likely the policy is to produce a pair (§3)", "other", "scripted",
          "weight"),
    Claim("wpo_vs_sft", "WPO improves on its SFT start", "yes (§4.1, over the SFT model)",
          ("WPO", "any"), ("SFT", "-")),
    Claim("wpo_vs_continued_sft", "WPO beats continued SFT for the same number of steps",
          "not tested by the paper (our control)", ("WPO", "any"), ("continued SFT", "-")),
)  # fmt: skip


def pack_bits(correct: Tensor) -> str:
    """``[N]`` bool as base64 of its packed bits (most significant bit first)."""
    bits = correct.to(torch.uint8).tolist() + [0] * (-len(correct) % 8)
    data = bytes(int("".join(map(str, bits[i : i + 8])), 2) for i in range(0, len(bits), 8))
    return base64.b64encode(data).decode("ascii")


def unpack_bits(text: str, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: ``[n]`` bool."""
    bits = [(byte >> (7 - i)) & 1 for byte in base64.b64decode(text) for i in range(8)]
    return torch.tensor(bits[:n], dtype=torch.bool)


def _matches(row: Mapping[str, Any], model: str, side: tuple[str, str], data: str, lr: float) -> bool:
    method, _ = side
    if row["model"] != model or row["method"] != method or row.get("role", "design") != "design":
        return False
    if data == "-":
        return row["data"] == "-"
    return row["on_policy"] == (data == "own") and row["lr"] == lr


def comparisons(
    claim: Claim, rows: Sequence[Mapping[str, Any]], pair: int, lr: float
) -> list[tuple[int, int]]:
    """``(first, second)`` row indices of ``claim``'s comparisons in seed pair ``pair`` at ``lr``."""
    out = []
    in_pair = [(i, r) for i, r in enumerate(rows) if r["pair"] == pair]
    for model in dict.fromkeys(r["model"] for _, r in in_pair):
        datas = ("own", "other") if claim.first[1] == "any" else (claim.first[1],)
        for data in datas:
            first = [i for i, r in in_pair if _matches(r, model, claim.first, data, lr)]
            second_data = data if claim.second[1] == "any" else claim.second[1]
            second = [i for i, r in in_pair if _matches(r, model, claim.second, second_data, lr)]
            if len(first) != 1 or len(second) != 1:
                raise ValueError(
                    f"claim {claim.key!r}: pair {pair}, model {model}, data {data}: no unique runs"
                )
            out.append((first[0], second[0]))
    return out


def _accuracy_claim(claim: Claim, rows, correct: Sequence[Tensor], pairs: Sequence[int], lr: float) -> dict:
    per_pair, nets, diffs = [], [], []
    for pair in pairs:
        comps = comparisons(claim, rows, pair, lr)
        net = sum(correct[i].int() - correct[j].int() for i, j in comps)
        p, b, c = pooled_mcnemar(net)
        diff = [rows[i]["accuracy"] - rows[j]["accuracy"] for i, j in comps]
        gain = int(net.sum())
        per_pair.append({"pair": pair, "net_prompts": gain, "effect_pp": 100 * sum(diff) / len(diff),
                         "p": p, "held": gain > 0, "significant": gain > 0 and p < ALPHA,
                         "opposite": gain < 0})  # fmt: skip
        nets.append(net)
        diffs += diff
    p, b, c = pooled_mcnemar(sum(nets))
    return {"per_pair": per_pair, "p": p, "effect_pp": 100 * sum(diffs) / len(diffs), "test": MCNEMAR,
            "comparisons": len(diffs)}  # fmt: skip


def _moments(weights: Sequence[Mapping[str, Any]]) -> tuple[float, float, int]:
    """Mean, standard deviation and count of the union of several weight samples."""
    n = sum(w["pairs"] for w in weights)
    mean = sum(w["pair_weight"] * w["pairs"] for w in weights) / n
    second = sum((w["pair_weight_sd"] ** 2 + w["pair_weight"] ** 2) * w["pairs"] for w in weights) / n
    return mean, math.sqrt(max(0.0, second - mean * mean) * n / max(1, n - 1)), n


def _weight_claim(claim: Claim, weights: Sequence[Mapping[str, Any]], pairs: Sequence[int]) -> dict:
    per_pair = []
    side = lambda ws, kind: [w for w in ws if w["kind"] == kind]  # noqa: E731
    for pair in pairs:
        ws = [w for w in weights if w["pair"] == pair]
        first, second = _moments(side(ws, claim.first)), _moments(side(ws, claim.second))
        p, diff = welch_z(first, second), first[0] - second[0]
        per_pair.append({"pair": pair, "effect": diff, "p": p, "held": diff > 0,
                         "significant": diff > 0 and p < ALPHA, "opposite": diff < 0})  # fmt: skip
    first, second = _moments(side(weights, claim.first)), _moments(side(weights, claim.second))
    return {"per_pair": per_pair, "p": welch_z(first, second), "effect": first[0] - second[0], "test": WELCH}


def verdict(held: int, opposite: int, of: int, p: float) -> str:
    """``holds``, ``reversed`` or ``not shown`` (see the module docstring)."""
    if held == of and p < ALPHA:
        return "holds"
    if opposite == of and p < ALPHA:
        return "reversed"
    return "not shown"


def count_claims(
    rows: Sequence[Mapping[str, Any]],
    correct: Sequence[Tensor],
    weights: Sequence[Mapping[str, Any]],
    lr: float,
) -> list[dict[str, Any]]:
    """Every claim of :data:`CLAIMS` counted over the seed pairs of ``rows`` (at learning rate ``lr``).

    Returns one dict per claim: ``claim``, ``key``, ``paper``, ``held``, ``of``, ``significant``,
    ``opposite``, ``test``, ``p``, ``sign_test_p``, ``verdict``, the pooled effect (``effect_pp`` in
    percentage points of accuracy, or ``effect`` in weight) and ``per_pair``.
    """
    pairs = sorted({r["pair"] for r in rows})
    out = []
    for claim in CLAIMS:
        if claim.kind == "weight":
            result = _weight_claim(claim, weights, pairs)
        else:
            result = _accuracy_claim(claim, rows, correct, pairs, lr)
        held = sum(x["held"] for x in result["per_pair"])
        opposite = sum(x["opposite"] for x in result["per_pair"])
        out.append(
            {
                "claim": claim.text,
                "key": claim.key,
                "paper": claim.paper,
                "held": held,
                "of": len(pairs),
                "significant": sum(x["significant"] for x in result["per_pair"]),
                "opposite": opposite,
                "sign_test_p": sign_test(held, opposite),
                "verdict": verdict(held, opposite, len(pairs), result["p"]),
                "definition": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(claim).items()},
                **result,
            }
        )
    return out
