"""Correctness gate: before any provider is timed on a head, its outputs and gradients must match the
materialised fp64 oracle (:func:`wpo_kernels.reference.reference_linear_logprobs`), so that no wrong
implementation is ever timed.

The oracle is evaluated on row chunks (each an independent ``[rows, V]`` block), so it also runs at
real vocabularies. Gradients of any loss of the per-token log-probs are ``Σ_t g_t ∇ log p_t`` with
``g = dL/d log p``, so one routine gives the reference gradients of the op and of the loss step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from benchmarks.harness import IGNORE_INDEX, OpInputs, StepInputs
from benchmarks.providers.base import Mode, Provider, preference_loss
from benchmarks.shapes import Head
from wpo_kernels.reference import reference_linear_logprobs

#: Relative-norm tolerances ``|x - ref| / |ref|`` per benchmark dtype: values (logprobs,
#: log Σp², loss) and gradients. bf16 is loose enough for TRL's bf16-rounded logits tiles and CCE's
#: gradient filtering, tight enough to catch a wrong transform, target or normalisation (errors of 10%+).
VALUE_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}
GRAD_RTOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 3e-2}
#: Elements of one fp64 oracle block.
_BLOCK = 1 << 24


class CheckFailed(AssertionError):
    """A provider disagrees with the oracle."""


def rel_err(x: Tensor, ref: Tensor) -> float:
    """``|x - ref| / |ref|`` (Frobenius norms, fp64); NaN or inf in ``x`` counts as a failure (inf)."""
    x, ref = x.detach().double(), ref.detach().to(x.device).double()
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@dataclass
class Oracle:
    """fp64 per-token values and, given an upstream ``g``, the gradients of ``Σ_t g_t log p_t``."""

    logprobs: Tensor
    log_sum_sq_probs: Tensor
    grad_hidden: Tensor | None = None
    grad_weight: Tensor | None = None


def oracle(hidden: Tensor, weight: Tensor, targets: Tensor, head: Head, g: Tensor | None = None) -> Oracle:
    """Row-chunked fp64 oracle for ``hidden [N, H]``; with ``g [N]``, also the gradients."""
    h64 = hidden.detach().double()
    w64 = weight.detach().double().requires_grad_(g is not None)
    rows = max(1, _BLOCK // max(weight.shape[0], 1))
    logprobs, lssp, grad_h = [], [], []
    for start in range(0, h64.shape[0], rows):
        h = h64[start : start + rows].requires_grad_(g is not None)
        with torch.set_grad_enabled(g is not None):
            out = reference_linear_logprobs(
                h, w64, targets[start : start + rows], ignore_index=IGNORE_INDEX, softcap=head.softcap
            )
            if g is not None:
                (out.logprobs * g[start : start + rows].double()).sum().backward()
                grad_h.append(h.grad)
        logprobs.append(out.logprobs.detach())
        lssp.append(out.log_sum_sq_probs)
    return Oracle(
        torch.cat(logprobs),
        torch.cat(lssp),
        torch.cat(grad_h) if g is not None else None,
        w64.grad if g is not None else None,
    )


def _require(errors: dict[str, float], dtype: torch.dtype, who: str) -> dict[str, float]:
    for key, err in errors.items():
        tol = (GRAD_RTOL if key.startswith("grad") else VALUE_RTOL)[dtype]
        if not err <= tol:
            raise CheckFailed(f"{who}: {key} differs from the fp64 oracle by {err:.3g} (tolerance {tol:g})")
    return errors


def check_op(provider: Provider, mode: Mode, inputs: OpInputs, ref: Oracle) -> dict[str, float]:
    """Compare ``provider``'s forward (values) or forward+backward (gradients) to ``ref``."""
    dtype = inputs.hidden.dtype
    if mode == "forward":
        logprobs, lssp = provider.make_forward(inputs)()
        errors = {"logprobs": rel_err(logprobs, ref.logprobs)}
        if lssp is not None:
            errors["log_sum_sq_probs"] = rel_err(lssp, ref.log_sum_sq_probs)
    else:
        for t in inputs.leaves:
            t.grad = None
        provider.make_forward_backward(inputs)()
        errors = {
            "grad_hidden": rel_err(inputs.hidden.grad, ref.grad_hidden),
            "grad_weight": rel_err(inputs.weight.grad, ref.grad_weight),
        }
        for t in inputs.leaves:
            t.grad = None
    return _require(errors, dtype, f"{provider.name} {mode}")


def step_oracle(inputs: StepInputs, *, weighted: bool, zero_ref: bool) -> tuple[Tensor, Tensor, Tensor]:
    """fp64 ``(loss, grad_hidden, grad_weight)`` of the step: WPO-weighted or plain DPO; ``zero_ref``
    for implementations that take no reference log-probs."""
    h = inputs.hidden.reshape(-1, inputs.hidden.shape[-1])
    t = inputs.targets.reshape(-1)
    values = oracle(h, inputs.weight, t, inputs.head)
    logprobs = values.logprobs.reshape(inputs.targets.shape).requires_grad_()
    ref_c, ref_r = inputs.ref_chosen.double(), inputs.ref_rejected.double()
    if zero_ref:
        ref_c, ref_r = torch.zeros_like(ref_c), torch.zeros_like(ref_r)
    lssp = values.log_sum_sq_probs.reshape(inputs.targets.shape) if weighted else None
    loss = preference_loss(logprobs, lssp, inputs.mask, ref_c, ref_r, inputs.beta)
    (g,) = torch.autograd.grad(loss, logprobs)
    grads = oracle(h, inputs.weight, t, inputs.head, g.reshape(-1))
    return loss.detach(), grads.grad_hidden.reshape(inputs.hidden.shape), grads.grad_weight


def check_step(
    provider: Provider, inputs: StepInputs, ref: tuple[Tensor, Tensor, Tensor]
) -> dict[str, float]:
    """Compare ``provider``'s step loss and gradients to ``ref`` (from :func:`step_oracle`)."""
    for t in inputs.leaves:
        t.grad = None
    loss = provider.make_step(inputs)()
    errors = {
        "loss": rel_err(loss, ref[0]),
        "grad_hidden": rel_err(inputs.hidden.grad, ref[1]),
        "grad_weight": rel_err(inputs.weight.grad, ref[2]),
    }
    for t in inputs.leaves:
        t.grad = None
    return _require(errors, inputs.hidden.dtype, f"{provider.name} step")
