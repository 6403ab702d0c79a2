"""The paired training step on the Triton backend (``wpo_kernels/kernels/step.py``; the interpreter on CPU,
``torch.matmul`` standing in for cuBLAS): exact against the fp64 reference on the one-pass and recompute
routes and across them, budgets from nothing to everything, odd and empty sequences, B = 1; bitwise
reproducible; the plan's routes, chunk rows and workspace, and real allocations equal to the plan."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from tests.helpers import make_inputs, make_preference_batch
from wpo_kernels import FusedLinearWPOLoss, custom_ops, fused_linear_logprobs, fused_linear_wpo_loss
from wpo_kernels.kernels.launch_plan import (
    DEFAULT_MEMORY_BUDGET,
    RECOMPUTE_SLAB_ROWS,
    one_pass_row_bytes,
    pair_groups,
    step_plan,
)
from wpo_kernels.kernels.logits_tile import interpreter_active
from wpo_kernels.kernels.step import plan_step, triton_pair_step
from wpo_kernels.pair_layout import pair_layout
from wpo_kernels.reference import reference_wpo_loss
from wpo_kernels.types import LogitTransform

pytestmark = [
    pytest.mark.skipif(
        not (torch.cuda.is_available() or interpreter_active()), reason="needs CUDA or TRITON_INTERPRET=1"
    ),
    pytest.mark.filterwarnings("ignore:wpo_weights. a sequence has no tokens:RuntimeWarning"),
]
#: fp32 as in tests/test_fused_loss.py. bf16: the one-pass route rounds the logits to bf16 before the
#: statistics (|Δz| ≤ 2⁻⁹|z|, logits of a few units here), so the loss moves by ~1e-2 relative and the
#: gradients by the bf16 GEMMs' rounding (GRAD_RTOL[bf16] = 3e-2 in tests/helpers.py).
TOL = {torch.float32: dict(rtol=2e-4, atol=2e-6), torch.bfloat16: dict(rtol=3e-2, atol=3e-3)}
VOCAB, WIDTH = 37, 16


def _batch(pairs: int, length: int, seed: int, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    return make_preference_batch(pairs, length, VOCAB, WIDTH, dtype=dtype, seed=seed, device=device)


def _loss_and_grads(batch, budget, **options):
    h, w, b, ref_w, y = batch
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    out = fused_linear_wpo_loss(
        leaves[0],
        leaves[1],
        y,
        bias=leaves[2],
        ref_weight=ref_w,
        backend="triton",
        memory_budget=budget,
        **options,
    )
    return out.loss, torch.autograd.grad(out.loss, leaves)


def _check_exact(batch, budget, dtype=torch.float32, **options):
    h, w, b, ref_w, y = batch
    got, grads = _loss_and_grads(batch, budget, **options)
    exact = [t.detach().double().cpu().requires_grad_() for t in (h, w, b)]
    want = reference_wpo_loss(
        exact[0], exact[1], y.cpu(), bias=exact[2], ref_weight=ref_w.double().cpu(), **options
    )
    want_grads = torch.autograd.grad(want, exact)
    torch.testing.assert_close(got.double().cpu(), want, **TOL[dtype])
    for name, g, wg in zip(("hidden", "weight", "bias"), grads, want_grads, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double().cpu(), wg, **TOL[dtype], msg=lambda m, n=name: f"d{n}: {m}")


def _routes(batch, budget, softcap=None):
    h, w, b, _, y = batch
    transform = LogitTransform(softcap=softcap)
    budget = DEFAULT_MEMORY_BUDGET if budget is None else budget
    plan = plan_step(pair_layout(y, -100), w, b, transform, budget, (True, True, True))
    return [c.route for c in plan.chunks if c.rows]


#: budget → routes on _batch(4, 7, seed=5) (pairs of 9, 2, 11 and 13 kept tokens, one sequence empty), fp32,
#: bias: every pair recomputed; the two longest pairs recomputed, the others in one pass; all in one pass
BUDGETS = {
    "nothing": 0,
    "some pairs": 200 + 9 * one_pass_row_bytes(VOCAB, WIDTH, torch.float32, True),
    "everything": None,
}


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize(
    ("softcap", "alignment", "loss_type"), [(None, "sampled", "sigmoid"), (3.0, "greedy", "simpo")]
)
def test_exact_on_every_route(
    budget: str, softcap: float | None, alignment: str, loss_type: str, device: str
) -> None:
    batch = _batch(4, 7, seed=5, device=device)
    routes = _routes(batch, BUDGETS[budget], softcap)
    assert (
        set(routes)
        == {"nothing": {"recompute"}, "some pairs": {"one_pass", "recompute"}, "everything": {"one_pass"}}[
            budget
        ]
    ), routes
    _check_exact(
        batch,
        BUDGETS[budget],
        softcap=softcap,
        alignment=alignment,
        loss_type=loss_type,
        temperature=0.8,
        logit_scale=1.3,
        beta=0.7,
    )


@pytest.mark.parametrize("pairs_per_chunk", [1, 2, 3])
def test_budgets_from_one_pair_up(pairs_per_chunk: int, device: str) -> None:
    """Budgets for chunks of 1, 2, 3 pairs of odd lengths (every pair fits), the metrics too."""
    batch = _batch(3, 9, seed=8, device=device)
    offsets = pair_layout(batch[4], -100).offsets
    rows = max(offsets[2 * p + 2 * pairs_per_chunk] - offsets[2 * p] for p in range(4 - pairs_per_chunk))
    budget = 200 + rows * one_pass_row_bytes(VOCAB, WIDTH, torch.float32, True)
    plan = plan_step(pair_layout(batch[4], -100), batch[1], batch[2], LogitTransform(), budget, (True,) * 3)
    assert {c.route for c in plan.chunks} == {"one_pass"}
    assert len(plan.chunks) == {1: 3, 2: 2, 3: 1}[pairs_per_chunk]
    _check_exact(batch, budget, loss_type="ipo", variant="wpo_l", alignment="sampled")


def test_one_pair_and_all_ignored_sequences(device: str) -> None:
    """B = 1; then a batch whose chosen sequence 0 and whole pair 1 are ignored, on both routes."""
    _check_exact(_batch(1, 6, seed=3, device=device), None, loss_type="sigmoid", alignment="greedy")
    h, w, b, ref_w, y = _batch(3, 5, seed=4, device=device)
    y[0] = -100
    y[1] = -100
    y[4] = -100
    for budget in (0, None):
        _check_exact((h, w, b, ref_w, y), budget, loss_type="hinge", alignment="none", beta=0.3)


def test_bf16_one_pass_against_reference(device: str) -> None:
    _check_exact(_batch(3, 6, seed=9, dtype=torch.bfloat16, device=device), None, dtype=torch.bfloat16)


@pytest.mark.parametrize("budget", [0, BUDGETS["some pairs"], None])
def test_bitwise_reproducible(budget: int | None, device: str) -> None:
    batch = _batch(4, 7, seed=6, dtype=torch.bfloat16, device=device)
    runs = [_loss_and_grads(batch, budget, softcap=5.0) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        assert torch.equal(a, b)


def test_module_takes_the_budget_and_refuses_bad_ones() -> None:
    assert "memory_budget=0" in repr(FusedLinearWPOLoss(memory_budget=0))
    with pytest.raises(ValueError, match="memory_budget must be >= 0 bytes, got -1"):
        FusedLinearWPOLoss(memory_budget=-1)
    h, w, b, ref_w, y = _batch(1, 4, seed=1)
    with pytest.raises(TypeError, match="memory_budget must be an int"):
        fused_linear_wpo_loss(h, w, y, ref_weight=ref_w, memory_budget=1.5e9)


# --- the plan -------------------------------------------------------------------------------------------


def test_pair_groups_are_greedy_and_flag_long_pairs() -> None:
    # pairs of 3, 5, 9, 2, 2 kept tokens
    offsets = [0, 1, 3, 5, 8, 14, 17, 18, 19, 20, 22]
    assert pair_groups(offsets, 8) == [(0, 2, True), (2, 3, False), (3, 5, True)]
    assert pair_groups(offsets, 0) == [
        (0, 1, False),
        (1, 2, False),
        (2, 3, False),
        (3, 4, False),
        (4, 5, False),
    ]
    assert pair_groups(offsets, 100) == [(0, 5, True)]


def test_step_plan_routes_rows_and_buffers() -> None:
    """A Llama-3-8B head, pairs of 1024 kept tokens and one of 12000: the budget's chunk rows, the long
    pair alone (and every pair with no budget) on the recompute route in slabs, the buffers' sizes."""
    offsets = [0]
    for length in [512] * 8 + [6000, 6000] + [512] * 2:
        offsets.append(offsets[-1] + length)
    v, h = 128256, 4096
    plan = step_plan(
        offsets,
        v,
        h,
        torch.bfloat16,
        memory_budget=DEFAULT_MEMORY_BUDGET,
        has_bias=False,
        has_softcap=False,
        sm_count=132,
    )
    assert plan.chunk_rows == (DEFAULT_MEMORY_BUDGET - 12 * 4) // one_pass_row_bytes(
        v, h, torch.bfloat16, True
    )
    assert [(c.route, c.rows) for c in plan.chunks] == [
        ("one_pass", 4096),
        ("recompute", 12000),
        ("one_pass", 1024),
    ]
    assert plan.buffer("logits").shape == (4096, v)
    assert plan.chunks[1].slabs()[-1] == (4096 + 5 * RECOMPUTE_SLAB_ROWS, 4096 + 12000)
    one_pass = [b for b in plan.buffers if not b.name.startswith("recompute_")]
    row_bytes = one_pass_row_bytes(v, h, torch.bfloat16, True)
    assert sum(b.nbytes for b in one_pass) == 12 * 4 + 4096 * row_bytes <= DEFAULT_MEMORY_BUDGET
    assert plan.routes == ("one_pass", "recompute")
    nothing = step_plan(
        offsets, v, h, torch.bfloat16, memory_budget=0, has_bias=False, has_softcap=False, sm_count=132
    )
    assert [(c.route, c.rows) for c in nothing.chunks] == [("recompute", 17120)]
    assert nothing.buffer("logits") is None and nothing.workspace_bytes < 128 * 2**20


