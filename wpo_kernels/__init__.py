"""wpo-kernels: fused LM-head kernels for Weighted Preference Optimization."""

from wpo_kernels.linear_logprobs import fused_linear_logprobs
from wpo_kernels.types import OUTPUT_NAMES, LogitTransform, LogprobOutput

__all__ = ["OUTPUT_NAMES", "LogitTransform", "LogprobOutput", "fused_linear_logprobs"]
