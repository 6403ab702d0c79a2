"""fused_linear_wpo_loss / FusedLinearWPOLoss against the paper's equations on materialised logits
(fp64, values and gradients w.r.t. hidden, weight and bias), both backends, and against TRL 1.16's own
``DPOTrainer._compute_loss`` with ``use_weighting=True``."""

import types
from collections import defaultdict

import pytest
import torch

from tests.helpers import make_preference_batch, tiny_decoder_config
from wpo_kernels import FusedLinearWPOLoss, fused_linear_wpo_loss
from wpo_kernels.losses import LOSS_TYPES, VARIANTS
from wpo_kernels.reference import reference_wpo_loss

ALIGNMENTS = ("none", "greedy", "sampled")
SMOOTHING = {"sigmoid": 0.1, "simpo": 0.2, "robust": 0.15}
pytestmark = pytest.mark.filterwarnings("ignore:wpo_weights. a sequence has no tokens:RuntimeWarning")
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-4, atol=2e-6)}


def _options(loss_type, variant, alignment):
    kw = dict(loss_type=loss_type, variant=variant, alignment=alignment, beta=0.7, simpo_gamma=0.3)
    kw["label_smoothing"] = SMOOTHING.get(loss_type, 0.0)
    if loss_type == "kto":
        kw["kto_kl"] = 0.25
    return kw


