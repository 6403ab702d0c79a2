"""Everything the offline example builds without downloading: the shipped preference data, a word-level
tokenizer trained on it, and small random-init causal LMs from ``transformers`` configs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerFast

#: Special tokens of the toy tokenizer.
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
#: Model families the example builds: a Llama and a Gemma-2 (its final logit softcap exercises the kernel).
MODEL_KINDS = ("llama", "gemma2")


def data_path(split: str) -> Path:
    """Path of the shipped ``arithmetic_prefs_{split}.jsonl`` (``split``: ``"train"`` or ``"test"``)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return Path(str(resources.files("wpo_kernels.integration") / "data" / f"arithmetic_prefs_{split}.jsonl"))


def load_pairs(split: str, limit: int | None = None) -> list[dict[str, str]]:
    """The shipped preference pairs: dicts with ``prompt``, ``chosen``, ``rejected`` (and ``error``)."""
    with data_path(split).open() as f:
        records = [json.loads(line) for line in f if line.strip()]
    return records[:limit] if limit is not None else records


def build_tokenizer(records: Sequence[dict[str, str]]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (whitespace-separated symbols) trained on ``records`` with ``tokenizers``.

    Special tokens ``<pad>``, ``<eos>``, ``<unk>`` are matched before splitting, so ``"9<eos>"`` is two
    tokens (TRL appends the EOS string to completions).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, EOS, UNK])
    texts = (r[k] for r in records for k in ("prompt", "chosen", "rejected"))
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="right"
    )


def build_model(
    kind: str,
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 64,
    seed: int = 0,
    pad_token_id: int = 0,
    eos_token_id: int = 1,
) -> PreTrainedModel:
    """A random-init float32 causal LM built from a ``transformers`` config (no download).

    ``kind="llama"``: ``LlamaForCausalLM`` (untied head). ``kind="gemma2"``: ``Gemma2ForCausalLM`` with
    ``final_logit_softcapping=30`` and tied embeddings, the quirks the fused head has to reproduce.
    """
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    if kind == "llama":
        model: nn.Module = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    elif kind == "gemma2":
        config = Gemma2Config(
            **common,
            head_dim=hidden_size // num_heads,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
            sliding_window=max_positions,
            tie_word_embeddings=True,
        )
        model = Gemma2ForCausalLM(config)
    else:
        raise ValueError(f"kind must be one of {MODEL_KINDS}, got {kind!r}")
    return model
