"""Ours: :func:`wpo_kernels.fused_linear_logprobs` (Triton on a GPU, the chunked torch fallback on a CPU)
and :func:`wpo_kernels.fused_linear_wpo_loss` for the step."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from benchmarks.harness import IGNORE_INDEX, StepInputs
from benchmarks.providers.base import PerToken, Provider
from benchmarks.shapes import Head


class Ours(Provider):
    name = "ours"
    label = "ours"

    def __init__(self, device: str) -> None:
        super().__init__(device)
        # explicit, so that TRITON_INTERPRET in the environment never turns a CPU run into the interpreter
        self.backend = "triton" if device == "cuda" else "torch"
        self.label = "ours (Triton)" if device == "cuda" else "ours (torch fallback)"

    def per_token(
        self, hidden: Tensor, weight: Tensor, targets: Tensor, head: Head, *, masked: bool
    ) -> PerToken:
        from wpo_kernels import fused_linear_logprobs

        out = fused_linear_logprobs(
            hidden,
            weight,
            targets,
            ignore_index=IGNORE_INDEX,
            softcap=head.softcap,
            outputs=("logprobs", "log_sum_sq_probs"),
            backend=self.backend,
        )
        return out.logprobs, out.log_sum_sq_probs

    def make_step(self, inputs: StepInputs) -> Callable[[], Tensor]:
        from wpo_kernels import fused_linear_wpo_loss

        def step() -> Tensor:
            out = fused_linear_wpo_loss(
                inputs.hidden,
                inputs.weight,
                inputs.targets,
                inputs.ref_chosen,
                inputs.ref_rejected,
                ignore_index=IGNORE_INDEX,
                softcap=inputs.head.softcap,
                alignment="sampled",
                loss_type="sigmoid",
                variant="wpo",
                beta=inputs.beta,
                backend=self.backend,
            )
            out.loss.backward()
            return out.loss.detach()

        return step
