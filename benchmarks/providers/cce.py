"""Apple's Cut Cross-Entropy, ``linear_cross_entropy(..., reduction="none")``: per-token ``-log p`` only
(no ``log Σ_v p_v²``, so its step is the unweighted DPO loss). Optional: benchmarked where the package
is installed (``pip install cut-cross-entropy``, or a carried wheel on the GPU machine). Its Triton
kernels need CUDA (they fail in the Triton interpreter); on a CPU its ``torch_compile`` impl materialises
the logits, so a plain CPU run skips it. The GPU-evidence dry run uses :class:`CutCrossEntropyCPUStandIn`.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator

from torch import Tensor

from benchmarks.harness import IGNORE_INDEX
from benchmarks.providers.base import PerToken, Provider
from benchmarks.shapes import Head


class CutCrossEntropy(Provider):
    name = "cce"
    label = "Cut Cross-Entropy (logprobs only)"
    peer = "cce"
    step_loss = "dpo"
    #: ``linear_cross_entropy``'s ``impl``.
    impl = "cce"

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("cut_cross_entropy") is None:
            return False, "cut-cross-entropy is not installed (optional: pip install cut-cross-entropy)"
        if self.device != "cuda" and self.impl == "cce":
            return False, "CCE's kernels need CUDA (on a CPU its torch_compile impl materialises the logits)"
        try:
            from cut_cross_entropy import linear_cross_entropy  # noqa: F401
        except Exception as e:
            return False, f"cut_cross_entropy does not import: {type(e).__name__}: {e}"
        return True, ""

    def _context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def per_token(
        self, hidden: Tensor, weight: Tensor, targets: Tensor, head: Head, *, masked: bool
    ) -> PerToken:
        from cut_cross_entropy import linear_cross_entropy

        with self._context():
            nll = linear_cross_entropy(
                hidden,
                weight,
                targets,
                ignore_index=IGNORE_INDEX,
                softcap=head.softcap,
                reduction="none",
                impl=self.impl,
            )
        return -nll.float(), None


class CutCrossEntropyCPUStandIn(CutCrossEntropy):
    """CCE's own CPU-capable implementation, for the dry run only: ``impl="torch_compile"`` with its
    ``torch.compile`` wrapper bypassed (eager; compiling costs ~25 s per shape on a CPU). It materialises
    the logits, so its numbers say nothing about CCE: the dry run checks the plumbing (call, masking,
    correctness gate, schema), not speed."""

    label = "CCE torch_compile impl, eager (CPU stand-in)"
    impl = "torch_compile"
    stand_in = (
        "impl='torch_compile' run eagerly: CCE's Triton kernels fail in the Triton interpreter "
        "(InterpreterError in _cce_lse_forward_kernel), and compiling costs ~25 s per shape on a CPU"
    )

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        import cut_cross_entropy.torch_compile as tc

        compiled = tc.torch_compile_linear_cross_entropy_apply
        tc.torch_compile_linear_cross_entropy_apply = compiled.__wrapped__
        try:
            yield
        finally:
            tc.torch_compile_linear_cross_entropy_apply = compiled
