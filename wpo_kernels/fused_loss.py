"""WPO end to end from hidden states: fused per-token kernels → per-sequence log-probs and weights → loss.

For the common layout where the batch is ``[chosen; rejected]`` concatenated along the first dimension
(as TRL's ``DPOTrainer`` and Liger's ``LigerFusedLinearDPOLoss`` lay it out). The ``[N, V]`` logits are
never materialised, forward or backward; at most a chunk of ``[rows, V]`` within ``memory_budget``.

A paired loss with gradients is one training step, in stages: checks → reference log-probs →
:class:`_PairedLoss` (weights, loss, per-chunk pair coefficients) → the step, chunk by chunk of whole
pairs, forming each pair's gradient while its logits are in hand (the torch fallback,
:mod:`wpo_kernels.fallback_step`; the Triton routes, :mod:`wpo_kernels.kernels.step`); the loss's backward
only scales those gradients (:class:`LossWithGradients`). KTO and calls without a gradient take the
per-token log-probs of :func:`fused_linear_logprobs`, and autograd does the rest.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from wpo_kernels.autograd import BACKENDS, Backend, autocast_disabled, first_order_backward
from wpo_kernels.fallback_step import one_pass_pair_step
from wpo_kernels.kernels.launch_plan import DEFAULT_MEMORY_BUDGET
from wpo_kernels.kernels.step import plan_step, triton_pair_step
from wpo_kernels.linear_logprobs import (
    checked_backend,
    fused_linear_logprobs,
    int64_targets,
    needs_autograd,
    validate_inputs,
)
from wpo_kernels.losses import _NEEDS_REF, WPOLossOutput, check_loss_options, wpo_loss
from wpo_kernels.pair_layout import pair_layout
from wpo_kernels.types import LogitTransform
from wpo_kernels.weights import Alignment, parse_alignment, wpo_weights

#: The per-token statistic each alignment needs from the kernel, besides ``logprobs``.
_ALIGNMENT_OUTPUT = {
    Alignment.NONE: (),
    Alignment.GREEDY: ("log_max_prob",),
    Alignment.SAMPLED: ("log_sum_sq_probs",),
}


def _check_layout(hidden: Tensor, targets: Tensor) -> int:
    """Half the batch size (``B``) of a ``[chosen; rejected]`` batch; errors name the argument."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if not isinstance(hidden, Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if targets.dim() != 2:
        raise ValueError(f"targets must have shape [2B, T] ([chosen; rejected]), got {tuple(targets.shape)}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape [2B, T, H] ([chosen; rejected]), got {tuple(hidden.shape)}")
    if targets.shape[0] % 2:
        raise ValueError(
            f"targets must hold an even number of sequences ([chosen; rejected] concatenated), "
            f"got {targets.shape[0]}"
        )
    return targets.shape[0] // 2


def _halves(x: Tensor, half: int) -> tuple[Tensor, Tensor]:
    """``(x[:B], x[B:])``, also for ``B = 0`` (where ``split`` would give a single chunk)."""
    return x[:half], x[half:]


