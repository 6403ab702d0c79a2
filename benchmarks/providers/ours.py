"""Ours: :func:`wpo_kernels.fused_linear_logprobs` (Triton on a GPU, the chunked torch fallback on a CPU)
and :func:`wpo_kernels.fused_linear_wpo_loss` for the step.

The step's routes that get timed are listed once, in :data:`STEP_ROUTES`: the first is the provider
``ours`` itself, every other one is a step-only provider ``ours-<route>`` (:func:`step_route_providers`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from benchmarks.harness import IGNORE_INDEX, StepInputs
from benchmarks.providers.base import Mode, PerToken, Provider
from benchmarks.shapes import Head

#: ``(route name, extra keyword arguments of fused_linear_wpo_loss)`` for each variant of our step that is
#: timed; the first is the default call (provider ``ours``), the others become providers ``ours-<name>``.
#: ``recompute``: a budget of 0 sends every pair to the recompute route (the one-pass route's baseline).
STEP_ROUTES: tuple[tuple[str, dict[str, object]], ...] = (
    ("default", {}),
    ("recompute", {"memory_budget": 0}),
)


class Ours(Provider):
    name = "ours"
    label = "ours"
    peer = "ours"

    def __init__(
        self,
        device: str,
        backend: str | None = None,
        route: tuple[str, dict[str, object]] = STEP_ROUTES[0],
    ) -> None:
        """``backend``: ``"triton"`` or ``"torch"``; default Triton on CUDA, the torch fallback elsewhere
        (explicit, so that ``TRITON_INTERPRET`` never turns a CPU run into the interpreter unasked).
        ``route``: the step's entry of :data:`STEP_ROUTES`."""
        super().__init__(device)
        self.backend = backend or ("triton" if device == "cuda" else "torch")
        where = {"cuda": "Triton", "cpu": "Triton interpreter"} if self.backend == "triton" else {}
        self.label = f"ours ({where.get(device, 'torch fallback')})"
        self.route_name, self.route_kwargs = route
        if self.route_name != STEP_ROUTES[0][0]:
            self.name = f"ours-{self.route_name}"
            self.label += f" [{self.route_name}]"
            self.modes = ("step",)

    def supports(self, mode: Mode, head: Head) -> tuple[bool, str]:
        if mode not in self.modes:
            return False, f"a route of the step only ({self.route_name})"
        return True, ""

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
                **self.route_kwargs,
            )
            out.loss.backward()
            return out.loss.detach()

        return step


def step_route_providers(device: str, backend: str | None = None) -> list[Provider]:
    """One step-only provider per route of :data:`STEP_ROUTES` after the default (which is ``ours``)."""
    return [Ours(device, backend, route) for route in STEP_ROUTES[1:]]
