"""WPOTrainer (TRL 1.16 adapter) on a tiny Llama on CPU.

(a) the trainer's loss equals :func:`wpo_kernels.wpo_loss` fed from the model's materialised logits, for
every loss type, alignment and variant; (b) parameters change (full, LoRA, precomputed reference);
(c) no tensor as large as the ``[B, T, V]`` logits is created during a training step.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

import wpo_kernels.fallback  # noqa: E402
from tests.helpers import tiny_decoder_config  # noqa: E402
from wpo_kernels.integration.examples.toy_setup import build_tokenizer, load_pairs  # noqa: E402
from wpo_kernels.integration.trl import WPOConfig, WPOTrainer, check_trl_version  # noqa: E402
from wpo_kernels.losses import wpo_loss  # noqa: E402
from wpo_kernels.weights import wpo_weights  # noqa: E402

N_PAIRS, BATCH = 16, 4


@pytest.fixture(scope="module")
def records() -> list[dict[str, str]]:
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in load_pairs("train", N_PAIRS)]


@pytest.fixture(scope="module")
def tokenizer(records: list[dict[str, str]]) -> transformers.PreTrainedTokenizerFast:
    return build_tokenizer(records)


def tiny_llama(vocab: int = 128, hidden: int = 16, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    # initializer_range: non-trivial probabilities, so the weights differ from pair to pair
    config = transformers.LlamaConfig(**tiny_decoder_config(vocab, hidden, initializer_range=0.5))
    return transformers.LlamaForCausalLM(config)


def make_config(tmp_path, **overrides) -> WPOConfig:
    options = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
        max_steps=2,
        learning_rate=1e-2,
        beta=0.1,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        kernel_backend="torch",
        seed=0,
    )
    options.update(overrides)
    return WPOConfig(**options)


def make_trainer(tmp_path, records, tokenizer, model=None, ref_model="copy", **overrides) -> WPOTrainer:
    model = model if model is not None else tiny_llama()
    if ref_model == "copy":
        ref_model = copy.deepcopy(model)
    return WPOTrainer(
        model,
        ref_model=ref_model,
        args=make_config(tmp_path, **overrides),
        train_dataset=datasets.Dataset.from_list(records),
        eval_dataset=datasets.Dataset.from_list(records[:8]),
        processing_class=tokenizer,
    )


def first_batch(trainer: WPOTrainer) -> list[dict]:
    return [trainer.train_dataset[i] for i in range(BATCH)]


# --- the oracle: wpo_loss on statistics from the model's own [B, T, V] logits ---------------------------


def token_stats(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token ``(logprobs, log_max_prob, log_sum_sq_probs, mask)`` ``[N, T-1]`` (float64) from logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    mask = batch["completion_mask"][:, 1:].bool()
    tok = logp.gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    tok = torch.where(mask, tok, torch.zeros_like(tok))
    return tok, logp.max(-1).values, torch.logsumexp(2 * logp, dim=-1), mask


def collate_mismatched(examples: list[dict], pad_id: int) -> dict[str, Tensor]:
    """KTO's KL batch, built independently: prompt of pair (i+1) % B followed by each completion of pair i."""
    b = len(examples)
    seqs, comps = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for i, ex in enumerate(examples):
            prompt = examples[(i + 1) % b]["prompt_ids"]
            seqs.append(prompt + ex[side])
            comps.append([0] * len(prompt) + [1] * len(ex[side]))
    t = max(map(len, seqs))
    return {
        "input_ids": torch.tensor([s + [pad_id] * (t - len(s)) for s in seqs]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (t - len(s)) for s in seqs]),
        "completion_mask": torch.tensor([c + [0] * (t - len(c)) for c in comps]),
    }


def oracle_loss(trainer: WPOTrainer, policy, reference, examples: list[dict]) -> Tensor:
    args = trainer.args
    batch = trainer.data_collator(examples)
    tok, lmax, lss, mask = token_stats(policy, batch)
    logps = tok.sum(1)
    weights = wpo_weights(tok, lmax, lss, mask, args.alignment, clamp_max=args.weight_clamp)
    if "ref_chosen_logps" in batch:
        ref_c, ref_r = batch["ref_chosen_logps"].double(), batch["ref_rejected_logps"].double()
    else:
        with torch.no_grad():
            ref_c, ref_r = token_stats(reference, batch)[0].sum(1).chunk(2)
    kto_kl = None
    if args.loss_type[0] == "kto":
        kl_batch = collate_mismatched(examples, trainer.processing_class.pad_token_id)
        with torch.no_grad():
            kl = token_stats(policy, kl_batch)[0].sum(1) - token_stats(reference, kl_batch)[0].sum(1)
        kto_kl = kl.mean().clamp(min=0)
    lengths = mask.sum(1)
    pc, pr = logps.chunk(2)
    wc, wr = weights.chunk(2)
    lc, lr = lengths.chunk(2)
    return wpo_loss(
        pc, pr, ref_c, ref_r, wc, wr,
        loss_type=args.loss_type[0], variant=args.wpo_variant, beta=args.beta,
        label_smoothing=args.label_smoothing, simpo_gamma=args.simpo_gamma,
        chosen_lengths=lc, rejected_lengths=lr, kto_kl=kto_kl,
    ).loss  # fmt: skip


