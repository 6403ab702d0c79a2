"""Liger-Kernel's ``LigerFusedLinearDPOLoss``: the DPO step only (it has no WPO weighting and no
per-token API), chunked over pairs with the logits of one pair materialised at a time.

Asymmetries, stated in the tables: it computes the plain DPO loss (no ``log Σ_v p_v²``, no weights);
it cannot take precomputed reference log-probs (it would run a second, reference head itself), so it
runs with ``use_ref_model=False`` (reference log-probs 0, the same cost as subtracting constants); it
has no logit softcapping, so Gemma-2's head is skipped; on a CPU it runs eagerly (``compiled=False``:
``torch.compile`` there costs seconds per shape and ran slower than eager).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from torch import Tensor

from benchmarks.harness import IGNORE_INDEX, StepInputs
from benchmarks.providers.base import Mode, Provider
from benchmarks.shapes import Head


class LigerDPO(Provider):
    name = "liger"
    label = "Liger DPO (no WPO)"
    peer = "liger"
    modes = ("step",)
    step_loss = "dpo"
    takes_ref_logps = False

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("liger_kernel") is None:
            return False, "liger-kernel is not installed (pip install liger-kernel)"
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss  # noqa: F401
        except Exception as e:
            return False, f"liger_kernel.chunked_loss does not import: {type(e).__name__}: {e}"
        return True, ""

    def supports(self, mode: Mode, head: Head) -> tuple[bool, str]:
        if mode != "step":
            return False, "DPO loss only: no per-token log-prob API"
        if head.softcap is not None:
            return False, "no final-logit softcapping in LigerFusedLinearDPOLoss"
        return True, ""

    def make_step(self, inputs: StepInputs) -> Callable[[], Tensor]:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        loss_fn = LigerFusedLinearDPOLoss(
            ignore_index=IGNORE_INDEX,
            beta=inputs.beta,
            use_ref_model=False,
            compiled=self.device == "cuda",
            average_log_prob=False,
        )

        def step() -> Tensor:
            loss, _ = loss_fn(inputs.weight, inputs.hidden, inputs.targets)
            loss.backward()
            return loss.detach()

        return step
