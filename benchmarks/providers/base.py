"""The interface every implementation is benchmarked through, and the pieces they share.

A provider turns inputs into a zero-argument callable for each mode; the harness times and measures
the callable and never looks inside. Modes:

- ``forward``: per-token ``logprobs`` (and ``log Σ_v p_v²`` where the implementation offers it), no
  autograd graph;
- ``forward_backward``: the same, then ``logprobs.backward(grad_out)`` into ``hidden`` and ``weight``;
- ``step``: a full preference-loss step on ``[chosen; rejected]`` sequences: per-token log-probs →
  per-sequence sums (and WPO weights) → sigmoid loss → ``backward()``. ``step_loss`` says which loss:
  ``"wpo"`` (pair-weighted by ``w_chosen · w_rejected``, TRL 1.16's ``use_weighting`` formula) or
  ``"dpo"`` (no weights: implementations that cannot give ``log Σ_v p_v²``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.harness import IGNORE_INDEX, OpInputs, StepInputs
from benchmarks.shapes import Head

Mode = Literal["forward", "forward_backward", "step"]
MODES: tuple[Mode, ...] = ("forward", "forward_backward", "step")
#: ``(logprobs [N], log_sum_sq_probs [N] or None)``; logprobs are 0 where the target is ignored.
PerToken = tuple[Tensor, Tensor | None]


class Provider:
    """One implementation behind the common harness.

    Subclasses set ``name`` (row key), ``label`` (table header), ``modes`` and ``step_loss``, and either
    implement :meth:`per_token` (the three modes are then built from it) or override the ``make_*``
    methods they support.
    """

    name: str = ""
    label: str = ""
    #: The project a provider stands for (``ours``, ``torch``, ``trl``, ``liger``, ``cce``): several providers
    #: (Liger's two APIs, our step's routes) share one; empty means ``name``.
    peer: str = ""
    modes: tuple[Mode, ...] = MODES
    step_loss: Literal["wpo", "dpo"] = "wpo"
    #: False where the implementation cannot take precomputed reference log-probs (they count as 0).
    takes_ref_logps: bool = True

    def __init__(self, device: str) -> None:
        self.device = device
        self.peer = self.peer or self.name

    def available(self) -> tuple[bool, str]:
        """``(True, "")``, or ``(False, why)`` when the package is missing or cannot run on this device."""
        return True, ""

    def supports(self, mode: Mode, head: Head) -> tuple[bool, str]:
        """Whether this provider runs ``mode`` on ``head``; the reason is printed and stored if not."""
        if mode not in self.modes:
            return False, f"no {mode} API"
        return True, ""

    def per_token(
        self, hidden: Tensor, weight: Tensor, targets: Tensor, head: Head, *, masked: bool
    ) -> PerToken:
        """Per-token outputs for ``hidden [N, H]``; ``masked`` says some targets are ``IGNORE_INDEX``."""
        raise NotImplementedError

    def make_forward(self, inputs: OpInputs) -> Callable[[], PerToken]:
        """Forward only: per-token outputs without an autograd graph."""
        h, w, t, head = inputs.hidden, inputs.weight, inputs.targets, inputs.head

        def forward() -> PerToken:
            with torch.no_grad():
                return self.per_token(h, w, t, head, masked=False)

        return forward

    def make_forward_backward(self, inputs: OpInputs) -> Callable[[], Tensor]:
        """Forward, then ``logprobs.backward(grad_out)``; leaves the gradients in ``inputs.leaves``."""
        h, w, t, g, head = inputs.hidden, inputs.weight, inputs.targets, inputs.grad_out, inputs.head

        def forward_backward() -> Tensor:
            logprobs, _ = self.per_token(h, w, t, head, masked=False)
            logprobs.backward(g.to(logprobs.dtype))
            return logprobs.detach()

        return forward_backward

    def make_step(self, inputs: StepInputs) -> Callable[[], Tensor]:
        """One loss step (``step_loss``), ``backward()`` included; returns the detached loss."""
        h, w, t, head = inputs.hidden, inputs.weight, inputs.targets, inputs.head
        weighted = self.step_loss == "wpo"

        def step() -> Tensor:
            logprobs, lssp = self.per_token(h.reshape(-1, h.shape[-1]), w, t.reshape(-1), head, masked=True)
            loss = preference_loss(
                logprobs.reshape(t.shape),
                lssp.reshape(t.shape) if weighted and lssp is not None else None,
                inputs.mask,
                inputs.ref_chosen,
                inputs.ref_rejected,
                inputs.beta,
            )
            loss.backward()
            return loss.detach()

        return step


def preference_loss(
    logprobs: Tensor,
    log_sum_sq_probs: Tensor | None,
    mask: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
) -> Tensor:
    """Sigmoid DPO loss on ``[chosen; rejected]`` sequences, pair-weighted by WPO weights when
    ``log_sum_sq_probs`` is given: TRL 1.16's ``DPOTrainer`` with ``use_weighting=True``, in plain torch.

    ``logprobs``/``log_sum_sq_probs``/``mask``: ``[2B, T]``; ``ref_*``: ``[B]``. Returns a 0-d loss.
    """
    mask = mask.to(logprobs.dtype)
    seq = (logprobs * mask).sum(1)
    chosen, rejected = seq.chunk(2)
    losses = -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))
    if log_sum_sq_probs is not None:
        with torch.no_grad():
            # Eq. (2) of the WPO paper: w = exp(mean_t [log p(y_t) - log Σ_v p_v²])
            aligned = ((logprobs - log_sum_sq_probs) * mask).sum(1) / mask.sum(1).clamp(min=1)
            w_chosen, w_rejected = torch.exp(aligned).chunk(2)
        losses = losses * w_chosen * w_rejected
    return losses.mean()


def scatter_rows(values: Tensor, mask: Tensor) -> Tensor:
    """``[mask.sum()]`` values back to ``[N]`` (0 elsewhere), keeping the graph (as TRL does)."""
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def safe_targets(targets: Tensor) -> tuple[Tensor, Tensor]:
    """``(targets with IGNORE_INDEX replaced by 0, ignored mask)``."""
    ignored = targets == IGNORE_INDEX
    return torch.where(ignored, torch.zeros_like(targets), targets), ignored