CASES = [
    dict(loss_type="sigmoid"),
    dict(loss_type="sigmoid", alignment="greedy", wpo_variant="wpo_l", label_smoothing=0.1),
    dict(loss_type="sigmoid", alignment="none", wpo_variant="wpo_w", weight_clamp=0.5),
    dict(loss_type="sigmoid", wpo_variant="none"),
    dict(loss_type="ipo", beta=0.5),
    dict(loss_type="hinge"),
    dict(loss_type="simpo", simpo_gamma=0.3, beta=2.0),
    dict(loss_type="robust", label_smoothing=0.2),
    dict(loss_type="kto"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_loss_matches_materialised_oracle(tmp_path, records, tokenizer, case) -> None:
    """(a) The trainer's loss and gradient equal ``wpo_loss`` on statistics from the model's logits."""
    trainer = make_trainer(tmp_path, records, tokenizer, **case)
    examples = first_batch(trainer)
    policy = trainer.model
    twin = copy.deepcopy(policy)  # an unpatched-weights copy for the oracle's gradient

    loss = trainer.compute_loss(policy, trainer.data_collator(examples))
    loss.backward()
    expected = oracle_loss(trainer, twin, trainer.ref_model, examples)
    expected.backward()
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=1e-7)
    for (name, p), q in zip(policy.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad.float(), rtol=1e-3, atol=1e-6, msg=name)


def test_training_changes_parameters_and_logs_weights(tmp_path, records, tokenizer) -> None:
    """(b) A few steps move every parameter; the log has the WPO weights per side and the rewards."""
    trainer = make_trainer(tmp_path, records, tokenizer, max_steps=3)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for name, p in trainer.model.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} did not change"
    logged = trainer.state.log_history[0]
    for side in ("chosen", "rejected", "pair"):
        for stat in ("mean", "min", "max"):
            assert f"weights/{side}_{stat}" in logged
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "entropy"):
        assert key in logged
    assert logged["weights/chosen_min"] <= logged["weights/chosen_mean"] <= logged["weights/chosen_max"]
    metrics = trainer.evaluate()
    assert "eval_rewards/accuracies" in metrics and "eval_weights/pair_mean" in metrics


class MaxAllocation(TorchDispatchMode):
    """Records the largest tensor any aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.numel, self.shape, self.op = 0, (), None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.numel() > self.numel:
                self.numel, self.shape, self.op = t.numel(), tuple(t.shape), func
        return out


def test_no_logits_sized_tensor_in_a_step(tmp_path, records, tokenizer, monkeypatch) -> None:
    """(c) With V ≫ H, nothing larger than a head-sized parameter ([V, H]) is created in a training step:
    in particular nothing of the ``[B, T, V]`` logits' size (policy and reference forward, backward,
    optimizer step)."""
    vocab, hidden = 4096, 16
    monkeypatch.setattr(wpo_kernels.fallback, "CHUNK_ELEMENTS", 1024)  # vocabulary chunks of 32 columns
    trainer = make_trainer(tmp_path, records, tokenizer, model=tiny_llama(vocab, hidden), max_steps=1)
    batch = trainer.data_collator(first_batch(trainer))
    logits_numel = batch["input_ids"].numel() * vocab
    with MaxAllocation() as probe:
        trainer.train()
    assert trainer.state.global_step == 1
    assert probe.numel <= vocab * hidden < logits_numel // 4, (probe.numel, probe.shape, probe.op)


def test_lora_trains_adapter_against_disabled_adapter(tmp_path, records, tokenizer) -> None:
    """PEFT: the reference is the model with the adapter disabled; only LoRA weights move."""
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    base = copy.deepcopy(model)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trainer = WPOTrainer(
        model,
        args=make_config(tmp_path, max_steps=2),
        train_dataset=datasets.Dataset.from_list(records),
        processing_class=tokenizer,
        peft_config=config,
    )
    assert trainer.ref_model is None
    examples = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, trainer.data_collator(examples))
    expected = oracle_loss(trainer, trainer.model, base, examples)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=1e-7)

    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    frozen_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert all(not torch.equal(params[n], p) for n, p in lora_before.items())
    assert all(torch.equal(params[n], p) for n, p in frozen_before.items())


def test_precompute_ref_log_probs(tmp_path, records, tokenizer) -> None:
    """Reference log-probs precomputed by our head (no reference model kept) equal the logits' ones."""
    model = tiny_llama()
    initial = copy.deepcopy(model)
    trainer = make_trainer(
        tmp_path, records, tokenizer, model=model, ref_model=None, precompute_ref_log_probs=True
    )
    assert trainer.ref_model is None
    examples = first_batch(trainer)
    batch = trainer.data_collator(examples)
    with torch.no_grad():
        ref_c, ref_r = token_stats(initial, batch)[0].sum(1).chunk(2)
    torch.testing.assert_close(batch["ref_chosen_logps"].double(), ref_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch["ref_rejected_logps"].double(), ref_r, rtol=1e-5, atol=1e-5)
    before = trainer.model.model.embed_tokens.weight.detach().clone()
    trainer.train()
    assert not torch.equal(trainer.model.model.embed_tokens.weight, before)


