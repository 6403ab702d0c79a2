"""Hugging Face causal LMs → the inputs of :func:`wpo_kernels.fused_linear_logprobs`.

A causal LM is a backbone (hidden states ``[B, T, H]``) followed by a head (``[V, H]`` weight, maybe a
bias, maybe a transform of the logits). This module splits a ``transformers`` model along that line, so
the per-token log-probabilities come from our fused kernel and the ``[B, T, V]`` logits never exist.

Model quirks are read from the (text) config the way TRL 1.16 reads them:

- Gemma-2/3 ``final_logit_softcapping`` → ``softcap``;
- Cohere ``logit_scale`` (also ``output_multiplier``, Falcon-H1 ``lm_head_multiplier``) → ``logit_scale``;
- Granite / MiniCPM3 ``logits_scaling`` → ``logit_scale = 1 / logits_scaling`` (HyperCLOVA X multiplies);
- tied embeddings need nothing: the head weight *is* the embedding matrix, gradients reach it once;
- a bias on the head (Phi, GPT-J) is passed through.

Heads stored across ranks are reached without gathering logits: a tensor-parallel head (a ``Shard(0)``
DTensor, e.g. the ``transformers`` tensor-parallel plan) is scored vocabulary-parallel; an FSDP2 or
DeepSpeed ZeRO-3 head is run inside its own module so the framework's hooks gather it (see
:attr:`CausalLMHead.layout`).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers.utils import ModelOutput

from wpo_kernels import LogitTransform, LogprobOutput, fused_linear_logprobs
from wpo_kernels.distributed import (
    dtensor_vocab_parallel_linear_logprobs,
    head_linear_logprobs,
    is_dtensor,
    is_zero3_partitioned,
)
from wpo_kernels.linear_logprobs import int64_targets

__all__ = [
    "CausalLMHead",
    "WPOHeadOutput",
    "add_wpo_lm_head",
    "backbone_of",
    "causal_lm_hidden_and_head",
    "head_layout",
    "head_transform",
    "lm_head_of",
    "remove_wpo_lm_head",
    "unwrap_causal_lm",
]

#: Keyword that switches a patched model's forward to the fused head (see :func:`add_wpo_lm_head`).
WPO_HEAD_KWARG = "wpo_head"
#: Batch keys that are not model inputs (TRL's collator adds them next to ``input_ids``).
_NON_MODEL_KEYS = frozenset({"completion_mask", "labels", "ref_chosen_logps", "ref_rejected_logps"})


def head_transform(config: Any, *, temperature: float = 1.0) -> LogitTransform:
    """The logit transform a model applies after its head, read from its (text) config.

    Args:
        config: a ``transformers.PretrainedConfig`` (multimodal configs: the text config is used).
        temperature: sampling temperature the logits are divided by (1.0 for training).

    Returns:
        :class:`~wpo_kernels.LogitTransform` with ``logit_scale``, ``softcap`` and ``temperature``.

    Example:
        >>> head_transform(Gemma2Config(final_logit_softcapping=30.0)).softcap
        30.0
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    # `logit_scale` is None on models that do not scale (e.g. MPT): read that as unscaled.
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if getattr(text_config, "model_type", None) == "hyperclovax" else 1.0 / scaling
    scale = 1.0 if scale is None else float(scale)
    return LogitTransform(
        logit_scale=scale, softcap=None if softcap is None else float(softcap), temperature=temperature
    )


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The ``transformers`` causal LM inside ``model``: strips DDP / ``torch.compile`` wrappers and a PEFT
    ``PeftModel`` (whose adapter layers stay injected in the returned model and stay active)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, DeepSpeed engines
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and hasattr(model, "peft_config"):  # PEFT
            model = model.get_base_model()
        else:
            return model


