"""``torch.compile`` and host syncs: the fused op is a ``torch.library`` custom op (fake shapes, registered
autograd), so a WPO step — ``fused_linear_logprobs`` → ``wpo_weights`` → ``wpo_loss`` → backward —
compiles with ``fullgraph=True`` and no graph break and equals eager; and no call reads a tensor on the
host (``Tensor.item`` / ``Tensor.__bool__`` raise while it runs).

On CPU the op runs the torch fallback (or the Triton kernels in the interpreter); on CUDA the same
registration runs the compiled kernels. Compiled with the ``aot_eager`` backend: dynamo (graph breaks)
and AOTAutograd (fake tensors, the registered backward) are what is under test, and it skips inductor's
C++ code generation, which would dominate the run time on the 2-core CI machine.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from tests.helpers import GRAD_RTOL, VALUE_RTOL, make_inputs, make_preference_batch, rel_err
from wpo_kernels import fused_linear_logprobs, wpo_loss, wpo_weights

TOL_VALUE, TOL_GRAD = VALUE_RTOL[torch.float32], GRAD_RTOL[torch.float32]


def _step(hidden: Tensor, weight: Tensor, bias: Tensor, targets: Tensor, backend: str) -> tuple[Tensor, ...]:
    """One WPO step on a ``[chosen; rejected]`` batch: fused log-probs → sampled weights → DPO loss; the
    reference log-probs are a detached, shifted copy (enough to make the margins non-zero)."""
    out = fused_linear_logprobs(
        hidden, weight, targets, bias=bias, softcap=20.0, outputs=("log_sum_sq_probs",), backend=backend
    )
    mask = targets != -100
    weights = wpo_weights(out.logprobs, None, out.log_sum_sq_probs, mask, "sampled")
    logps = out.logprobs.sum(-1)
    ref = logps.detach() - 0.1 * torch.arange(logps.shape[0], dtype=logps.dtype)
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref.chunk(2)
    w_chosen, w_rejected = weights.chunk(2)
    result = wpo_loss(chosen, rejected, ref_chosen, ref_rejected, w_chosen, w_rejected, beta=0.5)
    return result.loss, weights, out.log_sum_sq_probs


def _leaves(backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    hidden, weight, bias, _, targets = make_preference_batch(2, 6, 45, 16, seed=3, empty=False)
    leaf = lambda t: t.float().requires_grad_()
    return leaf(hidden), leaf(weight), leaf(bias), targets


@pytest.fixture
def no_host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``Tensor.item`` and ``Tensor.__bool__`` raise while the test body runs (a host read of a CUDA
    tensor is a sync; under compile it is a graph break)."""

    def refuse(self: Tensor, *args: object) -> None:
        raise AssertionError("a tensor value was read on the host")

    monkeypatch.setattr(Tensor, "item", refuse)
    monkeypatch.setattr(Tensor, "__bool__", refuse)
    yield
    monkeypatch.undo()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_step_has_no_graph_break_and_equals_eager(backend: str) -> None:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    hidden, weight, bias, targets = _leaves(backend)
    eager = _step(hidden, weight, bias, targets, backend)
    eager[0].backward()
    want = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None

    step = torch.compile(_step, fullgraph=True, backend="aot_eager")
    compiled = step(hidden, weight, bias, targets, backend)
    compiled[0].backward()
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for name, got, ref in zip(("loss", "weights", "log_sum_sq_probs"), compiled, eager, strict=True):
        assert rel_err(got, ref) < TOL_VALUE, name
    for name, t, ref in zip(("hidden", "weight", "bias"), (hidden, weight, bias), want, strict=True):
        assert rel_err(t.grad, ref) < TOL_GRAD, f"d{name}"
    assert eager[0].abs() > 0 and all(g.norm() > 0 for g in want)  # a real step, not a zero one


def test_eager_call_reads_nothing_on_the_host(no_host_reads: None) -> None:
    inputs = make_inputs(24, 16, 40, torch.float32, "cpu", bias=True, n_ignored=3)
    out = fused_linear_logprobs(
        inputs["hidden"], inputs["weight"], inputs["targets"], bias=inputs["bias"],
        outputs=("log_max_prob", "log_sum_sq_probs", "entropy"), backend="torch",
    )
    out.logprobs.sum().backward()
    assert inputs["hidden"].grad is not None and inputs["weight"].grad is not None


def test_triton_call_reads_one_number_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Triton backend compacts ignored rows out of its GEMMs: the forward reads their count once (a
    sync on CUDA) and hands it to the backward in a CPU tensor (0-d int64), which the backward reads."""
    reads: list[Tensor] = []
    for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist"):
        original = getattr(Tensor, name)

        def counted(self: Tensor, *args: object, _original=original) -> object:
            reads.append(self)
            return _original(self, *args)

        monkeypatch.setattr(Tensor, name, counted)
    inputs = make_inputs(24, 16, 40, torch.float32, "cpu", bias=True, n_ignored=3)
    out = fused_linear_logprobs(
        inputs["hidden"], inputs["weight"], inputs["targets"], bias=inputs["bias"], backend="triton",
        outputs=("log_sum_sq_probs",),
    )
    assert len(reads) == 1
    out.logprobs.sum().backward()
    monkeypatch.undo()
    assert len(reads) == 2 and reads[1].dim() == 0 and reads[1].dtype == torch.int64
    assert inputs["weight"].grad is not None


def test_compiled_step_reads_nothing_on_the_host(no_host_reads: None) -> None:
    torch._dynamo.reset()
    hidden, weight, bias, targets = _leaves("torch")
    step = torch.compile(_step, fullgraph=True, backend="aot_eager")
    loss, _, _ = step(hidden, weight, bias, targets, "torch")
    loss.backward()
    assert hidden.grad is not None


def test_compiled_target_check_names_targets() -> None:
    torch._dynamo.reset()
    inputs = make_inputs(8, 16, 10, torch.float32, "cpu")
    targets = inputs["targets"].clone()
    targets[3] = 10
    call = torch.compile(
        lambda h, w, y: fused_linear_logprobs(h, w, y, backend="torch").logprobs,
        fullgraph=True,
        backend="aot_eager",
    )
    with pytest.raises(RuntimeError, match=r"targets must lie in \[0, 10\)"):
        call(inputs["hidden"], inputs["weight"], targets)


@pytest.mark.parametrize("keep_exp", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_custom_op_registration(with_bias: bool, keep_exp: bool) -> None:
    """``torch.library.opcheck``: schema, fake implementation and autograd registration agree with the
    real op (including under AOTAutograd), with and without the kept ``exp(z - max)`` (no softcap)."""
    inputs = make_inputs(10, 16, 21, torch.float32, "cpu", bias=with_bias, n_ignored=2)
    tensors = (inputs["hidden"], inputs["weight"], inputs["bias"], inputs["targets"])
    args = (*tensors, -100, 1.0, None if keep_exp else 5.0, 0.7, "torch", True, False, keep_exp)
    torch.library.opcheck(torch.ops.wpo_kernels.linear_logprobs.default, args)
