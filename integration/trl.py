"""Drop-in WPO for TRL: :class:`WPOConfig` and :class:`WPOTrainer` extend TRL 1.16's ``DPOConfig`` and
``DPOTrainer``.

What changes against ``DPOTrainer``:

- the per-token log-probabilities (policy and reference) come from :func:`wpo_kernels.fused_linear_logprobs`
  on the backbone's hidden states and ``get_output_embeddings()``, with the model's logit quirks
  (:mod:`wpo_kernels.integration.hf`); the ``[B, T, V]`` logits are never built. TRL's own fused LM head
  is not installed: ours takes its place, on the policy and the reference model;
- the loss is :func:`wpo_kernels.wpo_loss` with WPO weights from :func:`wpo_kernels.weights.wpo_weights`
  (``alignment``, ``wpo_variant``, ``weight_clamp``); ``wpo_variant="none"`` gives the unweighted loss,
  so the same trainer runs the DPO baseline;
- logged metrics add ``weights/{chosen,rejected,pair}_{mean,min,max}`` (and ``kl`` for KTO), and, with
  TensorBoard among the reporting integrations (``report_to="tensorboard"``), histograms of every pair's
  weights between two logs (``{train,eval}/weights/{chosen,rejected,pair}``).

Everything else (datasets, collator, PEFT with the adapter disabled as reference, a ``"ref"`` adapter copy,
``precompute_ref_log_probs``, ``sync_ref_model``, evaluation, logging) is TRL's.

Overridden public methods: ``compute_loss``, ``compute_ref_log_probs``, ``prediction_step``. The supported
TRL range is checked on import (:data:`SUPPORTED_TRL`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from packaging.version import Version
from torch import Tensor, nn

#: TRL versions this adapter is written against: ``DPOTrainer``'s internals change between minor releases.
SUPPORTED_TRL = (Version("1.16.0"), Version("1.17.0"))


def check_trl_version(version: str | None = None) -> None:
    """Raise ``ImportError`` unless ``version`` (default: the installed TRL) lies in :data:`SUPPORTED_TRL`."""
    if version is None:
        try:
            import trl
        except ImportError as e:
            raise ImportError(
                "wpo_kernels.integration.trl needs TRL: pip install 'wpo-kernels[trl]' (trl>=1.16,<1.17)"
            ) from e
        version = trl.__version__
    lo, hi = SUPPORTED_TRL
    try:
        ok = lo <= Version(version) < hi
    except Exception:  # noqa: BLE001 - an unparsable version string
        ok = False
    if not ok:
        raise ImportError(
            f"wpo_kernels.integration.trl supports trl>={lo},<{hi} (it extends DPOTrainer, whose internals "
            f"change between minor releases); found trl {version}. Install a supported one: "
            f"pip install 'trl>={lo},<{hi}'"
        )


check_trl_version()

import trl.trainer.dpo_trainer as _dpo_module  # noqa: E402
from accelerate.utils import is_peft_model  # noqa: E402
from transformers.integrations import TensorBoardCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402
from trl.trainer.utils import pad, use_adapter  # noqa: E402

from wpo_kernels.autograd import BACKENDS as _BACKENDS  # noqa: E402
from wpo_kernels.fused_loss import check_memory_budget  # noqa: E402
from wpo_kernels.integration.hf import WPOHeadOutput, add_wpo_lm_head  # noqa: E402
from wpo_kernels.losses import LOSS_TYPES, VARIANTS, check_loss_options, pair_weight, wpo_loss  # noqa: E402
from wpo_kernels.weights import Alignment, parse_alignment, wpo_weights  # noqa: E402

__all__ = ["SUPPORTED_TRL", "WPOConfig", "WPOTrainer", "check_trl_version"]

_NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})


@dataclass
class WPOConfig(DPOConfig):
    """``DPOConfig`` plus WPO's options. ``loss_type`` takes one of ``sigmoid`` (DPO), ``ipo``, ``hinge``,
    ``simpo``, ``robust``, ``kto``; ``beta``, ``label_smoothing`` mean what they mean in
    :func:`wpo_kernels.wpo_loss`.

    Not supported (rejected with a message): several loss types at once, ``f_divergence_type`` other than
    ``reverse_kl``, ``ld_alpha``, ``use_weighting`` (TRL's own WPO weighting: use ``wpo_variant``).
    """

    alignment: str = field(
        default="sampled",
        metadata={
            "help": "Token alignment of the WPO weights: 'sampled' (paper Eq. 2), 'greedy' or 'none'.",
            "choices": [a.value for a in Alignment],
        },
    )
    wpo_variant: str = field(
        default="wpo",
        metadata={
            "help": "Which weights multiply each pair's loss: 'wpo' (w_chosen * w_rejected), 'wpo_w' (chosen "
            "only), 'wpo_l' (rejected only) or 'none' (unweighted: plain DPO/IPO/...).",
            "choices": list(VARIANTS),
        },
    )
    weight_clamp: float | None = field(
        default=None,
        metadata={"help": "Clamp each sequence's WPO weight to at most this (None: no clamp, as the paper)."},
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO's target margin (loss_type='simpo')."})
    kernel_backend: str = field(
        default="auto",
        metadata={
            "help": "Fused LM-head backend: 'auto' (Triton on CUDA, torch on CPU), 'triton' or 'torch'.",
            "choices": list(_BACKENDS),
        },
    )
    memory_budget: int | None = field(
        default=None,
        metadata={
            "help": "Bytes of workspace the fused training step (wpo_kernels.fused_linear_wpo_loss) may hold "
            "for its one-pass route: None for the default (2 GiB), 0 to recompute every logit tile. See "
            "benchmarks/README.md, 'The training step'.",
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.loss_type) != 1:
            raise ValueError(
                f"WPOConfig takes a single loss_type among {list(LOSS_TYPES)}, got {self.loss_type}"
            )
        loss_type = self.loss_type[0]
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)} for WPOTrainer, got {loss_type!r}")
        check_loss_options(loss_type, self.wpo_variant, self.beta, self.label_smoothing, self.simpo_gamma)
        self.alignment = parse_alignment(self.alignment).value
        if self.weight_clamp is not None and not (float(self.weight_clamp) > 0):
            raise ValueError(f"weight_clamp must be a number > 0 or None, got {self.weight_clamp!r}")
        if self.kernel_backend not in _BACKENDS:
            raise ValueError(f"kernel_backend must be one of {list(_BACKENDS)}, got {self.kernel_backend!r}")
        check_memory_budget(self.memory_budget)
        if self.use_weighting:
            raise ValueError(
                "use_weighting=True is TRL's own WPO weighting; WPOTrainer weights pairs itself. Leave "
                "use_weighting=False and choose wpo_variant / alignment instead."
            )
        if self.f_divergence_type != "reverse_kl":
            raise ValueError(
                f"WPOTrainer supports f_divergence_type='reverse_kl' only, got {self.f_divergence_type!r}"
            )
        if self.ld_alpha is not None:
            raise ValueError(f"WPOTrainer does not support ld_alpha (LD-DPO), got ld_alpha={self.ld_alpha}")
        if self.loss_weights is not None and list(self.loss_weights) != [1.0]:
            raise ValueError(
                f"loss_weights is only meaningful with several loss types, got {self.loss_weights}"
            )


@contextlib.contextmanager
def _our_lm_head_instead_of_trls(backend: str) -> Iterator[None]:
    """While ``DPOTrainer.__init__`` runs, install our fused head where it would install TRL's (on the
    policy, or its PEFT base model, and on the reference model), before the reference log-probs are
    precomputed."""
    original = _dpo_module.add_fused_lm_head

    def install(model: nn.Module, *args: Any, **kwargs: Any) -> None:
        add_wpo_lm_head(model, outputs=("logprobs",), backend=backend)

    _dpo_module.add_fused_lm_head = install
    try:
        yield
    finally:
        _dpo_module.add_fused_lm_head = original


class WPOTrainer(DPOTrainer):
    """``DPOTrainer`` with WPO weighting and fused-kernel log-probabilities (see the module docstring).

    Takes the same arguments as ``trl.DPOTrainer``; ``args`` must be a :class:`WPOConfig`. Without
    ``ref_model``, the reference is TRL's: the PEFT model with its adapter disabled, precomputed
    log-probabilities, or a copy loaded from ``model.config.name_or_path`` (a model built from a config has
    none: pass ``ref_model`` then). ``compute_metrics`` is not supported (no logits exist); evaluation logs
    ``eval_rewards/*``, ``eval_weights/*`` and the loss.

    Example:
        >>> args = WPOConfig(output_dir="out", alignment="sampled", wpo_variant="wpo", beta=0.1)
        >>> trainer = WPOTrainer(model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
        >>> trainer.train()
    """

    _tag_names = ["trl", "dpo", "wpo", "wpo-kernels"]
    _name = "WPO"
    _paper = {
        "title": "WPO: Enhancing RLHF with Weighted Preference Optimization",
        "id": "2406.11827",
        "citation": (
            "@inproceedings{zhou2024wpo,\n"
            "    title = {{WPO: Enhancing RLHF with Weighted Preference Optimization}},\n"
            "    author = {Wenxuan Zhou and Ravi Agrawal and Shujian Zhang and Sathish Reddy Indurthi and\n"
            "              Sanqiang Zhao and Kaiqiang Song and Silei Xu and Chenguang Zhu},\n"
            "    booktitle = {EMNLP},\n"
            "    year = 2024,\n"
            "}"
        ),
    }

    def __init__(
        self, model: Any, ref_model: nn.Module | None = None, args: WPOConfig | None = None, **kwargs: Any
    ) -> None:
        if args is None:
            args = WPOConfig(output_dir="wpo-output")
        if not isinstance(args, WPOConfig):
            raise TypeError(f"args must be a WPOConfig (DPOConfig + WPO options), got {type(args).__name__}")
        if kwargs.get("compute_metrics") is not None:
            raise ValueError(
                "WPOTrainer does not support compute_metrics: it never builds logits. Evaluation logs "
                "eval_rewards/*, eval_weights/* and eval_loss instead."
            )
        self.wpo_loss_type = args.loss_type[0]
        self.alignment = Alignment(args.alignment)
        stats = {Alignment.SAMPLED: ("log_sum_sq_probs",), Alignment.GREEDY: (), Alignment.NONE: ()}
        # log_max_prob is free (the max is tracked anyway) and gives the token accuracy; entropy is a metric
        self._policy_outputs = ("logprobs", "log_max_prob", "entropy", *stats[self.alignment])
        with _our_lm_head_instead_of_trls(args.kernel_backend):
            super().__init__(model, ref_model=ref_model, args=args, **kwargs)
        self._weight_values: dict[str, list[Tensor]] = {"train": [], "eval": []}  # histograms, per log
        if self.wpo_loss_type == "kto" and self.ref_model is None and not is_peft_model(self.model):
            raise ValueError(
                "loss_type='kto' scores mismatched prompt/completion pairs under the reference model at "
                "every step (its KL baseline), which precomputed log-probs cannot provide: pass a ref_model."
            )
        if self.aux_loss_enabled:
            raise ValueError(
                "WPOTrainer does not add the MoE router auxiliary loss yet; set router_aux_loss_coef=0.0 in "
                "WPOConfig to train this mixture-of-experts model without it."
            )

    # --- forward passes through the fused head -------------------------------------------------------

    def _head_forward(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        outputs: tuple[str, ...],
        labels: Tensor | None = None,
    ) -> WPOHeadOutput:
        """``model(...)`` through our fused head: per-token ``[2B, T-1]`` stats of the completion tokens."""
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if labels is None:
            labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        return model(**model_kwargs, labels=labels, wpo_head=True, wpo_outputs=outputs)

    def _reference_context(self) -> contextlib.AbstractContextManager:
        """Adapter switch for a PEFT policy without a separate reference (TRL's convention)."""
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return contextlib.nullcontext()

    def _reference_per_token(self, inputs: dict[str, Tensor], labels: Tensor | None = None) -> Tensor:
        """Reference ``[2B, T-1]`` per-token log-probs, without gradient."""
        model = self.ref_model if self.ref_model is not None else self.model
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self._reference_context(),
        ):
            return self._head_forward(model, inputs, ("logprobs",), labels).logprobs

    def compute_ref_log_probs(self, model: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Reference ``(chosen [B], rejected [B])`` summed log-probs of one padded batch (used by
        ``precompute_ref_log_probs``), through the fused head."""
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self._reference_context(),
            self.accelerator.autocast(),
        ):
            out = self._head_forward(model, inputs, ("logprobs",))
        return out.logprobs.sum(dim=1).chunk(2, dim=0)

    # --- KTO's KL baseline --------------------------------------------------------------------------

    def _mismatched_batch(self, inputs: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """KTO's KL sequences: each completion after the prompt of the *next* pair in the batch."""
        ids = inputs["input_ids"]
        attn, comp = inputs["attention_mask"].bool(), inputs["completion_mask"].bool()
        n = ids.shape[0]
        b = n // 2
        seqs, masks = [], []
        for k in range(n):
            src = (k % b + 1) % b  # the chosen row of the next pair holds its prompt
            prompt = ids[src][attn[src] & ~comp[src]]
            completion = ids[k][comp[k]]
            seq = torch.cat([prompt, completion])
            mask = torch.cat([torch.zeros_like(prompt), torch.ones_like(completion)])
            if self.args.max_length is not None:
                seq, mask = seq[: self.args.max_length], mask[: self.args.max_length]
            seqs.append(seq)
            masks.append(mask)
        pad_id = self._tokenizer.pad_token_id
        batch = {
            "input_ids": pad(seqs, padding_value=pad_id, padding_side="right"),
            "attention_mask": pad([torch.ones_like(s) for s in seqs], padding_value=0, padding_side="right"),
            "completion_mask": pad(masks, padding_value=0, padding_side="right"),
        }
        return batch, batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)

    def _kto_kl(self, model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
        """``clamp(mean[log π(y'|x) - log π_ref(y'|x)], min=0)`` over mismatched pairs (TRL's KTO)."""
        batch, labels = self._mismatched_batch(inputs)
        with torch.no_grad():
            policy = self._head_forward(model, batch, ("logprobs",), labels).logprobs.sum(1)
        ref = self._reference_per_token(batch, labels).sum(1)
        kl = (policy - ref).mean().detach()
        return self.accelerator.gather(kl.reshape(1)).mean().clamp(min=0)

    # --- the loss -----------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, WPOHeadOutput]:
        """The WPO loss of one ``[chosen; rejected]`` batch from TRL's collator (0-d tensor).

        ``inputs``: ``input_ids``, ``attention_mask``, ``completion_mask`` ``[2B, T]`` (chosen rows first),
        and optionally precomputed ``ref_chosen_logps``/``ref_rejected_logps`` ``[B]``. With
        ``return_outputs`` also returns the policy's :class:`WPOHeadOutput`.
        """
        mode = "train" if self.model.training else "eval"
        out = self._head_forward(model, inputs, self._policy_outputs)
        mask = out.mask
        logps = out.logprobs.sum(dim=1)
        weights = wpo_weights(
            out.logprobs,
            out.log_max_prob,
            out.log_sum_sq_probs,
            mask,
            self.alignment,
            clamp_max=self.args.weight_clamp,
        )
        lengths = mask.sum(dim=1)
        chosen_logps, rejected_logps = logps.chunk(2)
        chosen_weight, rejected_weight = weights.chunk(2)
        chosen_len, rejected_len = lengths.chunk(2)

        ref_chosen = ref_rejected = None
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        elif self.wpo_loss_type != "simpo":  # SimPO is reference-free
            ref_chosen, ref_rejected = self._reference_per_token(inputs).sum(dim=1).chunk(2)
        kto_kl = self._kto_kl(model, inputs) if self.wpo_loss_type == "kto" else None

        result = wpo_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen,
            ref_rejected,
            chosen_weight,
            rejected_weight,
            loss_type=self.wpo_loss_type,
            variant=self.args.wpo_variant,
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            simpo_gamma=self.args.simpo_gamma,
            chosen_lengths=chosen_len,
            rejected_lengths=rejected_len,
            kto_kl=kto_kl,
        )
        self._log_step_metrics(mode, inputs, out, result.metrics)
        self._record_weight_histograms(mode, chosen_weight, rejected_weight)
        return (result.loss, out) if return_outputs else result.loss

    def _log_step_metrics(
        self, mode: str, inputs: dict[str, Tensor], out: WPOHeadOutput, metrics: dict[str, Tensor]
    ) -> None:
        # one value per process per step: plain gather (gather_for_metrics may drop a remainder)
        gather = lambda t: self.accelerator.gather(t.reshape(1))  # noqa: E731
        store = self._metrics[mode]
        for name, value in metrics.items():
            values = gather(value.reshape(1))
            if name.endswith("_min"):
                reduced = values.min()
            elif name.endswith("_max"):
                reduced = values.max()
            else:
                reduced = values.mean()
            store[name].append(reduced.item())
        mask = out.mask
        tokens = gather(mask.sum()).sum()
        if out.entropy is not None:
            entropy = gather((out.entropy * mask).sum()).sum()
            store["entropy"].append((entropy / tokens).item() if tokens > 0 else 0.0)
        # a chosen token is the argmax when its log-prob reaches the max log-prob
        chosen_mask = mask.chunk(2)[0]
        is_top1 = (out.logprobs.detach() >= out.log_max_prob - 1e-6).chunk(2)[0] & chosen_mask
        correct, total = gather(is_top1.sum()).sum(), gather(chosen_mask.sum()).sum()
        store["mean_token_accuracy"].append((correct / total).item() if total > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        store["num_tokens"] = [self._total_train_tokens]

    # --- weight histograms ------------------------------------------------------------------------------

    def _histogram_callbacks(self) -> list[TensorBoardCallback]:
        """The reporting integrations that take histograms: TensorBoard (``report_to`` or a callback)."""
        return [cb for cb in self.callback_handler.callbacks if isinstance(cb, TensorBoardCallback)]

    def _record_weight_histograms(self, mode: str, chosen_weight: Tensor, rejected_weight: Tensor) -> None:
        """Keep this step's weights ``[B]`` of every process (gathered here, so every rank takes part) until
        the next log, when a reporting integration takes histograms."""
        if not self._histogram_callbacks():
            return
        values = torch.stack([chosen_weight, rejected_weight]).detach().float()  # [2, B]
        # processes may hold different batch sizes (the last batch): pad with NaN, gathered, then dropped
        values = self.accelerator.pad_across_processes(values, dim=1, pad_index=float("nan"))
        gathered = self.accelerator.gather(values.unsqueeze(0)).transpose(0, 1).reshape(2, -1)
        self._weight_values[mode].append(gathered[:, ~gathered[0].isnan()].cpu())

    def _write_weight_histograms(self, mode: str) -> None:
        """Histograms of the weights kept since the last log, to each TensorBoard writer (main process)."""
        values = self._weight_values[mode]
        if not values:
            return
        chosen, rejected = torch.cat(values, dim=1)
        values.clear()
        histograms = {
            "chosen": chosen,
            "rejected": rejected,
            "pair": pair_weight(chosen, rejected, self.args.wpo_variant),
        }
        for callback in self._histogram_callbacks():
            if callback.tb_writer is None:  # not the main process, or not started
                continue
            for name, tensor in histograms.items():
                callback.tb_writer.add_histogram(
                    f"{mode}/weights/{name}", tensor.numpy(), self.state.global_step
                )
            callback.tb_writer.flush()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's log (metrics averaged since the last log), then the weight histograms."""
        mode = "train" if self.model.training else "eval"
        super().log(logs, start_time)
        self._write_weight_histograms(mode)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Tensor, None, None]:
        """Evaluation: the loss only (metrics are logged by ``compute_loss``); no logits exist."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