def backbone_of(model: nn.Module) -> nn.Module:
    """The module of a causal LM that returns ``last_hidden_state`` (``LlamaModel`` in a
    ``LlamaForCausalLM``), found through ``base_model_prefix`` like ``transformers`` does."""
    lm = unwrap_causal_lm(model)
    backbone = getattr(lm, "base_model", None)
    if backbone is None or backbone is lm:
        raise ValueError(
            f"cannot find the backbone of {type(lm).__name__}: expected a transformers causal LM whose "
            f"`base_model_prefix` names its decoder (e.g. `model` in LlamaForCausalLM)"
        )
    return backbone


HeadLayout = Literal["plain", "vocab_parallel", "sharded"]


def head_layout(weight: Tensor, owners: Sequence[nn.Module] = ()) -> HeadLayout:
    """How a head weight is stored across ranks, which decides how the fused call reaches it.

    - ``"vocab_parallel"``: a tensor-parallel DTensor, ``Shard(0)`` on one mesh dimension and
      ``Replicate()`` on the others (``transformers``' plan, ``ColwiseParallel``): each rank scores its
      vocabulary slice (:func:`~wpo_kernels.distributed.dtensor_vocab_parallel_linear_logprobs`);
    - ``"sharded"``: any other DTensor, one under FSDP2 (``fully_shard``: a 1-D FSDP mesh is ``Shard(0)``
      too, so a DTensor is never read as tensor parallel when ``owners`` holds an ``FSDPModule``), or a
      DeepSpeed ZeRO-3 partition: gathered by the head module's hooks
      (:func:`~wpo_kernels.distributed.head_linear_logprobs`);
    - ``"plain"``: a local tensor (single device, DDP, FSDP2 / ZeRO-3 inside an unsharding forward).

    ``owners``: the head module and the models holding it (wrappers included).
    """
    if is_zero3_partitioned(weight):
        return "sharded"
    if not is_dtensor(weight):
        return "plain"
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import Replicate, Shard

    if any(isinstance(m, FSDPModule) for m in owners):
        return "sharded"
    split = [p for p in weight.placements if not isinstance(p, Replicate)]
    if len(split) == 1 and isinstance(split[0], Shard) and split[0].dim in (0, -2):
        return "vocab_parallel"
    return "sharded"


@dataclass(frozen=True)
class CausalLMHead:
    """A causal LM's output layer as the fused kernel takes it (built by :func:`lm_head_of`).

    Attributes:
        weight: ``[V, H]`` head weight (the input embedding when tied), a live parameter.
        bias: ``[V]`` or None.
        transform: the model's logit transform (softcap, logit scale, temperature).
        module: the head module (``get_output_embeddings()``); needed for a ``"sharded"`` layout.
        layout: how ``weight`` is stored across ranks, see :func:`head_layout`.
    """

    weight: Tensor
    bias: Tensor | None
    transform: LogitTransform
    module: nn.Module | None = None
    layout: HeadLayout = "plain"

    def logprobs(
        self,
        hidden: Tensor,
        targets: Tensor,
        *,
        outputs: Sequence[str] = ("logprobs",),
        ignore_index: int = -100,
        backend: str = "auto",
    ) -> LogprobOutput:
        """Per-token ``log p(targets | hidden)`` (and requested statistics) without ``[..., V]`` logits.

        Args:
            hidden: ``[..., H]`` hidden states; cast to the head's dtype (or the autocast dtype; a
                ``"sharded"`` head, gathered inside its own forward, computes in its parameters' dtype).
                Replicated over the tensor-parallel group for a ``"vocab_parallel"`` head.
            targets: ``[...]`` integer token ids, ``ignore_index`` where nothing is scored.
            outputs / ignore_index / backend: as in :func:`wpo_kernels.fused_linear_logprobs`.

        Returns:
            :class:`~wpo_kernels.LogprobOutput` of ``[...]`` float32 tensors.

        Example:
            >>> head.logprobs(hidden[:, :-1], input_ids[:, 1:], outputs=("log_sum_sq_probs",))
        """
        weight, bias, transform = self.weight, self.bias, self.transform
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type) and self.layout != "sharded":
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = weight.dtype
        options = dict(
            ignore_index=ignore_index,
            temperature=transform.temperature,
            softcap=transform.softcap,
            logit_scale=transform.logit_scale,
            outputs=outputs,
            backend=backend,
        )
        hidden, targets = hidden.to(device=weight.device, dtype=dtype), targets.to(weight.device)
        if self.layout == "sharded" and self.module is None:
            raise ValueError("a sharded head (FSDP2, ZeRO-3) runs through its module: use lm_head_of")
        # The fused kernel runs outside autocast on explicit dtypes, like autocast would run a Linear.
        with torch.autocast(device_type, enabled=False):
            if self.layout == "sharded":  # gathered by the module's own hooks, in the module's dtype
                return head_linear_logprobs(self.module, hidden, targets, **options)
            if self.layout == "vocab_parallel":
                fused = dtensor_vocab_parallel_linear_logprobs
            else:
                fused = fused_linear_logprobs
            bias = None if bias is None else bias.to(dtype)
            return fused(hidden, weight.to(dtype), targets, bias=bias, **options)


