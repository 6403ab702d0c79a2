"""Public entry point: :func:`fused_linear_logprobs`. Validates once, then hands off to the autograd
Function (or, when no gradient is needed, straight to the forward kernel: nothing is saved)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from wpo_kernels.autograd import BACKENDS, Backend, autocast_disabled, resolve_backend, target_logprobs
from wpo_kernels.custom_ops import linear_logprobs_op
from wpo_kernels.fallback import keeps_exp
from wpo_kernels.kernels.logits_tile import interpreter_active
from wpo_kernels.types import OUTPUT_NAMES, LogitTransform, LogprobOutput, VocabStats

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Integer dtypes that convert to int64 exactly (not uint64: 2**64 - 100 would become -100).
_TARGET_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32)


def _check_positive(name: str, value: float | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def int64_targets(targets: Tensor) -> Tensor:
    """``targets`` (any shape) as int64, the one conversion every entry point makes before comparing them
    with ``ignore_index`` or the vocabulary size: in uint8, token 156 would equal ``-100`` (mod 256), and
    ids above 255 (127 for int8) would not fit. ``TypeError`` naming ``targets`` for a non-integer dtype."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in _TARGET_DTYPES:
        raise TypeError(
            f"targets must be an integer tensor (int8/16/32/64, uint8/16/32), got {targets.dtype}"
        )
    return targets.to(torch.int64)


def checked_backend(backend: Backend, hidden: Tensor) -> Literal["triton", "torch"]:
    """The backend that runs ``hidden``'s call: ``"auto"`` resolved, an explicit choice checked.
    ``ValueError`` naming ``backend`` for an unknown name, and for ``"triton"`` where the kernels cannot
    run: float64 inputs, or tensors off CUDA without the interpreter (``TRITON_INTERPRET=1``)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    chosen = resolve_backend(backend, hidden)
    if chosen == "triton" and hidden.dtype == torch.float64:
        raise ValueError("backend='triton' takes float16/bfloat16/float32 inputs, got float64: use 'torch'")
    if chosen == "triton" and not hidden.is_cuda and not interpreter_active():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (hidden is on {hidden.device}) or the Triton interpreter "
            "(TRITON_INTERPRET=1 set before triton is imported); use 'auto' or 'torch'"
        )
    return chosen


def validate_inputs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    *,
    ignore_index: int,
    transform: LogitTransform,
    vocab_start: int = 0,
    global_vocab: int | None = None,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument for every malformed input.

    ``targets`` are int64 (from :func:`int64_targets`). ``vocab_start``/``global_vocab`` describe a
    vocabulary slice (vocabulary-parallel heads): targets are then checked against the global vocabulary
    size.
    """
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float16, bfloat16, float32 or float64, got {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., H], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H], got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must have V >= 1 and H >= 1, got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, "
            f"got {tuple(targets.shape)}"
        )
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}")
    for name, t in (("weight", weight), ("targets", targets), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} must be on the device of hidden ({hidden.device}), got {t.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    _check_positive("temperature", transform.temperature)
    _check_positive("softcap", transform.softcap, allow_none=True)
    _check_positive("logit_scale", transform.logit_scale)
    vocab = global_vocab if global_vocab is not None else vocab_start + weight.shape[0]
    check_target_range(targets, vocab, ignore_index)


def check_target_range(targets: Tensor, vocab: int, ignore_index: int) -> None:
    """Every target in ``[0, vocab)`` or equal to ``ignore_index``, checked without a host sync.

    ``torch._assert_async``: on CUDA the check runs on the device and a bad target fails the next
    synchronisation with a device-side assert; under ``torch.compile`` it is part of the graph (a
    ``RuntimeError`` naming ``targets`` on CPU); in eager mode on CPU it fails at once and is raised as a
    ``ValueError`` naming ``targets`` and the offending value (which only this error path reads).
    """
    message = f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}"
    out_of_range = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if torch.compiler.is_compiling():
        torch._assert_async(~out_of_range.any(), message)
        return
    try:
        torch._assert_async(~out_of_range.any(), message)
    except RuntimeError:
        raise ValueError(f"{message}, found {targets[out_of_range][0].item()}") from None


#: ``(logprobs, max_logit, lse, lse2, mean_logit)``, each ``[N]``: what the autograd Functions return.
PerToken = tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]


def per_token_from_stats(stats: VocabStats, targets: Tensor, ignore_index: int) -> PerToken:
    """The forward-only path's :data:`PerToken` (no graph): target log-probs plus the raw statistics."""
    logprobs = target_logprobs(stats, targets, ignore_index)
    return logprobs, stats.max_logit, stats.lse, stats.lse2, stats.mean_logit


def outputs_from_stats(
    per_token: PerToken, outputs: Sequence[str], shape: tuple[int, ...], ignored: Tensor
) -> LogprobOutput:
    """Derive the requested outputs from :data:`PerToken` raw statistics, reshaped to ``shape``; every
    statistic is 0 where ``ignored`` (``[N]`` bool: the Triton backend never computes those rows)."""
    logprobs, max_logit, lse, lse2, mean_logit = per_token
    derived = {
        "lse": lambda: lse,
        "log_max_prob": lambda: max_logit - lse,
        "log_sum_sq_probs": lambda: lse2 - 2 * lse,
        "entropy": lambda: lse - mean_logit,
    }
    result = LogprobOutput(logprobs=logprobs.reshape(shape))
    for name in outputs:
        if name != "logprobs":
            value = torch.where(ignored, 0.0, derived[name]().detach())
            setattr(result, name, value.reshape(shape))
    return result