def _check_against_reference(dtype, backend, device, loss_type, variant, alignment, seed, **transform):
    h, w, b, ref_w, y = make_preference_batch(3, 5, 37, 16, dtype=dtype, seed=seed, device=device)
    kw = _options(loss_type, variant, alignment)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    got = fused_linear_wpo_loss(
        leaves[0], leaves[1], y, bias=leaves[2], ref_weight=ref_w, backend=backend, **kw, **transform
    ).loss
    got_grads = torch.autograd.grad(got, leaves)

    exact = [t.detach().double().cpu().requires_grad_() for t in (h, w, b)]
    want = reference_wpo_loss(
        exact[0], exact[1], y.cpu(), bias=exact[2], ref_weight=ref_w.double().cpu(), **kw, **transform
    )
    want_grads = torch.autograd.grad(want, exact)
    torch.testing.assert_close(got.double().cpu(), want, **TOL[dtype])
    for name, g_, w_ in zip(("hidden", "weight", "bias"), got_grads, want_grads, strict=True):
        assert w_.abs().max() > 0, name
        torch.testing.assert_close(g_.double().cpu(), w_, **TOL[dtype], msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_every_combination_torch_backend_fp64(loss_type, variant, alignment):
    seed = 100 * LOSS_TYPES.index(loss_type) + 10 * VARIANTS.index(variant) + ALIGNMENTS.index(alignment)
    _check_against_reference(torch.float64, "torch", "cpu", loss_type, variant, alignment, seed)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_triton_backend_fp32(loss_type, alignment, device):
    """The Triton kernels (interpreter on CPU) through the whole loss; every variant appears once per loss."""
    variant = VARIANTS[(LOSS_TYPES.index(loss_type) + ALIGNMENTS.index(alignment)) % len(VARIANTS)]
    _check_against_reference(torch.float32, "triton", device, loss_type, variant, alignment, seed=7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logit_transform(backend, device):
    dtype = torch.float64 if backend == "torch" else torch.float32
    _check_against_reference(
        dtype,
        backend,
        device,
        "sigmoid",
        "wpo",
        "sampled",
        seed=11,
        temperature=0.7,
        softcap=3.0,
        logit_scale=1.3,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
@pytest.mark.parametrize(("block_rows", "softcap"), [(1, 3.0), (5, None), (7, None), (12, None), (7, 3.0)])
def test_torch_step_in_small_blocks(monkeypatch, dtype, loss_type, block_rows, softcap):
    """The torch backend's one-pass step (wpo_kernels/fallback_step.py) with blocks of ``block_rows``
    tokens (two blocks live with a softcap): pairs longer than a block are walked in blocks, shorter ones
    grouped (pairs here hold 2–10 kept tokens), through the logit transform."""
    blocks = 1 if softcap is None else 2
    monkeypatch.setattr("wpo_kernels.fallback.block_elements", lambda: blocks * block_rows * 37)
    _check_against_reference(
        dtype, "torch", "cpu", loss_type, "wpo", "greedy", seed=13, softcap=softcap, temperature=0.8
    )


def test_reference_head_equals_precomputed_and_gets_no_gradient():
    h, w, b, ref_w, y = make_preference_batch(2, 6, 23, 8, dtype=torch.float64, seed=3)
    ref_h = (h + 0.1 * torch.randn_like(h)).requires_grad_()
    ref_w.requires_grad_()
    ref_b = torch.zeros_like(b).requires_grad_()
    out = fused_linear_wpo_loss(h, w, y, ref_hidden=ref_h, ref_weight=ref_w, ref_bias=ref_b, backend="torch")
    with torch.no_grad():
        full = torch.log_softmax(ref_h @ ref_w.T, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
        ref = torch.where(y != -100, full, 0.0).sum(-1)
    given = fused_linear_wpo_loss(h, w, y, ref[:2], ref[2:], backend="torch")
    torch.testing.assert_close(out.loss, given.loss, **TOL[torch.float64])
    assert (
        not out.loss.requires_grad
    )  # nothing of the policy requires grad here, and the reference never does
    w.requires_grad_()
    out = fused_linear_wpo_loss(h, w, y, ref_hidden=ref_h, ref_weight=ref_w, ref_bias=ref_b, backend="torch")
    out.loss.backward()
    assert w.grad is not None and ref_w.grad is None and ref_h.grad is None and ref_b.grad is None


def test_module_matches_function():
    h, w, b, ref_w, y = make_preference_batch(2, 6, 23, 8, dtype=torch.float64, seed=4)
    kw = dict(beta=0.3, loss_type="ipo", variant="wpo_l", alignment="greedy", clamp_max=1.0, backend="torch")
    module = FusedLinearWPOLoss(**kw)
    assert "loss_type='ipo'" in repr(module)
    got = module(w, h, y, b, ref_weight=ref_w)
    want = fused_linear_wpo_loss(h, w, y, bias=b, ref_weight=ref_w, **kw)
    assert torch.equal(got.loss, want.loss)
    assert got.metrics.keys() == want.metrics.keys()
    assert want.metrics["weights/chosen_max"] <= 1.0


def test_empty_batch():
    h = torch.zeros(0, 4, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    y = torch.zeros(0, 4, dtype=torch.long)
    out = fused_linear_wpo_loss(h, w, y, torch.zeros(0), torch.zeros(0), backend="torch")
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert w.grad is not None and not w.grad.any()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            dict(targets=torch.zeros(5, 4, dtype=torch.long), hidden=torch.zeros(5, 4, 8)),
            ValueError,
            "targets must hold an even number of sequences.*got 5",
        ),
        (
            dict(targets=torch.zeros(8, dtype=torch.long), hidden=torch.zeros(8, 8)),
            ValueError,
            r"targets must have shape \[2B, T\]",
        ),
        (dict(hidden=torch.zeros(16, 8)), ValueError, r"hidden must have shape \[2B, T, H\]"),
        (
            dict(ref_chosen_logps=torch.zeros(3), ref_rejected_logps=torch.zeros(2)),
            ValueError,
            r"ref_chosen_logps must have the batch size of policy_chosen_logps \(B=2\), got B=3",
        ),
        (
            dict(ref_chosen_logps=None, ref_rejected_logps=None),
            ValueError,
            "loss_type='sigmoid' needs the reference",
        ),
        (dict(ref_rejected_logps=None), ValueError, "must be given together"),
        (
            dict(ref_weight=torch.zeros(10, 8)),
            ValueError,
            "either ref_chosen_logps/ref_rejected_logps or ref_weight",
        ),
        (
            dict(ref_chosen_logps=None, ref_rejected_logps=None, ref_hidden=torch.zeros(4, 4, 8)),
            ValueError,
            "ref_hidden/ref_bias need ref_weight",
        ),
        (dict(loss_type="orpo"), ValueError, r"loss_type must be one of .*got 'orpo'"),
        (dict(variant="wpo-l"), ValueError, r"variant must be one of .*got 'wpo-l'"),
        (dict(alignment="top1"), ValueError, r"alignment must be one of .*got 'top1'"),
        (dict(beta=0), ValueError, "beta must be a finite number > 0, got 0"),
        (
            dict(weight=torch.zeros(10, 7)),
            ValueError,
            r"weight must have shape \[V, H\] with H = hidden.shape\[-1\]",
        ),
        (
            dict(weight=torch.zeros(10, 8, dtype=torch.float64)),
            TypeError,
            "weight must have the dtype of hidden",
        ),
    ],
)
def test_bad_input(kwargs, error, match):
    args = dict(
        hidden=torch.zeros(4, 4, 8),
        weight=torch.zeros(10, 8),
        targets=torch.zeros(4, 4, dtype=torch.long),
        ref_chosen_logps=torch.zeros(2),
        ref_rejected_logps=torch.zeros(2),
        backend="torch",
    )
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fused_linear_wpo_loss(**args)


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="beta must be a finite number > 0, got -0.1"):
        FusedLinearWPOLoss(beta=-0.1)
    with pytest.raises(ValueError, match="alignment must be one of"):
        FusedLinearWPOLoss(alignment="best")
    with pytest.raises(ValueError, match="backend must be one of"):
        FusedLinearWPOLoss(backend="cuda")


# --- TRL 1.16: the same batch through DPOTrainer._compute_loss (its own fused head and WPO weights) ---

TRL_TOL = dict(rtol=1e-5, atol=1e-6)  # both fp32; measured: loss and grad within 1e-6 relative (5 seeds)


def _trl_batch(pairs: int = 3, length: int = 10, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    trl_utils = pytest.importorskip("trl.trainer.utils")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**tiny_decoder_config(64, 32, max_position_embeddings=64))
    model = transformers.LlamaForCausalLM(config).eval()
    trl_utils.add_fused_lm_head(
        model, outputs=("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
    )
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2 * pairs, length), generator=g)
    attention = torch.ones(2 * pairs, length, dtype=torch.long)
    completion = torch.zeros(2 * pairs, length, dtype=torch.long)
    for i in range(2 * pairs):  # prompt of 2-4 tokens, a non-empty completion, right padding
        start = int(torch.randint(2, 5, (), generator=g))
        end = int(torch.randint(start + 2, length + 1, (), generator=g))
        completion[i, start:end] = 1
        attention[i, end:] = 0
    ref = -30 * torch.rand(2 * pairs, generator=g)
    inputs = dict(
        input_ids=ids,
        attention_mask=attention,
        completion_mask=completion,
        ref_chosen_logps=ref[:pairs],
        ref_rejected_logps=ref[pairs:],
    )
    return model, inputs


