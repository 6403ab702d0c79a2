"""Apple's Cut Cross-Entropy, ``linear_cross_entropy(..., reduction="none")``: per-token ``-log p`` only
(no ``log Σ_v p_v²``, so its step is the unweighted DPO loss). Optional: benchmarked where the package
is installed (``pip install cut-cross-entropy``, or a carried wheel on the GPU machine). Its Triton
kernels need CUDA; on a CPU its ``torch_compile`` impl materialises the logits, so it is skipped there.
"""

from __future__ import annotations

import importlib.util

from torch import Tensor

from benchmarks.harness import IGNORE_INDEX
from benchmarks.providers.base import PerToken, Provider
from benchmarks.shapes import Head


class CutCrossEntropy(Provider):
    name = "cce"
    label = "Cut Cross-Entropy (logprobs only)"
    step_loss = "dpo"

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("cut_cross_entropy") is None:
            return False, "cut-cross-entropy is not installed (optional: pip install cut-cross-entropy)"
        if self.device != "cuda":
            return False, "CCE's kernels need CUDA (on a CPU its torch_compile impl materialises the logits)"
        try:
            from cut_cross_entropy import linear_cross_entropy  # noqa: F401
        except Exception as e:
            return False, f"cut_cross_entropy does not import: {type(e).__name__}: {e}"
        return True, ""

    def per_token(
        self, hidden: Tensor, weight: Tensor, targets: Tensor, head: Head, *, masked: bool
    ) -> PerToken:
        from cut_cross_entropy import linear_cross_entropy

        nll = linear_cross_entropy(
            hidden, weight, targets, ignore_index=IGNORE_INDEX, softcap=head.softcap, reduction="none"
        )
        return -nll.float(), None