class _NewStorages(TorchDispatchMode):
    """Bytes of every storage an aten op creates (an output whose storage is new)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[int] = set()
        self.created: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for arg in [*args, *(kwargs or {}).values()]:
            if isinstance(arg, torch.Tensor):
                self.seen.add(arg.untyped_storage().data_ptr())
        result = func(*args, **(kwargs or {}))
        for out in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(out, torch.Tensor):
                storage = out.untyped_storage()
                if storage.data_ptr() not in self.seen and storage.nbytes() > 0:
                    self.created[storage.data_ptr()] = storage.nbytes()
                self.seen.add(storage.data_ptr())
        return result


@pytest.mark.parametrize(
    ("dtype", "budget"), [(torch.bfloat16, None), (torch.float32, None), (torch.bfloat16, 0)]
)
def test_real_allocations_equal_the_plan(dtype: torch.dtype, budget: int | None, device: str) -> None:
    """Every storage the step creates (the loss's coefficient evaluation aside) is an output or one of the
    plan's buffers, or (recompute route) one of its slab's transient allocations."""
    h, w, b, _, y = _batch(3, 6, seed=2, dtype=dtype, device=device)
    transform = LogitTransform(softcap=4.0)
    layout = pair_layout(y, -100)
    plan = plan_step(
        layout, w, b, transform, DEFAULT_MEMORY_BUDGET if budget is None else budget, (True,) * 3
    )
    assert len(plan.chunks) == 1  # one chunk (one slab): every buffer is allocated once

    def coefficients(first, last, logprobs, statistic):
        with _disable_current_modes():
            return torch.linspace(-1.0, 1.0, 2 * (last - first), device=logprobs.device).view(2, -1)

    with _NewStorages() as mode:
        for t in (h, w, b, y, layout.kept_rows, layout.row_sequence):
            mode.seen.add(t.untyped_storage().data_ptr())
        out = triton_pair_step(h, w, b, y, transform, layout, plan, "log_sum_sq_probs", coefficients)
    returned = [out.logprobs, out.statistic, out.grad_hidden, out.grad_weight, out.grad_bias]
    created = sum(mode.created.values()) - sum(t.untyped_storage().nbytes() for t in returned)
    assert created == plan.workspace_bytes
    assert plan.routes == (("recompute",) if budget == 0 else ("one_pass",))


# --- ignored rows never reach a GEMM ----------------------------------------------------------------------


def test_log_probs_op_runs_only_kept_rows(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    """``fused_linear_logprobs(backend="triton")``: the kernels and GEMMs see the kept rows only, every
    output is 0 at ignored rows and so is their gradient."""

    rows_seen: list[int] = []
    for name in ("vocab_stats", "linear_logprobs_backward"):
        original = getattr(custom_ops, name)

        def recorded(backend, hidden, *args, _original=original, **kwargs):
            rows_seen.append(hidden.shape[0])
            return _original(backend, hidden, *args, **kwargs)

        monkeypatch.setattr(custom_ops, name, recorded)
    inputs = make_inputs(20, 8, 30, torch.float32, device, bias=True, n_ignored=7)
    out = fused_linear_logprobs(
        inputs["hidden"],
        inputs["weight"],
        inputs["targets"],
        bias=inputs["bias"],
        backend="triton",
        outputs=("lse", "log_max_prob", "log_sum_sq_probs", "entropy"),
    )
    out.logprobs.sum().backward()
    assert rows_seen == [13, 13]
    for name, value in out.as_dict().items():
        assert torch.equal(value[:7], torch.zeros_like(value[:7])), name
        assert (value[7:] != 0).all(), name
    assert torch.equal(inputs["hidden"].grad[:7], torch.zeros_like(inputs["hidden"].grad[:7]))


def test_step_gemms_cover_kept_rows_only() -> None:
    """The step plan's chunks cover exactly the kept tokens: half of them ignored, half the rows."""
    y = torch.randint(0, VOCAB, (4, 10))
    full = pair_layout(y, -100)
    y[:, :5] = -100
    half = pair_layout(y, -100)
    plans = [
        step_plan(
            layout.offsets,
            VOCAB,
            WIDTH,
            torch.bfloat16,
            memory_budget=budget,
            has_bias=False,
            has_softcap=False,
            sm_count=132,
        )
        for layout in (full, half)
        for budget in (0, DEFAULT_MEMORY_BUDGET)
    ]
    assert [p.kept for p in plans] == [40, 40, 20, 20]
    # pair after pair: chosen 0 (batch row 0), rejected 0 (row 2), chosen 1 (row 1), rejected 1 (row 3)
    assert half.kept_rows.tolist() == [*range(5, 10), *range(25, 30), *range(15, 20), *range(35, 40)]
    assert half.row_sequence.tolist() == [0] * 5 + [2] * 5 + [1] * 5 + [3] * 5
