"""Model quirks: the fused head on a real ``transformers`` model must match the model's own logits.

Each tiny model's ``forward`` materialises ``[B, T, V]`` logits with its quirk applied (Gemma-2 softcap,
Cohere ``logit_scale``, Granite ``logits_scaling``, tied embeddings, a bias on the head); the per-token
log-probabilities, the WPO statistics and the gradients from
:func:`wpo_kernels.integration.hf.causal_lm_hidden_and_head` + the fused kernel must agree with them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import rel_err
from torch import Tensor

transformers = pytest.importorskip("transformers")

from tests.helpers import tiny_decoder_config  # noqa: E402
from wpo_kernels.integration.hf import (  # noqa: E402
    add_wpo_lm_head,
    causal_lm_hidden_and_head,
    head_transform,
    lm_head_of,
    remove_wpo_lm_head,
)

V, H, B, T = 96, 32, 3, 11
SMALL = tiny_decoder_config(V, H)


def _gemma2() -> torch.nn.Module:
    cfg = transformers.Gemma2Config(
        **SMALL, head_dim=16, final_logit_softcapping=2.0, attn_logit_softcapping=50.0, sliding_window=32
    )
    return transformers.Gemma2ForCausalLM(cfg)


def _cohere() -> torch.nn.Module:
    return transformers.CohereForCausalLM(transformers.CohereConfig(**SMALL, logit_scale=0.37))


def _granite() -> torch.nn.Module:
    cfg = transformers.GraniteConfig(**SMALL, logits_scaling=4.0, tie_word_embeddings=False)
    return transformers.GraniteForCausalLM(cfg)


def _llama_tied() -> torch.nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, tie_word_embeddings=True))


def _phi_bias() -> torch.nn.Module:
    cfg = transformers.PhiConfig(**{k: v for k, v in SMALL.items() if k != "bos_token_id"}, bos_token_id=2)
    return transformers.PhiForCausalLM(cfg)


MODELS = {
    "gemma2_softcap": _gemma2,
    "cohere_logit_scale": _cohere,
    "granite_logits_scaling": _granite,
    "llama_tied": _llama_tied,
    "phi_bias": _phi_bias,
}


def _build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = MODELS[name]().float().eval()
    # Random init gives logits of a few hundredths; scale the head so the quirks (tanh!) matter.
    with torch.no_grad():
        head = model.get_output_embeddings()
        head.weight.mul_(60.0)
        if head.bias is not None:
            head.bias.normal_(0.0, 1.0)
    return model


def _batch(seed: int = 1) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    attn = torch.ones(B, T, dtype=torch.long)
    attn[1, -3:] = 0  # right padding, as TRL's collator does
    comp = torch.zeros(B, T, dtype=torch.long)
    comp[:, 5:] = 1
    comp[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}


def _materialised(model: torch.nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-token statistics from the model's own ``[B, T, V]`` logits (float64), on shifted labels."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logp = torch.log_softmax(logits.double(), dim=-1)
    targets = batch["input_ids"][:, 1:]
    return {
        "logprobs": logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
        "log_max_prob": logp.max(-1).values,
        "log_sum_sq_probs": torch.logsumexp(2 * logp, dim=-1),
        "entropy": -(logp.exp() * logp).sum(-1),
    }


@pytest.mark.parametrize("name", list(MODELS))
def test_quirk_matches_model_logits(name: str) -> None:
    model = _build(name)
    batch = _batch()
    ref = _materialised(model, batch)
    hidden, head = causal_lm_hidden_and_head(model, batch)
    assert hidden.shape == (B, T, H)
    outs = ("log_max_prob", "log_sum_sq_probs", "entropy")
    got = head.logprobs(hidden[:, :-1], batch["input_ids"][:, 1:], outputs=outs, backend="torch")
    valid = batch["attention_mask"][:, 1:].bool()
    for key in ("logprobs", *outs):
        assert rel_err(getattr(got, key)[valid], ref[key][valid]) < 2e-5, key


def test_quirks_are_read_from_the_config() -> None:
    assert head_transform(_build("gemma2_softcap").config).softcap == 2.0
    assert head_transform(_build("cohere_logit_scale").config).logit_scale == pytest.approx(0.37)
    assert head_transform(_build("granite_logits_scaling").config).logit_scale == pytest.approx(0.25)
    plain = head_transform(transformers.LlamaConfig(**SMALL))
    assert (plain.logit_scale, plain.softcap, plain.temperature) == (1.0, None, 1.0)
    clova = transformers.PretrainedConfig(logits_scaling=4.0)
    clova.model_type = "hyperclovax"
    assert head_transform(clova).logit_scale == 4.0
    assert lm_head_of(_build("phi_bias")).bias is not None
    tied = _build("llama_tied")
    assert lm_head_of(tied).weight is tied.get_input_embeddings().weight


def test_softcap_is_active() -> None:
    """Guard for the test above: the Gemma-2 logits really reach the tanh's saturated range."""
    model = _build("gemma2_softcap")
    logits = model(input_ids=_batch()["input_ids"]).logits
    assert logits.abs().max() > 0.9 * 2.0