def _trl_loss(model, inputs, loss_type: str, beta: float, label_smoothing: float, use_weighting: bool):
    """TRL's own loss code path: ``DPOTrainer._compute_loss`` on a stand-in trainer holding only the
    attributes that path reads (single process, precomputed reference log-probs)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    accelerator = types.SimpleNamespace(
        device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x
    )
    trainer = types.SimpleNamespace(
        model=model,
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=use_weighting,
        _tp_size=1,
        _total_train_tokens=0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=types.SimpleNamespace(),
    )
    return DPOTrainer._compute_loss(trainer, model, inputs, False)


def _ours(model, inputs, **kwargs):
    hidden = model.model(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
    ).last_hidden_state
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)[:, 1:]
    return fused_linear_wpo_loss(
        hidden[:, :-1],
        model.lm_head.weight,
        labels,
        inputs["ref_chosen_logps"],
        inputs["ref_rejected_logps"],
        backend="torch",
        **kwargs,
    ).loss


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing", "use_weighting", "variant"),
    [
        ("sigmoid", 0.0, True, "wpo"),
        ("ipo", 0.0, True, "wpo"),
        ("robust", 0.2, True, "wpo"),
        ("hinge", 0.0, True, "wpo"),
        ("sigmoid", 0.0, False, "none"),
    ],
)
def test_matches_trl_use_weighting(loss_type, label_smoothing, use_weighting, variant):
    """Sampled-alignment WPO = TRL 1.16 ``use_weighting=True`` (no clamp), loss and d(lm_head.weight);
    ``variant="none"`` = TRL's plain DPO. Tolerance ``TRL_TOL`` (fp32 on both sides)."""
    model, inputs = _trl_batch()
    beta = 0.1
    weight = model.lm_head.weight
    # TRL 1.16 scales the hinge loss in place (`per_sequence_loss *= weights`) after relu saved its output,
    # so its backward raises for hinge + use_weighting; compare that case's value only.
    with torch.set_grad_enabled(loss_type != "hinge"):
        theirs = _trl_loss(model, inputs, loss_type, beta, label_smoothing, use_weighting)
    ours = _ours(
        model,
        inputs,
        loss_type=loss_type,
        beta=beta,
        label_smoothing=label_smoothing,
        alignment="sampled",
        variant=variant,
    )
    torch.testing.assert_close(ours, theirs.detach(), **TRL_TOL)
    if loss_type == "hinge":
        return
    (g_theirs,) = torch.autograd.grad(theirs, weight)
    (g_ours,) = torch.autograd.grad(ours, weight)
    assert g_ours.abs().max() > 0
    torch.testing.assert_close(g_ours, g_theirs, **TRL_TOL)
