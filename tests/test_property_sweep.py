"""Property-based sweep of :func:`fused_linear_logprobs` against the fp64 reference, on both CPU paths.

Hypothesis draws shapes (down to N = 0 and V = H = 1), dtypes, memory layouts of every argument, integer
target dtypes, the logit transform, ``ignore_index`` and where it sits, which outputs and which
gradients are asked for, and edge values (huge logits, masked vocabulary entries, all tokens ignored).
Derandomised with a fixed example budget and no example database, so CI runs the same cases every time.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import CPU_BACKENDS, LAYOUTS, check_call, in_layout
from wpo_kernels import OUTPUT_NAMES, fused_linear_logprobs
from wpo_kernels.reference import transformed_logits

#: Examples per backend: the whole sweep (both backends) took 62 s of CPU time (user + sys) on the 2-core
#: CI machine kind, 2026-11-25, measured under load (wall 192 s at a load average of ~10).
EXAMPLES = {"triton": 500, "torch": 700}

FLOATS = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def cases(draw: st.DrawFn) -> dict:
    """One call's arguments and options (tensors built from a drawn seed, not drawn element-wise)."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    batch = draw(st.sampled_from([(), (1,), (2,), (3,)]))  # () : hidden [N, H]; else [B, T, H]
    tokens = draw(st.integers(0, 24)) if not batch else draw(st.integers(0, 8))
    shape = (*batch, tokens) if batch else (tokens,)
    h = draw(st.integers(1, 40))
    v = draw(st.one_of(st.integers(1, 80), st.integers(250, 300)))  # > 255: uint8 ids above 127
    dtype = draw(st.sampled_from(FLOATS))
    scale = draw(st.sampled_from([0.0, 0.05, 1.0, 1.0, 1.0, 40.0]))  # 0: every logit equal to the bias

    hidden = torch.randn(*shape, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (scale * 2 / h**0.5)
    bias = torch.randn(v, generator=g) if draw(st.booleans()) else None
    masked = bias is not None and v > 1 and draw(st.booleans())
    if masked:  # a masked vocabulary: some (never all, never entry 0: see expanded layouts) at -inf
        bias[1 + torch.randperm(v - 1, generator=g)[: draw(st.integers(1, v - 1))]] = float("-inf")
    allowed = torch.arange(v) if not masked else torch.nonzero(torch.isfinite(bias)).squeeze(1)

    target_dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]))
    high = {torch.int8: 128, torch.uint8: 256}.get(target_dtype, v)
    allowed = allowed[allowed < high]
    if allowed.numel() == 0:
        allowed = torch.zeros(1, dtype=torch.int64)
        target_dtype = torch.int64 if v > high else target_dtype
    targets = allowed[torch.randint(0, allowed.numel(), shape, generator=g)]
    # ignore_index: the default, or a vocabulary id (then real tokens equal to it are ignored too)
    ignore_index = draw(st.sampled_from([-100, -1, 0, v - 1]))
    info = torch.iinfo(target_dtype)
    if not info.min <= ignore_index <= info.max:  # must be representable in the targets' dtype
        ignore_index = 0
    share = draw(st.sampled_from([0.0, 0.3, 1.0]))  # none, some, every token ignored
    ignored = torch.rand(shape, generator=g) < share
    targets = torch.where(ignored, ignore_index, targets).to(target_dtype)

    layouts = {name: draw(st.sampled_from(LAYOUTS)) for name in ("hidden", "weight", "bias", "targets")}
    grads = {name: draw(st.booleans()) for name in ("hidden", "weight", "bias")}
    tensors = {}
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias), ("targets", targets)):
        if t is None:
            tensors[name] = None
            continue
        if t.dtype.is_floating_point:
            t = t.to(dtype).requires_grad_(grads[name])
        tensors[name] = in_layout(t, layouts[name]) if t.numel() else t
    options = dict(
        ignore_index=ignore_index,
        softcap=draw(st.sampled_from([None, None, 0.5, 30.0])),
        temperature=draw(st.sampled_from([1.0, 0.3, 2.5])),
        logit_scale=draw(st.sampled_from([1.0, 0.125, 4.0])),
        outputs=tuple(o for o in OUTPUT_NAMES[1:] if draw(st.booleans())),
    )
    return {**tensors, **options}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sweep_against_reference(backend: str) -> None:
    @settings(
        max_examples=EXAMPLES[backend],
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(case=cases())
    def run(case: dict) -> None:
        hidden, weight, bias, targets = (case.pop(k) for k in ("hidden", "weight", "bias", "targets"))
        with torch.no_grad():  # errors are relative to the logits' magnitude once it exceeds 1
            z = transformed_logits(
                hidden.double().reshape(-1, hidden.shape[-1]),
                weight.double(),
                None if bias is None else bias.double(),
                softcap=case["softcap"],
                temperature=case["temperature"],
                logit_scale=case["logit_scale"],
            )
            finite = z[torch.isfinite(z)]
            floor = max(1.0, finite.abs().max().item() if finite.numel() else 0.0)
        check_call(
            fused_linear_logprobs, hidden, weight, targets, bias, backend=backend, value_floor=floor, **case
        )

    run()
