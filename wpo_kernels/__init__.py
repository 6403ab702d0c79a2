"""wpo-kernels: fused LM-head kernels for Weighted Preference Optimization."""

from wpo_kernels.distributed import head_linear_logprobs, vocab_parallel_linear_logprobs
from wpo_kernels.fused_loss import FusedLinearWPOLoss, fused_linear_wpo_loss
from wpo_kernels.linear_logprobs import fused_linear_logprobs
from wpo_kernels.losses import WPOLossOutput, wpo_loss
from wpo_kernels.types import OUTPUT_NAMES, LogitTransform, LogprobOutput
from wpo_kernels.weights import Alignment, wpo_weights

__all__ = [
    "OUTPUT_NAMES",
    "Alignment",
    "FusedLinearWPOLoss",
    "LogitTransform",
    "LogprobOutput",
    "WPOLossOutput",
    "fused_linear_logprobs",
    "fused_linear_wpo_loss",
    "head_linear_logprobs",
    "vocab_parallel_linear_logprobs",
    "wpo_loss",
    "wpo_weights",
]
