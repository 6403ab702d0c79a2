"""TRL 1.16's ``trl.kernels.chunked_logprob.ChunkedLogProbFunction`` with ``log_sum_sq_probs``, called as
``DPOTrainer`` calls it (``use_weighting=True``): cuBLAS tiles of ``[4096, chunk_size]`` folded by a
Triton kernel on a GPU, by torch ops on a CPU; in the step, only the completion tokens are scored."""

from __future__ import annotations

import importlib.util

from torch import Tensor

from benchmarks.harness import IGNORE_INDEX
from benchmarks.providers.base import PerToken, Provider, scatter_rows
from benchmarks.shapes import Head


class TRLChunked(Provider):
    name = "trl"
    label = "TRL 1.16 ChunkedLogProb"

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("trl") is None:
            return False, "trl is not installed (pip install 'trl>=1.16,<1.17')"
        try:
            from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # noqa: F401
        except Exception as e:  # an incompatible version fails at import
            return False, f"trl.kernels.chunked_logprob does not import: {type(e).__name__}: {e}"
        return True, ""

    def per_token(
        self, hidden: Tensor, weight: Tensor, targets: Tensor, head: Head, *, masked: bool
    ) -> PerToken:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        if masked:
            # DPOTrainer scores only the valid positions (hidden_states[mask]) and scatters back
            mask = targets != IGNORE_INDEX
            hidden, targets = hidden[mask], targets[mask]
        logprobs, _, log_sum_sq_probs, _, _ = ChunkedLogProbFunction.apply(
            hidden, weight, None, targets, 1.0, head.trl_chunk_size, head.softcap, 1.0, ("log_sum_sq_probs",)
        )
        if masked:
            logprobs, log_sum_sq_probs = scatter_rows(logprobs, mask), scatter_rows(log_sum_sq_probs, mask)
        return logprobs, log_sum_sq_probs