def fused_linear_wpo_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None,
    ref_bias: Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    alignment: Alignment | str = "sampled",
    clamp_max: float | None = None,
    loss_type: str = "sigmoid",
    variant: str = "wpo",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    kto_kl: Tensor | float | None = None,
    backend: Backend = "auto",
    memory_budget: int | None = None,
) -> WPOLossOutput:
    """WPO loss straight from the LM head's input: one fused policy call gives the per-token log-probs
    and the alignment statistic; their per-sequence sums and :func:`wpo_weights` feed :func:`wpo_loss`.

    The reference log-probabilities are either passed in (``ref_chosen_logps``/``ref_rejected_logps``,
    e.g. precomputed) or computed here by a forward-only fused call (under ``no_grad``, nothing saved) on
    the reference head ``ref_weight``/``ref_bias`` applied to ``ref_hidden`` (the reference model's last
    hidden states; defaults to ``hidden``, i.e. a reference that shares the backbone). ``"simpo"`` needs
    neither. Gradients flow only through the policy log-probabilities: the weights and the reference
    are constants.

    A paired loss with gradients runs as one training step whose input gradients are formed during this
    call (:class:`LossWithGradients`); on the Triton backend chunks of whole pairs take the ``"one_pass"``
    route (three GEMMs per kept token, ``[rows, V]`` logits held) when they fit ``memory_budget``, else
    the ``"recompute"`` route (``benchmarks/README.md``, "The training step"). Tokens at ``ignore_index``
    never reach a GEMM.

    Args:
        hidden: ``[2B, T, H]``, the chosen sequences then the rejected ones (row ``i`` and ``B + i`` form
            pair ``i``), already shifted so that position ``t`` predicts ``targets[:, t]``.
        weight: ``[V, H]`` policy LM head; bias: ``[V]`` or None.
        targets: ``[2B, T]`` integer, ``ignore_index`` at prompt and padding positions.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` summed reference log-probs, or None.
        ref_hidden, ref_weight, ref_bias: the reference head, used when the ref log-probs are not given.
        temperature, softcap, logit_scale: the logit transform (see :func:`fused_linear_logprobs`); the
            same for policy, reference and weights.
        alignment, clamp_max: as in :func:`wpo_weights`.
        loss_type, variant, beta, label_smoothing, simpo_gamma, kto_kl: as in :func:`wpo_loss`.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        memory_budget: bytes of workspace the Triton training step may hold (None: 2 GiB,
            :data:`~wpo_kernels.kernels.launch_plan.DEFAULT_MEMORY_BUDGET`); 0 sends every pair to the
            recompute route. The torch fallback sizes its blocks by CPU threads instead.

    Returns:
        :class:`WPOLossOutput` (0-d ``loss``, detached metrics).

    Example:
        >>> out = fused_linear_wpo_loss(h, lm_head.weight, labels, ref_c, ref_r, beta=0.01)
        >>> out.loss.backward()
    """
    loss_type, variant, beta, label_smoothing, simpo_gamma = check_loss_options(
        loss_type, variant, beta, label_smoothing, simpo_gamma, kto_kl
    )
    align = parse_alignment(alignment)
    half = _check_layout(hidden, targets)
    targets = int64_targets(targets)  # before `targets != ignore_index`: a uint8 156 would equal -100
    budget = check_memory_budget(memory_budget)
    transform = LogitTransform(logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    _check_reference(loss_type, ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight, ref_bias)
    if ref_weight is not None and loss_type in _NEEDS_REF:
        ref_chosen_logps, ref_rejected_logps = _reference_logps(
            hidden if ref_hidden is None else ref_hidden,
            ref_weight,
            ref_bias,
            targets,
            transform,
            ignore_index,
            backend,
        )
    paired = _PairedLoss(
        half,
        targets != ignore_index,
        align,
        clamp_max,
        ref_chosen_logps,
        ref_rejected_logps,
        dict(
            loss_type=loss_type,
            variant=variant,
            beta=beta,
            label_smoothing=label_smoothing,
            simpo_gamma=simpo_gamma,
            kto_kl=kto_kl,
        ),
    )
    if loss_type != "kto" and half > 0 and needs_autograd(hidden, weight, bias):
        chosen = checked_backend(backend, hidden)
        validate_inputs(hidden, weight, targets, bias, ignore_index=ignore_index, transform=transform)
        return _one_pass_loss(paired, hidden, weight, bias, targets, transform, ignore_index, chosen, budget)
    policy = fused_linear_logprobs(
        hidden,
        weight,
        targets,
        bias=bias,
        ignore_index=ignore_index,
        outputs=_ALIGNMENT_OUTPUT[paired.align],
        backend=backend,
        temperature=temperature,
        softcap=softcap,
        logit_scale=logit_scale,
    )
    statistic = getattr(policy, paired.statistic_name) if paired.statistic_name is not None else None
    return paired.of_tokens(policy.logprobs, statistic)


def check_memory_budget(memory_budget: int | None) -> int:
    """``memory_budget`` as bytes (None: the default); ``TypeError`` / ``ValueError`` naming it."""
    if memory_budget is None:
        return DEFAULT_MEMORY_BUDGET
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int):
        raise TypeError(f"memory_budget must be an int (bytes) or None, got {memory_budget!r}")
    if memory_budget < 0:
        raise ValueError(f"memory_budget must be >= 0 bytes, got {memory_budget}")
    return memory_budget


