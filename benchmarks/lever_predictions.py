"""One predicted number per design lever: the cost model on the launch plan with the lever, and on the same
plan without it, given the compiled kernels' facts (the static report prints these rows). Predictions
from static facts, not measurements: ``benchmarks/NOTES.md`` lists them for the first GPU session to
check.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from benchmarks.cost_model import H100, KernelFacts, predict
from benchmarks.legacy_plans import BACKWARD_CONFIGS, legacy_backward_plan
from benchmarks.plan_points import HEADS, Head, plans
from wpo_kernels.kernels.launch_plan import PassPlan, backward_plan, forward_plan


def _ungrouped(plan: PassPlan) -> PassPlan:
    main, *rest = plan.launches
    return dataclasses.replace(plan, launches=(dataclasses.replace(main, group_rows=0), *rest))


def _variant_forward(plan: PassPlan, vocab_splits: int) -> PassPlan:
    return forward_plan(
        plan.n, plan.v, plan.h, plan.dtype, has_bias=False, has_softcap=_softcap(plan), need_mean=True,
        sm_count=plan.sm_count, vocab_splits=vocab_splits,
    )


def _fewest_splits(plan: PassPlan) -> PassPlan:
    """The forward with the fewest vocabulary splits that still give 2 programs per SM (no choice
    against wave quantisation)."""
    rows = plan.launches[0].programs // plan.vocab_splits
    return _variant_forward(plan, -(-2 * plan.sm_count // rows))


def _softcap(plan: PassPlan) -> bool:
    return bool(plan.launches[0].switches.get("HAS_SOFTCAP"))


def _variant_backward(plan: PassPlan, **options: object) -> PassPlan:
    return backward_plan(
        plan.n, plan.v, plan.h, plan.dtype, has_bias=False, has_softcap=_softcap(plan),
        sm_count=plan.sm_count, **options,
    )


def _fused(sem: str) -> Callable[[PassPlan], PassPlan]:
    def build(plan: PassPlan) -> PassPlan:
        return legacy_backward_plan(
            plan.n, plan.v, plan.h, BACKWARD_CONFIGS[0], has_softcap=_softcap(plan), atomic_sem=sem,
            sm_count=plan.sm_count,
        )

    return build


#: (lever, pass, N values, the plan without the lever, whether "without" also means 1 CTA/SM)
LEVERS: list[tuple[str, str, tuple[int, ...], Callable[[PassPlan], PassPlan], bool]] = [
    ("vocabulary split (vs 1 split, eafe6c5's grid)", "forward", (1024, 4096),
     lambda p: _variant_forward(p, 1), False),
    ("split count against wave quantisation (vs the fewest splits with 2 programs/SM)", "forward",
     (1024, 4096), _fewest_splits, False),
    ("grouped program order, 8 row blocks (vs row block fastest)", "forward", (16384,), _ungrouped, False),
    ("a 2-CTA/SM config hides 70% of the epilogue (vs every config at 1 CTA/SM)", "forward",
     (4096, 16384), lambda p: p, True),
    ("atomics-free chunked backward (vs eafe6c5's fused backward, acq_rel atomics)", "backward",
     (4096, 16384), _fused("acq_rel"), False),
    ("atomics-free chunked backward (vs the fused backward with relaxed atomics)", "backward",
     (4096, 16384), _fused("relaxed"), False),
    ("2048-row token slabs (vs 512: dW read-modify-write per slab)", "backward", (16384,),
     lambda p: _variant_backward(p, slab_rows=512), False),
    ("bf16 dW rounded per slab (vs the exact fp32_grad_accumulation option)", "backward", (16384,),
     lambda p: _variant_backward(p, fp32_grad_accumulation=True), False),
]


def _one_cta_per_sm(facts: KernelFacts) -> KernelFacts:
    """The same facts with every kernel claiming over half an SM's shared memory: 1 CTA/SM."""
    half = H100.shared_per_sm // 2
    return KernelFacts({
        key: [(s, dataclasses.replace(c, shared_bytes=max(c.shared_bytes, half))) for s, c in compiled]
        for key, compiled in facts.entries.items()
    })


def lever_rows(facts: KernelFacts) -> list[str]:
    """A markdown table: lever, head, N, pass, predicted ratio with / without, workspace with / without."""
    out = [
        "| lever | head | N | pass | ÷ cuBLAS with | without | workspace MiB with | without |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for lever, pass_name, tokens, without, one_cta in LEVERS:
        for (name, head), n in ((item, n) for item in HEADS.items() for n in tokens):
            plan = _pass(head, n, pass_name)
            other = without(plan)
            with_lever = predict(plan, facts=facts)
            without_lever = predict(other, facts=_one_cta_per_sm(facts) if one_cta else facts)
            ratios = f"{with_lever.ratio:.2f} | {without_lever.ratio:.2f}"
            out.append(
                f"| {lever} | {name} | {n} | {pass_name} | {ratios} "
                f"| {plan.workspace_bytes / 2**20:,.0f} | {other.workspace_bytes / 2**20:,.0f} |"
            )
    return out


def _pass(head: Head, n: int, pass_name: str) -> PassPlan:
    forward, backward = plans(head, n)
    return forward if pass_name == "forward" else backward
