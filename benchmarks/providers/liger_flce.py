"""Liger-Kernel's fused linear cross-entropy, ``LigerFusedLinearCrossEntropyLoss(reduction="none")``:
per-token ``-log p`` in row chunks (its forward computes the gradients too; with ``reduction="none"`` its
backward recomputes them to fold in the per-token upstream gradient). No ``log Σ_v p_v²``, so its step is
the unweighted DPO loss. Its kernels are Triton: CUDA, or the Triton interpreter on a CPU (the dry run of
``benchmarks.gpu_evidence``); on a plain CPU run it is skipped.
"""

from __future__ import annotations

import importlib.util
import os

from torch import Tensor

from benchmarks.harness import IGNORE_INDEX
from benchmarks.providers.base import PerToken, Provider
from benchmarks.shapes import Head


class LigerFLCE(Provider):
    name = "liger-flce"
    label = "Liger fused linear CE (logprobs only)"
    peer = "liger"
    step_loss = "dpo"

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("liger_kernel") is None:
            return False, "liger-kernel is not installed (pip install liger-kernel)"
        if self.device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return False, "Liger's cross-entropy kernel is Triton: CUDA, or TRITON_INTERPRET=1 on a CPU"
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # noqa: F401
        except Exception as e:
            return False, f"liger_kernel.transformers does not import: {type(e).__name__}: {e}"
        return True, ""

    def per_token(
        self, hidden: Tensor, weight: Tensor, targets: Tensor, head: Head, *, masked: bool
    ) -> PerToken:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss(
            ignore_index=IGNORE_INDEX, reduction="none", softcap=head.softcap
        )
        nll = loss_fn(weight, hidden, targets)
        return -nll.float(), None
