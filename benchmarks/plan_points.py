"""The points the static report and the lever predictions evaluate the launch plan at: the Llama-3-8B and
Gemma-2-9B LM heads at N = 1024, 4096, 16384 tokens, bf16, all five statistics, no bias, on an H100."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmarks.cost_model import H100
from wpo_kernels.kernels.launch_plan import (
    DEFAULT_MEMORY_BUDGET,
    PassPlan,
    StepPlan,
    backward_plan,
    forward_plan,
    step_plan,
)


@dataclass(frozen=True)
class Head:
    """An LM head: hidden size, vocabulary, final-logit softcap."""

    hidden: int
    vocab: int
    softcap: float | None


HEADS = {"Llama-3-8B": Head(4096, 128256, None), "Gemma-2-9B": Head(3584, 256000, 30.0)}
TOKENS = (1024, 4096, 16384)


def plans(
    head: Head, n: int, dtype: torch.dtype = torch.bfloat16, *, bias: bool = False,
    softcap: bool | None = None, need_mean: bool = True,
) -> tuple[PassPlan, PassPlan]:
    """(forward, backward) plans of one call on ``head`` for an H100 (``H100.sm_count`` SMs); by default
    the plan point's own options (``softcap`` as the head has it)."""
    has_softcap = head.softcap is not None if softcap is None else softcap
    common = {"has_bias": bias, "has_softcap": has_softcap, "sm_count": H100.sm_count}
    return (
        forward_plan(n, head.vocab, head.hidden, dtype, need_mean=need_mean, **common),
        backward_plan(n, head.vocab, head.hidden, dtype, **common),
    )


# --- the paired training step's plan points (issue 18) ------------------------------------------------------

#: Tokens per sequence at the step's plan points: N tokens are N / 512 sequences, N / 1024 pairs.
STEP_SEQUENCE = 512
#: Shares of each sequence at ``ignore_index`` (its prompt, at the start).
STEP_IGNORED = (0.0, 0.5)
#: The budgets: the default (it holds every plan point's chunk, so every pair runs in one pass) and 0,
#: the smallest (every pair on the recompute route).
STEP_BUDGETS = {"default": DEFAULT_MEMORY_BUDGET, "smallest": 0}


def step_offsets(n: int, ignored: float) -> list[int]:
    """Pair-major prefix sums of kept tokens: ``n / STEP_SEQUENCE`` sequences, the first ``ignored``
    share of each ignored."""
    kept = STEP_SEQUENCE - round(ignored * STEP_SEQUENCE)
    return [k * kept for k in range(n // STEP_SEQUENCE + 1)]


def step_plan_for(head: Head, n: int, ignored: float, memory_budget: int) -> StepPlan:
    """The step plan of one plan point (bf16, no bias, the head's softcap, every gradient but the bias's)."""
    return step_plan(
        step_offsets(n, ignored), head.vocab, head.hidden, torch.bfloat16, memory_budget=memory_budget,
        has_bias=False, has_softcap=head.softcap is not None, sm_count=H100.sm_count,
    )