@pytest.mark.parametrize("name", ["gemma2_softcap", "llama_tied", "phi_bias", "granite_logits_scaling"])
def test_quirk_gradients_match(name: str) -> None:
    """Gradients of the summed completion log-probs w.r.t. every parameter (tied embedding included)."""
    fused_model = _build(name)
    ref_model = copy.deepcopy(fused_model)
    batch = _batch()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]

    hidden, head = causal_lm_hidden_and_head(fused_model, batch)
    head.logprobs(hidden[:, :-1], labels, backend="torch").logprobs.sum().backward()

    logits = ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    keep = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    picked[keep].sum().backward()

    for (pname, p), q in zip(fused_model.named_parameters(), ref_model.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), pname
        if p.grad is not None:
            assert rel_err(p.grad, q.grad, floor=1e-3) < 1e-4, pname


def test_triton_backend_matches_model_logits() -> None:
    """One small model through the Triton kernels (the interpreter on CPU)."""
    model = _build("gemma2_softcap")
    batch = _batch()
    ref = _materialised(model, batch)
    hidden, head = causal_lm_hidden_and_head(model, batch)
    targets = batch["input_ids"][:, 1:]
    got = head.logprobs(hidden[:, :-1], targets, outputs=("log_sum_sq_probs",), backend="triton")
    valid = batch["attention_mask"][:, 1:].bool()
    assert rel_err(got.logprobs[valid], ref["logprobs"][valid]) < 1e-4
    assert rel_err(got.log_sum_sq_probs[valid], ref["log_sum_sq_probs"][valid]) < 1e-4


def test_patched_forward() -> None:
    """``add_wpo_lm_head``: ``wpo_head=True`` gives the fused per-token outputs on completion positions,
    the plain call is untouched, a deep copy runs its own weights, and ``remove_wpo_lm_head`` undoes it."""
    model = _build("gemma2_softcap")
    batch = _batch()
    plain_logits = model(input_ids=batch["input_ids"]).logits
    add_wpo_lm_head(model, outputs=("log_sum_sq_probs",), backend="torch")
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, wpo_head=True
    )
    ref = _materialised(model, batch)
    assert out.logprobs.shape == (B, T - 1)
    assert torch.equal(out.mask, labels[:, 1:] != -100)
    assert torch.all(out.logprobs[~out.mask] == 0)
    assert rel_err(out.logprobs[out.mask], ref["logprobs"][out.mask]) < 2e-5
    assert rel_err(out.log_sum_sq_probs[out.mask], ref["log_sum_sq_probs"][out.mask]) < 2e-5
    assert out.log_max_prob is None
    assert torch.equal(model(input_ids=batch["input_ids"]).logits, plain_logits)

    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.get_output_embeddings().weight.mul_(0.5)
    assert not torch.allclose(twin(input_ids=batch["input_ids"]).logits, plain_logits)
    assert torch.equal(model(input_ids=batch["input_ids"]).logits, plain_logits)

    remove_wpo_lm_head(model)
    assert "forward" not in model.__dict__
    assert "_wpo_original_forward" not in model.__dict__
    assert torch.equal(model(input_ids=batch["input_ids"]).logits, plain_logits)


def test_peft_model() -> None:
    """Through a LoRA-wrapped model: adapter active by default, disabled inside ``disable_adapter``."""
    peft = pytest.importorskip("peft")
    model = _build("llama_tied")
    batch = _batch()
    base_logps = _materialised(model, batch)["logprobs"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(model, config)
    hidden, head = causal_lm_hidden_and_head(lora, batch)
    got = head.logprobs(hidden[:, :-1], batch["input_ids"][:, 1:], backend="torch").logprobs
    logits = lora(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = torch.log_softmax(logits[:, :-1].double(), -1)
    ref = ref.gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    valid = batch["attention_mask"][:, 1:].bool()
    assert rel_err(got[valid], ref[valid]) < 2e-5
    assert rel_err(got[valid], base_logps[valid]) > 1e-3  # the adapter changes the outputs
    with lora.disable_adapter():
        hidden, head = causal_lm_hidden_and_head(lora, batch)
        off = head.logprobs(hidden[:, :-1], batch["input_ids"][:, 1:], backend="torch").logprobs
    assert rel_err(off[valid], base_logps[valid]) < 2e-5


def test_lora_on_head_is_rejected() -> None:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"])
    lora = peft.get_peft_model(_build("granite_logits_scaling"), config)
    with pytest.raises(ValueError, match="lm_head"):
        lm_head_of(lora)