def lm_head_of(model: nn.Module, *, temperature: float = 1.0) -> CausalLMHead:
    """The :class:`CausalLMHead` of a causal LM (``get_output_embeddings()`` plus the config's quirks).

    Raises ``ValueError`` for heads the kernel cannot take (not a ``[V, H]`` linear map, or a PEFT adapter
    on the head, whose low-rank update would be skipped).
    """
    lm = unwrap_causal_lm(model)
    head = lm.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(lm).__name__} has no output embeddings (get_output_embeddings() is None)")
    if hasattr(head, "base_layer") and hasattr(head, "lora_A"):
        raise ValueError(
            "a PEFT adapter on the LM head is not supported: the kernel reads the head weight directly, so "
            "the adapter would be ignored. Remove 'lm_head' from the adapter's target_modules."
        )
    weight = getattr(head, "weight", None)
    # a ZeRO-3 partitioned parameter is an empty placeholder; its full shape is `ds_shape`
    if not isinstance(weight, Tensor) or len(getattr(weight, "ds_shape", weight.shape)) != 2:
        raise ValueError(f"the LM head of {type(lm).__name__} must have a [V, H] weight, got {type(head)}")
    bias = getattr(head, "bias", None)
    transform = head_transform(lm.config, temperature=temperature)
    layout = head_layout(weight, (head, lm, model))
    return CausalLMHead(weight=weight, bias=bias, transform=transform, module=head, layout=layout)


def causal_lm_hidden_and_head(
    model: nn.Module, batch: Mapping[str, Any], *, temperature: float = 1.0
) -> tuple[Tensor, CausalLMHead]:
    """Run a causal LM's backbone only: last hidden states and the head to score them with.

    For custom training loops; the ``[B, T, V]`` logits are never built. Shift yourself: position ``t``
    predicts token ``t + 1``.

    Args:
        model: a ``transformers`` causal LM, or a PEFT / DDP wrapper of one.
        batch: model inputs, at least ``input_ids [B, T]`` (long); ``attention_mask [B, T]`` and other
            forward keywords are passed on; ``completion_mask``/``labels``/``ref_*_logps`` are dropped.
        temperature: divides the logits (1.0 for training).

    Returns:
        ``hidden [B, T, H]`` in the backbone's dtype and a :class:`CausalLMHead`.

    Example:
        >>> hidden, head = causal_lm_hidden_and_head(model, batch)
        >>> labels = batch["input_ids"][:, 1:].masked_fill(batch["completion_mask"][:, 1:] == 0, -100)
        >>> logps = head.logprobs(hidden[:, :-1], labels).logprobs.sum(-1)  # [B]
    """
    kwargs = {k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS}
    kwargs["use_cache"] = False
    out = backbone_of(model)(**kwargs)
    return out.last_hidden_state, lm_head_of(model, temperature=temperature)