def _check_reference(
    loss_type: str,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    ref_hidden: Tensor | None,
    ref_weight: Tensor | None,
    ref_bias: Tensor | None,
) -> None:
    """The reference arguments are consistent and present when ``loss_type`` needs them."""
    given = (ref_chosen_logps is not None, ref_rejected_logps is not None)
    if given[0] != given[1]:
        raise ValueError(
            "ref_chosen_logps and ref_rejected_logps must be given together, got "
            f"ref_chosen_logps={'a tensor' if given[0] else None}, "
            f"ref_rejected_logps={'a tensor' if given[1] else None}"
        )
    if all(given) and ref_weight is not None:
        raise ValueError("pass either ref_chosen_logps/ref_rejected_logps or ref_weight, got both")
    if ref_weight is None and (ref_hidden is not None or ref_bias is not None):
        raise ValueError("ref_hidden/ref_bias need ref_weight (the reference head), got ref_weight=None")
    if loss_type in _NEEDS_REF and not all(given) and ref_weight is None:
        raise ValueError(
            f"loss_type={loss_type!r} needs the reference: pass ref_chosen_logps and ref_rejected_logps, "
            "or ref_weight (and ref_hidden), got none of them"
        )


def _reference_logps(
    ref_input: Tensor,
    ref_weight: Tensor,
    ref_bias: Tensor | None,
    targets: Tensor,
    transform: LogitTransform,
    ignore_index: int,
    backend: Backend,
) -> tuple[Tensor, Tensor]:
    """The reference head's ``(chosen [B], rejected [B])`` summed log-probs: forward only, nothing saved."""
    with torch.no_grad():
        ref = fused_linear_logprobs(
            ref_input.detach(),
            ref_weight.detach(),
            targets,
            bias=None if ref_bias is None else ref_bias.detach(),
            ignore_index=ignore_index,
            backend=backend,
            temperature=transform.temperature,
            softcap=transform.softcap,
            logit_scale=transform.logit_scale,
        )
    return _halves(ref.logprobs.sum(dim=-1), targets.shape[0] // 2)


@dataclass
class _PairedLoss:
    """The loss of a ``[chosen; rejected]`` batch from its per-token log-probs: the weights, the loss
    (:func:`wpo_loss`), and the pairs' coefficients a training step asks for chunk by chunk
    (:meth:`coefficients`, a :data:`~wpo_kernels.pair_layout.PairCoefficients`)."""

    half: int
    mask: Tensor  # [2B, T]
    align: Alignment
    clamp_max: float | None
    ref_chosen: Tensor | None
    ref_rejected: Tensor | None
    options: dict
    whole_batch: list[WPOLossOutput] = field(default_factory=list)  # the loss, when one chunk was all

    @property
    def statistic_name(self) -> str | None:
        return _ALIGNMENT_OUTPUT[self.align][0] if _ALIGNMENT_OUTPUT[self.align] else None

    def weights(self, logprobs: Tensor, statistic: Tensor | None, seq_mask: Tensor) -> Tensor:
        stats = {"log_max_prob": None, "log_sum_sq_probs": None}
        if self.statistic_name is not None:
            stats[self.statistic_name] = statistic
        return wpo_weights(
            logprobs,
            stats["log_max_prob"],
            stats["log_sum_sq_probs"],
            seq_mask,
            self.align,
            clamp_max=self.clamp_max,
        )

    def loss(
        self,
        logps: Tensor,
        weights: Tensor,
        seq_mask: Tensor,
        ref_c: Tensor | None,
        ref_r: Tensor | None,
        metrics: bool = True,
    ) -> WPOLossOutput:
        """The loss of ``[chosen; rejected]`` per-sequence log-probs ``logps`` and weights ``[2P]``."""
        pairs = logps.shape[0] // 2
        chosen_lengths, rejected_lengths = _halves(seq_mask.sum(dim=-1), pairs)
        return wpo_loss(
            *_halves(logps, pairs),
            ref_c,
            ref_r,
            *_halves(weights, pairs),
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            metrics=metrics,
            **self.options,
        )

    def of_tokens(self, logprobs: Tensor, statistic: Tensor | None) -> WPOLossOutput:
        """The whole batch's loss from per-token ``[2B, T]`` log-probs (and alignment statistic)."""
        weights = self.weights(logprobs, statistic, self.mask)
        return self.loss(logprobs.sum(dim=-1), weights, self.mask, self.ref_chosen, self.ref_rejected)

    def coefficients(self, first: int, last: int, logprobs: Tensor, statistic: Tensor | None) -> Tensor:
        """``[2, P]``: dL/d(each kept token's log-prob) in pairs ``[first, last)`` (chosen, rejected), from
        the batch's ``[2B, T]`` log-probs; when the pairs are the whole batch its loss is kept."""
        rows = [*range(first, last), *range(self.half + first, self.half + last)]
        logprobs = logprobs[rows]
        seq_logps = logprobs.sum(dim=-1).requires_grad_()
        whole = (first, last) == (0, self.half)
        with warnings.catch_warnings():
            if not whole:
                warnings.simplefilter("ignore", RuntimeWarning)  # the whole batch's weights warn below
            weights = self.weights(logprobs, None if statistic is None else statistic[rows], self.mask[rows])
        with torch.enable_grad():
            out = self.loss(
                seq_logps,
                weights,
                self.mask[rows],
                _pick(self.ref_chosen, first, last),
                _pick(self.ref_rejected, first, last),
                metrics=whole,
            )
        (grad,) = torch.autograd.grad(out.loss, seq_logps)
        if whole:
            self.whole_batch.append(WPOLossOutput(loss=out.loss.detach(), metrics=out.metrics))
        # L averages over the B pairs, this loss over these P
        return (grad * ((last - first) / self.half)).view(2, last - first)


def _one_pass_loss(
    paired: _PairedLoss,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    transform: LogitTransform,
    ignore_index: int,
    backend: str,
    memory_budget: int,
) -> WPOLossOutput:
    """The training step: gradients formed chunk by chunk of whole pairs while the logits are in hand
    (the torch fallback, or the Triton routes), then handed to autograd through :class:`LossWithGradients`."""
    need_grad = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    # the gradients are formed by hand in there; autocast off, as in fused_linear_logprobs
    with torch.no_grad(), autocast_disabled(hidden.device):
        if backend == "torch":
            step = one_pass_pair_step(
                hidden,
                weight,
                bias,
                targets,
                transform,
                ignore_index,
                paired.statistic_name,
                paired.coefficients,
                need_grad=need_grad,
            )
        else:
            layout = pair_layout(targets, ignore_index)
            plan = plan_step(layout, weight, bias, transform, memory_budget, need_grad)
            step = triton_pair_step(
                hidden,
                weight,
                bias,
                targets,
                transform,
                layout,
                plan,
                paired.statistic_name,
                paired.coefficients,
            )
        out = paired.whole_batch[0] if paired.whole_batch else paired.of_tokens(step.logprobs, step.statistic)
    loss = LossWithGradients.apply(
        out.loss, hidden, weight, bias, step.grad_hidden, step.grad_weight, step.grad_bias
    )
    return WPOLossOutput(loss=loss, metrics=out.metrics)


def _pick(per_pair: Tensor | None, first: int, last: int) -> Tensor | None:
    """``per_pair[first:last]``, or None."""
    return None if per_pair is None else per_pair[first:last]


class LossWithGradients(torch.autograd.Function):
    """A loss whose input gradients were formed in its forward (:func:`one_pass_pair_step`): the backward
    only scales them by the upstream gradient and casts them to the inputs' dtypes."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss.clone()

    @staticmethod
    @first_order_backward
    def backward(ctx, grad_loss: Tensor):
        unit = bool(grad_loss == 1)
        grads = tuple(
            None if g is None or not needed else (g if unit else g * grad_loss).to(dtype)
            for g, needed, dtype in zip(ctx.saved_tensors, ctx.needs_input_grad[1:4], ctx.dtypes, strict=True)
        )
        return (None, *grads, None, None, None)


class FusedLinearWPOLoss(nn.Module):
    """:func:`fused_linear_wpo_loss` as a module, in the style of Liger's ``LigerFusedLinearDPOLoss``:
    options at construction (validated there), tensors at call time.

    ``forward(lin_weight, hidden, targets, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None,
    ref_chosen_logps=None, ref_rejected_logps=None, kto_kl=None) -> WPOLossOutput`` with
    ``hidden [2B, T, H]`` and ``targets [2B, T]`` laid out ``[chosen; rejected]``.

    Example:
        >>> loss_fn = FusedLinearWPOLoss(beta=0.01, variant="wpo", alignment="sampled")
        >>> out = loss_fn(model.lm_head.weight, hidden, labels, ref_weight=ref_model.lm_head.weight,
        ...               ref_hidden=ref_hidden)
    """

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        variant: str = "wpo",
        alignment: Alignment | str = "sampled",
        clamp_max: float | None = None,
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        temperature: float = 1.0,
        softcap: float | None = None,
        logit_scale: float = 1.0,
        backend: Backend = "auto",
        memory_budget: int | None = None,
    ) -> None:
        super().__init__()
        check_loss_options(loss_type, variant, beta, label_smoothing, simpo_gamma)
        check_memory_budget(memory_budget)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        self.options = dict(
            ignore_index=ignore_index,
            beta=beta,
            loss_type=loss_type,
            variant=variant,
            alignment=parse_alignment(alignment),
            clamp_max=clamp_max,
            label_smoothing=label_smoothing,
            simpo_gamma=simpo_gamma,
            temperature=temperature,
            softcap=softcap,
            logit_scale=logit_scale,
            backend=backend,
            memory_budget=memory_budget,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())

    def forward(
        self,
        lin_weight: Tensor,
        hidden: Tensor,
        targets: Tensor,
        bias: Tensor | None = None,
        ref_hidden: Tensor | None = None,
        ref_weight: Tensor | None = None,
        ref_bias: Tensor | None = None,
        ref_chosen_logps: Tensor | None = None,
        ref_rejected_logps: Tensor | None = None,
        kto_kl: Tensor | float | None = None,
    ) -> WPOLossOutput:
        """The loss for ``hidden [2B, T, H]`` / ``targets [2B, T]`` laid out ``[chosen; rejected]`` under the
        head ``lin_weight [V, H]`` (+ ``bias``); the reference as in :func:`fused_linear_wpo_loss`.

        Example:
            >>> out = loss_fn(lm_head.weight, hidden, labels, ref_chosen_logps=rc, ref_rejected_logps=rr)
        """
        return fused_linear_wpo_loss(
            hidden,
            lin_weight,
            targets,
            ref_chosen_logps,
            ref_rejected_logps,
            bias=bias,
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            ref_bias=ref_bias,
            kto_kl=kto_kl,
            **self.options,
        )