def flatten_inputs(
    hidden: Tensor, targets: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``hidden [..., H]`` as ``[N, H]`` (any strides: the kernels take them), ``targets [...]`` as a
    contiguous ``[N]`` and ``bias`` contiguous (the kernels read both at unit stride; a strided or
    expanded bias is copied, and its gradient still reaches the caller's tensor through the copy)."""
    return (
        hidden.reshape(-1, hidden.shape[-1]),
        targets.reshape(-1).contiguous(),
        bias.contiguous() if bias is not None else None,
    )


def needs_autograd(*tensors: Tensor | None) -> bool:
    """Whether a call must build a graph: grad mode is on and some input requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def check_outputs(outputs: Sequence[str]) -> tuple[str, ...]:
    """``outputs`` as a tuple of names from :data:`OUTPUT_NAMES` (a single name is accepted)."""
    if isinstance(outputs, str):
        outputs = (outputs,)
    unknown = [o for o in outputs if o not in OUTPUT_NAMES]
    if unknown:
        raise ValueError(f"outputs must be names among {OUTPUT_NAMES}, got unknown {unknown}")
    return tuple(outputs)


def fused_linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    outputs: Sequence[str] = ("logprobs",),
    backend: Backend = "auto",
    fp32_grad_accumulation: bool = False,
) -> LogprobOutput:
    """Per-token log-probabilities of ``targets`` under an LM head, and the vocabulary statistics WPO
    needs, without materialising the ``[N, V]`` logits (forward or backward).

    The logits are ``z = transform(hidden @ weight.T + bias)``: ``× logit_scale``, then
    ``softcap · tanh(· / softcap)`` if ``softcap`` is set, then ``÷ temperature``.

    Args:
        hidden: ``[..., H]`` float16 / bfloat16 / float32 (float64 runs the torch fallback); any strides.
        weight: ``[V, H]``, same dtype and device as ``hidden``.
        targets: ``[...]`` int8/16/32/64 or uint8/16/32 (compared as int64), values in ``[0, V)`` or
            ``ignore_index``; any strides.
        bias: optional ``[V]``, any strides (a strided or expanded bias is copied for the kernels).
        outputs: which of ``"lse"``, ``"log_max_prob"`` (``max_v z - lse``), ``"log_sum_sq_probs"``
            (``log Σ_v p_v²``) and ``"entropy"`` to compute besides ``logprobs``. These are detached
            (WPO weights are detached by definition); ``entropy`` costs one extra running sum.
        backend: ``"auto"`` (Triton on CUDA and under ``TRITON_INTERPRET=1``, else the chunked torch
            fallback), ``"triton"`` (refused for float64, and for CPU tensors without the interpreter)
            or ``"torch"``.
        fp32_grad_accumulation: the Triton backward sums the weight (and bias) gradient over token slabs
            of up to 2048 rows; by default straight into the returned half-precision gradient (rounded
            once per slab), with True in an fp32 ``[V, H]`` buffer rounded once at the end (exact
            accumulation, ``4·V·H`` bytes more). No effect on fp32 inputs or the torch fallback (both
            always accumulate in fp32).

    Returns:
        :class:`LogprobOutput` with ``[...]``-shaped float32 tensors (float64 for float64 inputs).
        ``logprobs`` is differentiable w.r.t. hidden, weight and bias (once: double backward raises).
        Every output is 0 (with no gradient) where ``targets == ignore_index``: on the Triton backend
        those rows are compacted out before the kernels and GEMMs (one host read of their count). An
        enclosing ``torch.autocast`` is switched off inside (the computation accumulates in fp32 itself).

    Example:
        >>> out = fused_linear_logprobs(h, lm_head.weight, labels, outputs=("log_sum_sq_probs",))
        >>> out.logprobs.sum().backward()
    """
    transform = LogitTransform(logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    outputs = check_outputs(outputs)
    targets = int64_targets(targets)
    validate_inputs(hidden, weight, targets, bias, ignore_index=ignore_index, transform=transform)
    h, y, b = flatten_inputs(hidden, targets, bias)
    chosen = checked_backend(backend, h)
    # one custom op (autograd, torch.compile and the dispatcher see it whole), with or without a graph
    # small problems on the fallback keep exp(z - max) for the backward (no recompute GEMM)
    keep = (
        chosen == "torch" and softcap is None and needs_autograd(hidden, weight, bias)
        and keeps_exp(len(y), len(weight))
    )
    with autocast_disabled(h.device):
        *per_token, _, _ = linear_logprobs_op(
            h, weight, b, y, ignore_index, logit_scale, softcap, temperature, chosen, "entropy" in outputs,
            bool(fp32_grad_accumulation), keep,
        )
    return outputs_from_stats(per_token, outputs, tuple(targets.shape), y == ignore_index)