def test_triton_backend_matches_torch_backend(tmp_path, records, tokenizer) -> None:
    """The same loss through the Triton kernels (the interpreter on CPU) as through the torch fallback."""
    losses = {}
    for backend in ("torch", "triton"):
        trainer = make_trainer(
            tmp_path / backend, records, tokenizer, model=tiny_llama(vocab=32), kernel_backend=backend
        )
        losses[backend] = trainer.compute_loss(trainer.model, trainer.data_collator(first_batch(trainer)))
    torch.testing.assert_close(losses["triton"], losses["torch"], rtol=1e-4, atol=1e-6)


def test_trl_fused_head_is_not_installed(tmp_path, records, tokenizer) -> None:
    trainer = make_trainer(tmp_path, records, tokenizer)
    for model in (trainer.model, trainer.ref_model):
        assert "_wpo_original_forward" in model.__dict__
        # TRL's patched forward would answer this with per-token log-probs; ours runs the model's own
        out = model(input_ids=torch.tensor([[3, 4]]), labels=torch.tensor([[3, 4]]), fused_lm_head=True)
        assert type(out).__name__ == "CausalLMOutputWithPast" and out.logits is not None


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(loss_type="apo_zero"), "loss_type"),
        (dict(loss_type=["sigmoid", "ipo"]), "single loss_type"),
        (dict(use_weighting=True), "use_weighting"),
        (dict(alignment="top1"), "alignment"),
        (dict(wpo_variant="both"), "variant"),
        (dict(weight_clamp=0.0), "weight_clamp"),
        (dict(kernel_backend="cuda"), "kernel_backend"),
        (dict(memory_budget=-1), "memory_budget"),
        (dict(f_divergence_type="js_divergence"), "f_divergence_type"),
        (dict(ld_alpha=0.5), "ld_alpha"),
        (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
    ],
)
def test_config_rejects_unsupported_options(tmp_path, options, match) -> None:
    with pytest.raises(ValueError, match=match):
        make_config(tmp_path, **options)


def test_trl_version_check() -> None:
    check_trl_version()  # the installed one is supported
    check_trl_version("1.16.4")
    for bad in ("1.15.2", "1.17.0", "2.0.0", "not-a-version"):
        with pytest.raises(ImportError, match=r"trl>=1\.16\.0,<1\.17\.0"):
            check_trl_version(bad)


def test_compute_metrics_is_rejected(tmp_path, records, tokenizer) -> None:
    with pytest.raises(ValueError, match="compute_metrics"):
        WPOTrainer(
            tiny_llama(),
            ref_model=tiny_llama(),
            args=make_config(tmp_path),
            train_dataset=datasets.Dataset.from_list(records),
            processing_class=tokenizer,
            compute_metrics=lambda p: {},
        )


@pytest.mark.parametrize("options", [dict(gradient_checkpointing=True), dict(bf16=True)], ids=str)
def test_trl_defaults_gradient_checkpointing_and_bf16_autocast(tmp_path, records, tokenizer, options) -> None:
    """DPOConfig's own defaults (gradient checkpointing on, bf16 autocast) train through the fused head."""
    trainer = make_trainer(tmp_path, records, tokenizer, max_steps=2, **options)
    before = trainer.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
    assert not torch.equal(trainer.model.model.layers[0].self_attn.q_proj.weight, before)