@dataclass
class WPOHeadOutput(ModelOutput):
    """What a model patched by :func:`add_wpo_lm_head` returns with ``wpo_head=True``.

    Every tensor is ``[B, T - 1]`` float32, aligned with ``labels[:, 1:]`` (position ``t`` scores token
    ``t + 1``) and 0 where the label is ``-100``. ``logprobs`` is differentiable; the rest is detached.
    ``mask`` is the bool ``labels[:, 1:] != -100``.
    """

    logprobs: Tensor | None = None
    log_max_prob: Tensor | None = None
    log_sum_sq_probs: Tensor | None = None
    entropy: Tensor | None = None
    mask: Tensor | None = None


def _scatter(values: Tensor | None, mask: Tensor) -> Tensor | None:
    # masked_scatter keeps an all-masked batch connected to the graph (a differentiable zero)
    return None if values is None else values.new_zeros(mask.shape).masked_scatter(mask, values)


def add_wpo_lm_head(
    model: nn.Module,
    *,
    outputs: Sequence[str] = ("logprobs",),
    backend: str = "auto",
    temperature: float = 1.0,
) -> None:
    """Patch ``model.forward`` so that ``model(..., labels=labels, wpo_head=True)`` returns a
    :class:`WPOHeadOutput` computed by the fused kernel instead of logits.

    Going through ``model(...)`` (rather than calling the backbone directly) keeps DDP, DeepSpeed and PEFT
    wrappers in the path: they all end in this forward. Only positions whose next-token label is not
    ``-100`` are sent to the head. Without ``wpo_head=True`` the original forward runs (generation is
    unchanged). Patch the ``transformers`` model itself (for PEFT: ``peft_model.get_base_model()``).

    Args:
        model: a ``transformers`` causal LM (not a wrapper).
        outputs: statistics to compute besides ``logprobs`` (names as in ``fused_linear_logprobs``); a call
            may override them with ``wpo_outputs=(...)``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        temperature: divides the logits.

    Example:
        >>> add_wpo_lm_head(model, outputs=("log_sum_sq_probs",))
        >>> out = model(input_ids=ids, attention_mask=am, labels=labels, wpo_head=True)
        >>> out.logprobs.shape  # [B, T - 1]
    """
    remove_wpo_lm_head(model)
    default_outputs = tuple(outputs)

    @functools.wraps(type(model).forward)
    def _forward(self: nn.Module, *args: Any, labels: Tensor | None = None, **kwargs: Any) -> Any:
        fused = kwargs.pop(WPO_HEAD_KWARG, False)
        wanted = tuple(kwargs.pop("wpo_outputs", None) or default_outputs)
        if not fused:
            if labels is not None:
                kwargs["labels"] = labels
            return self._wpo_original_forward(*args, **kwargs)
        if labels is None:
            raise ValueError(f"{WPO_HEAD_KWARG}=True needs labels [B, T] (-100 where nothing is scored)")
        kwargs["use_cache"] = False
        hidden = backbone_of(self)(*args, **kwargs).last_hidden_state
        head = lm_head_of(self, temperature=temperature)
        # Prompt-learning PEFT prepends virtual tokens: keep the positions of the real ones.
        hidden = hidden[:, -labels.shape[1] : -1].to(head.weight.device)
        # int64 before comparing: in uint8, token 156 equals -100 (mod 256)
        targets = int64_targets(labels[:, 1:]).to(head.weight.device)
        mask = targets != -100
        per_token = head.logprobs(hidden[mask], targets[mask], outputs=wanted, backend=backend)
        extra = {name: _scatter(getattr(per_token, name), mask) for name in wanted if name != "logprobs"}
        return WPOHeadOutput(logprobs=_scatter(per_token.logprobs, mask), mask=mask, **extra)

    # stored on the instance (not closed over) so that a deepcopy of the model calls its own forward
    model._wpo_original_forward = model.forward
    model.forward = types.MethodType(_forward, model)


def remove_wpo_lm_head(model: nn.Module) -> None:
    """Undo :func:`add_wpo_lm_head` (no-op on a model that is not patched)."""
    original = model.__dict__.pop("_wpo_original_forward", None)
    if original is not None:
        if getattr(original, "__self__", None) is model and original.__func__ is type(model).forward:
            model.__dict__.pop("forward", None)
        else:
            model.forward = original
