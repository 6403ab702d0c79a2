"""How on-policy is a preference data set for a model? WPO's weights of every pair, before any training.

WPO weights each pair by how likely the policy is to have produced its outputs
(:func:`wpo_kernels.wpo_weights`): close to 1 for the model's own samples, small for text it would not
write. :func:`score_preference_data` computes those weights for a whole data set in one forward-only pass,
exactly as :class:`WPOTrainer` would at step 0: the same dataset preparation (TRL 1.16's, run through the
trainer's own ``_prepare_dataset``), the same collator and truncation, the same fused head
(:func:`wpo_kernels.integration.hf.add_wpo_lm_head`) and the same weights. No ``[B, T, V]`` logits are
built; memory is one batch's activations plus the tokenised data set. :func:`summarize` turns weights into
a summary (mean, quantiles, fraction below thresholds); the ``wpo-score`` command
(:mod:`wpo_kernels.integration.score_cli`) wraps both.

Example:
    >>> scores = score_preference_data(model, tokenizer, [{"prompt": "2 + 2 =", "chosen": " 4",
    ...                                                    "rejected": " 5"}], batch_size=32)
    >>> scores.pair_weight  # tensor([...]) one weight per kept pair
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch import Tensor, nn
from trl import DPOConfig
from trl.trainer.dpo_trainer import DataCollatorForPreference

from wpo_kernels.integration.hf import add_wpo_lm_head, remove_wpo_lm_head, unwrap_causal_lm
from wpo_kernels.integration.trl import WPOConfig, WPOTrainer
from wpo_kernels.losses import pair_weight
from wpo_kernels.weights import Alignment, parse_alignment, wpo_weights

__all__ = [
    "DEFAULT_THRESHOLDS",
    "PAIR_FIELDS",
    "PairScores",
    "ScoreInputError",
    "score_preference_data",
    "scoring_options",
    "summarize",
]

#: Fields every pair needs (TRL's preference format with an explicit prompt; standard or conversational).
PAIR_FIELDS = ("prompt", "chosen", "rejected")
#: Pair weights below which :func:`summarize` reports the fraction of pairs.
DEFAULT_THRESHOLDS = (0.25, 0.5, 0.75)
QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
#: Per-token statistics the fused head computes for each alignment, besides ``logprobs``.
_STATS = {Alignment.SAMPLED: ("log_sum_sq_probs",), Alignment.GREEDY: ("log_max_prob",), Alignment.NONE: ()}
_INDEX = "__wpo_score_row"


class ScoreInputError(ValueError):
    """Input that cannot be scored (a missing field, an empty data set, a model path that does not exist);
    the message names the argument, the row or the file."""


@dataclass
class PairScores:
    """Per-pair results of :func:`score_preference_data`: each tensor is ``[N]`` on the CPU, one entry per
    scored pair, in data set order.

    Attributes:
        index: long, the row of each scored pair in the input data set.
        chosen_weight / rejected_weight: float32 WPO weights ``exp(mean_t a_t)`` (clamped if asked).
        chosen_mean_logp / rejected_mean_logp: float32 mean aligned log-probability ``mean_t a_t`` per
            completion token (``-inf`` where a token has probability 0), before any clamp.
        chosen_tokens / rejected_tokens: long, completion tokens scored (after truncation).
        dropped: rows the trainer drops too: with ``truncation_mode="keep_start"``, a prompt that fills
            ``max_length`` leaves no completion token (TRL's ``_prepare_dataset`` filters them out).
        alignment: the alignment of the weights.
    """

    index: Tensor
    chosen_weight: Tensor
    rejected_weight: Tensor
    chosen_mean_logp: Tensor
    rejected_mean_logp: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    dropped: list[int] = field(default_factory=list)
    alignment: str = Alignment.SAMPLED.value

    @property
    def pair_weight(self) -> Tensor:
        """``[N]`` WPO's pair weight ``w(x, y_w) · w(x, y_l)``."""
        return pair_weight(self.chosen_weight, self.rejected_weight, "wpo")

    def __len__(self) -> int:
        return self.index.numel()

    def rows(self) -> Iterator[dict[str, Any]]:
        """One dict of plain numbers per scored pair (``index`` and every field; non-finite floats
        become None, so the rows serialise as JSON)."""
        columns = {
            "index": self.index,
            "pair_weight": self.pair_weight,
            "chosen_weight": self.chosen_weight,
            "rejected_weight": self.rejected_weight,
            "chosen_mean_logp": self.chosen_mean_logp,
            "rejected_mean_logp": self.rejected_mean_logp,
            "chosen_tokens": self.chosen_tokens,
            "rejected_tokens": self.rejected_tokens,
        }
        lists = {k: v.tolist() for k, v in columns.items()}
        for i in range(len(self)):
            row = {k: v[i] for k, v in lists.items()}
            yield {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def scoring_options(config: WPOConfig) -> dict[str, Any]:
    """The keywords of :func:`score_preference_data` that make it score like a trainer built with
    ``config`` (alignment, truncation, weight clamp, kernel backend, mixed precision, eval batch size).

    Example:
        >>> config = WPOConfig(output_dir="out", max_length=512)
        >>> score_preference_data(model, tokenizer, dataset, **scoring_options(config))
    """
    return {
        "alignment": config.alignment,
        "max_length": config.max_length,
        "truncation_mode": config.truncation_mode,
        "pad_to_multiple_of": config.pad_to_multiple_of,
        "weight_clamp": config.weight_clamp,
        "backend": config.kernel_backend,
        "batch_size": config.per_device_eval_batch_size,
        "autocast_dtype": torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else None,
    }


# --- input checks and the trainer's dataset preparation -------------------------------------------------


def _kind(value: object) -> str | None:
    """``"standard"`` (text), ``"conversational"`` (a list of messages) or None (neither)."""
    if isinstance(value, str):
        return "standard"
    if isinstance(value, list) and all(isinstance(m, Mapping) and "content" in m for m in value):
        return "conversational"
    return None


def _check_row(example: Mapping[str, Any], row: int, kind: str | None) -> str:
    """The format of one pair; ``ScoreInputError`` naming the row and field where it has none."""
    for name in PAIR_FIELDS:
        if example.get(name) is None:
            raise ScoreInputError(
                f"dataset row {row}: missing field {name!r} (a pair needs {list(PAIR_FIELDS)})"
            )
        found = _kind(example[name])
        if found is None or (kind is not None and found != kind):
            expected = kind or "text or a list of messages"
            raise ScoreInputError(
                f"dataset row {row}: field {name!r} must be {expected} like the rest of the pair, got "
                f"{type(example[name]).__name__}"
            )
        kind = found
    return kind


def _checked_dataset(dataset: Dataset | Sequence[Mapping[str, Any]]) -> Dataset:
    """``dataset`` as a ``datasets.Dataset`` with a row-index column, every pair checked (named errors)."""
    if not isinstance(dataset, Dataset):
        if not isinstance(dataset, Sequence):
            raise TypeError(
                f"dataset must be a datasets.Dataset or a list of dicts, got {type(dataset).__name__}"
            )
        dataset = Dataset.from_list([dict(r) for r in dataset]) if len(dataset) else Dataset.from_dict({})
    if len(dataset) == 0:
        raise ScoreInputError("dataset is empty: nothing to score")
    missing = [name for name in PAIR_FIELDS if name not in dataset.column_names]
    if missing:
        raise ScoreInputError(
            f"dataset has no {missing} column (a pair needs {list(PAIR_FIELDS)}); its columns: "
            f"{dataset.column_names}"
        )
    kind = _check_row(dataset[0], 0, None)
    for row, example in enumerate(dataset):
        _check_row(example, row, kind)
    return dataset.add_column(_INDEX, list(range(len(dataset))))


def _prepared(dataset: Dataset, tokenizer: Any, max_length: int | None, truncation_mode: str) -> Dataset:
    """TRL 1.16's preparation (EOS on text completions, chat template on conversations, tokenisation, the
    ``keep_start`` filter), run through the trainer's own ``_prepare_dataset``. In the supported TRL range
    (:data:`wpo_kernels.integration.trl.SUPPORTED_TRL`) it reads nothing of the trainer but ``_tokenizer``;
    tests compare the result with a real trainer's weights."""
    trainer = types.SimpleNamespace(_tokenizer=tokenizer)
    args = types.SimpleNamespace(
        max_length=max_length, truncation_mode=truncation_mode, dataset_num_proc=None
    )
    return WPOTrainer._prepare_dataset(trainer, dataset, tokenizer, args, "scored")


@contextlib.contextmanager
def _fused_head(model: nn.Module, backend: str) -> Iterator[None]:
    """The trainer's fused head on ``model`` (the causal LM inside PEFT / DDP wrappers), in eval mode;
    a model already patched (e.g. a trainer's) is used as it is. Restores the model afterwards."""
    lm = unwrap_causal_lm(model)
    patched = "_wpo_original_forward" not in lm.__dict__
    if patched:
        add_wpo_lm_head(lm, outputs=("logprobs",), backend=backend)
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
        if patched:
            remove_wpo_lm_head(lm)


# --- scoring --------------------------------------------------------------------------------------------


@torch.no_grad()
def _score_batch(
    model: nn.Module, batch: dict[str, Tensor], alignment: Alignment
) -> tuple[Tensor, Tensor, Tensor]:
    """``(weights, mean aligned log-probs, token counts)``, each ``[2B]`` (chosen rows first), of one batch
    from TRL's collator: the trainer's forward through the fused head and :func:`wpo_weights`."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=labels,
        wpo_head=True,
        wpo_outputs=("logprobs", *_STATS[alignment]),
        use_cache=False,
    )
    weights = wpo_weights(out.logprobs, out.log_max_prob, out.log_sum_sq_probs, out.mask, alignment)
    return weights, weights.log(), out.mask.sum(dim=1)


def _scored(
    model: nn.Module,
    prepared: Dataset,
    collate: DataCollatorForPreference,
    alignment: Alignment,
    batch_size: int,
    progress: Callable[[int], None] | None,
) -> dict[str, Tensor]:
    """Every prepared pair scored batch by batch: ``index`` ``[N]`` and ``weight``, ``mean_logp``,
    ``tokens`` ``[2, N]`` (chosen, rejected), on the CPU."""
    device = next(model.parameters()).device
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    parts = {
        "index": [torch.zeros(0, dtype=torch.long)],
        "weight": [torch.zeros(2, 0)],
        "mean_logp": [torch.zeros(2, 0)],
        "tokens": [torch.zeros(2, 0, dtype=torch.long)],
    }
    for columns in prepared.select_columns([_INDEX, *keys]).iter(batch_size):
        examples = [
            dict(zip(keys, ids, strict=True)) for ids in zip(*(columns[k] for k in keys), strict=True)
        ]
        batch = {k: v.to(device) for k, v in collate(examples).items()}
        weight, mean_logp, tokens = (t.cpu().reshape(2, -1) for t in _score_batch(model, batch, alignment))
        parts["weight"].append(weight)
        parts["mean_logp"].append(mean_logp)
        parts["tokens"].append(tokens)
        parts["index"].append(torch.tensor(columns[_INDEX], dtype=torch.long))
        if progress is not None:
            progress(len(examples))
    return {k: torch.cat(v, dim=-1) for k, v in parts.items()}


def score_preference_data(
    model: nn.Module,
    tokenizer: Any,
    dataset: Dataset | Sequence[Mapping[str, Any]],
    *,
    alignment: Alignment | str = "sampled",
    batch_size: int = 32,
    max_length: int | None = DPOConfig.max_length,
    truncation_mode: str = DPOConfig.truncation_mode,
    pad_to_multiple_of: int | None = None,
    weight_clamp: float | None = None,
    backend: str = "auto",
    autocast_dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
) -> PairScores:
    """WPO weights of every pair of a preference data set under ``model``, as ``WPOTrainer`` computes them
    at step 0 (forward only, no ``[B, T, V]`` logits).

    Args:
        model: a ``transformers`` causal LM (or a PEFT / DDP wrapper of one) on its device; run in eval
            mode in its own dtype, restored afterwards.
        tokenizer: its tokenizer (a chat template for conversational data).
        dataset: TRL preference pairs with an explicit prompt: ``prompt``, ``chosen``, ``rejected`` as text
            (standard; EOS appended like TRL does) or as lists of messages (conversational); a
            ``datasets.Dataset`` or a list of dicts. Optional ``tools`` / ``chat_template_kwargs`` as in TRL.
        alignment: ``"sampled"`` (paper Eq. 2), ``"greedy"`` or ``"none"``, see :class:`Alignment`.
        batch_size: pairs per forward (``2 * batch_size`` sequences).
        max_length / truncation_mode / pad_to_multiple_of: TRL's ``DPOConfig`` options (defaults: its
            defaults), applied by TRL's collator exactly as in training.
        weight_clamp: ``WPOConfig.weight_clamp``: clamp each sequence's weight to at most this.
        backend: fused-head backend, ``"auto"``, ``"triton"`` or ``"torch"``.
        autocast_dtype: run the forward under ``torch.autocast`` in this dtype, as a trainer with
            ``bf16=True`` (TRL's default) or ``fp16=True`` does; None: the model's own dtype.
        progress: called with the number of pairs after each batch, and with the number dropped at the
            end (e.g. ``tqdm.update``: it reaches the number of rows).

    Returns:
        :class:`PairScores`, one entry per pair that the trainer would keep (``dropped`` lists the rest).

    Raises:
        ScoreInputError: an empty data set, a missing field or a mixed format (naming the row and field).
    """
    align = parse_alignment(alignment)
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if truncation_mode not in ("keep_start", "keep_end"):
        raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', got {truncation_mode!r}")
    if weight_clamp is not None and not (float(weight_clamp) > 0):
        raise ValueError(f"weight_clamp must be a number > 0 or None, got {weight_clamp!r}")
    checked = _checked_dataset(dataset)
    prepared = _prepared(checked, tokenizer, max_length, truncation_mode)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = DataCollatorForPreference(
        pad_token_id=pad, max_length=max_length, truncation_mode=truncation_mode,
        pad_to_multiple_of=pad_to_multiple_of,
    )  # fmt: skip
    autocast = torch.autocast(
        next(model.parameters()).device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
    )
    with _fused_head(model, backend), autocast:
        scored = _scored(model, prepared, collate, align, batch_size, progress)
    weight = scored["weight"] if weight_clamp is None else scored["weight"].clamp(max=float(weight_clamp))
    index, mean_logp, tokens = scored["index"], scored["mean_logp"], scored["tokens"]
    kept = set(index.tolist())
    if progress is not None:
        progress(len(checked) - len(kept))  # the dropped pairs
    return PairScores(
        index=index,
        chosen_weight=weight[0],
        rejected_weight=weight[1],
        chosen_mean_logp=mean_logp[0],
        rejected_mean_logp=mean_logp[1],
        chosen_tokens=tokens[0],
        rejected_tokens=tokens[1],
        dropped=[i for i in range(len(checked)) if i not in kept],
        alignment=align.value,
    )


# --- summaries ------------------------------------------------------------------------------------------


def summarize(values: Tensor | Sequence[float], thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict:
    """Summary of one set of weights: ``n``, ``mean``, ``std``, ``min``, ``max``, ``quantiles``
    (5 … 95 %, linear interpolation) and ``fraction_below`` each threshold (strictly below).

    Example:
        >>> summarize(scores.pair_weight)["fraction_below"]["0.5"]
    """
    x = np.asarray(values.tolist() if isinstance(values, Tensor) else values, dtype=np.float64)
    if x.size == 0:
        return {"n": 0}
    quantiles = np.quantile(x, QUANTILES)
    return {
        "n": int(x.size),
        "mean": float(x.mean()),
        "std": float(x.std()),
        "min": float(x.min()),
        "max": float(x.max()),
        "quantiles": {f"{q:g}": float(v) for q, v in zip(QUANTILES, quantiles, strict=True)},
        "fraction_below": {f"{t:g}": float((x < t).mean()) for t in thresholds},
    }
