"""wpo_loss against the paper's equations on materialised logits (fp64), plus DPO / KTO identities,
the paper's gradient formula, edge cases and input errors."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import make_preference_batch
from wpo_kernels import wpo_loss, wpo_weights
from wpo_kernels.losses import LOSS_TYPES, VARIANTS
from wpo_kernels.reference import reference_linear_logprobs, reference_wpo_loss

ALIGNMENTS = ("none", "greedy", "sampled")
FP64 = dict(rtol=1e-9, atol=1e-11)
SMOOTHING = {"sigmoid": 0.1, "simpo": 0.2, "robust": 0.15}


def loss_on_materialised(h, w, ref_w, y, *, alignment, **loss_kwargs):
    """wpo_weights + wpo_loss fed from the materialised per-token oracle (differentiable logprobs)."""
    n, t, d = h.shape
    stats = reference_linear_logprobs(h.reshape(-1, d), w, y.reshape(-1))
    stats = {k: v.reshape(n, t) for k, v in stats.as_dict().items()}
    with torch.no_grad():
        ref = reference_linear_logprobs(h.reshape(-1, d), ref_w, y.reshape(-1)).logprobs.reshape(n, t)
    mask = y != -100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        weights = wpo_weights(
            stats["logprobs"], stats["log_max_prob"], stats["log_sum_sq_probs"], mask, alignment
        )
    logps, ref_logps, lengths = stats["logprobs"].sum(-1), ref.sum(-1), mask.sum(-1)
    b = n // 2
    return wpo_loss(
        logps[:b],
        logps[b:],
        ref_logps[:b],
        ref_logps[b:],
        weights[:b],
        weights[b:],
        chosen_lengths=lengths[:b],
        rejected_lengths=lengths[b:],
        **loss_kwargs,
    )


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_every_combination_matches_paper_fp64(loss_type, variant, alignment):
    seed = 100 * LOSS_TYPES.index(loss_type) + 10 * VARIANTS.index(variant) + ALIGNMENTS.index(alignment)
    h, w, _, ref_w, y = make_preference_batch(3, 6, 17, 8, seed=seed)
    h.requires_grad_()
    w.requires_grad_()
    kw = dict(loss_type=loss_type, variant=variant, beta=0.7, label_smoothing=SMOOTHING.get(loss_type, 0.0))
    kw.update(simpo_gamma=0.3, **({"kto_kl": 0.25} if loss_type == "kto" else {}))
    got = loss_on_materialised(h, w, ref_w, y, alignment=alignment, **kw).loss
    want = reference_wpo_loss(h, w, y, ref_weight=ref_w, alignment=alignment, **kw)
    torch.testing.assert_close(got, want, **FP64)
    got_grads = torch.autograd.grad(got, (h, w))
    want_grads = torch.autograd.grad(want, (h, w))
    for g_, w_ in zip(got_grads, want_grads, strict=True):
        assert g_.abs().max() > 0
        torch.testing.assert_close(g_, w_, **FP64)


def _random_logps(pairs: int, seed: int, *, requires_grad: bool = True):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-torch.rand(pairs, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    wc, wr = (torch.rand(pairs, generator=g, dtype=torch.float64) * 1.5 for _ in range(2))
    return pc.requires_grad_(requires_grad), pr.requires_grad_(requires_grad), rc, rr, wc, wr


def test_variant_none_is_plain_dpo_exactly():
    pc, pr, rc, rr, wc, wr = _random_logps(8, seed=0)
    got = wpo_loss(pc, pr, rc, rr, wc, wr, loss_type="sigmoid", variant="none", beta=0.1).loss
    want = (-F.logsigmoid(0.1 * ((pc - rc) - (pr - rr)))).mean()
    assert torch.equal(got, want)
    assert all(
        torch.equal(a, b)
        for a, b in zip(torch.autograd.grad(got, (pc, pr)), torch.autograd.grad(want, (pc, pr)), strict=True)
    )


def test_gradient_is_the_papers_formula():
    """∇L = -β·w_w·w_l·σ(r̂_l - r̂_w)[∇log π(y_w|x) - ∇log π(y_l|x)], averaged over pairs, w.r.t. hidden."""
    h, w, _, ref_w, y = make_preference_batch(2, 5, 11, 6, seed=7, empty=False)
    h.requires_grad_()
    beta = 0.5
    loss = loss_on_materialised(h, w, ref_w, y, alignment="sampled", beta=beta).loss
    (grad,) = torch.autograd.grad(loss, h)

    n, t, d = h.shape
    log_p = reference_linear_logprobs(h.reshape(-1, d), w, y.reshape(-1)).logprobs.reshape(n, t)
    logps = log_p.sum(-1)
    grad_logps = [torch.autograd.grad(logps[s], h, retain_graph=True)[0] for s in range(n)]
    with torch.no_grad():
        ref = reference_linear_logprobs(h.reshape(-1, d), ref_w, y.reshape(-1)).logprobs.reshape(n, t).sum(-1)
        stats = reference_linear_logprobs(h.reshape(-1, d), w, y.reshape(-1))
        aligned = (stats.logprobs - stats.log_sum_sq_probs).reshape(n, t)
        weights = torch.stack([aligned[s][y[s] != -100].mean().exp() for s in range(n)])
        r_hat = beta * (logps - ref)
    pairs = n // 2
    want = (
        sum(
            -beta
            * weights[i]
            * weights[pairs + i]
            * torch.sigmoid(r_hat[pairs + i] - r_hat[i])
            * (grad_logps[i] - grad_logps[pairs + i])
            for i in range(pairs)
        )
        / pairs
    )
    torch.testing.assert_close(grad, want, **FP64)


def test_weights_get_no_gradient_and_scale_the_pair_loss():
    pc, pr, rc, rr, wc, wr = _random_logps(5, seed=1)
    wc.requires_grad_()
    out = wpo_loss(pc, pr, rc, rr, wc, wr, variant="wpo_l", beta=0.2)
    out.loss.backward()
    assert wc.grad is None
    per_pair = -F.logsigmoid(0.2 * ((pc - rc) - (pr - rr)))
    torch.testing.assert_close(out.loss, (wr * per_pair).mean(), **FP64)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kto_weights_normalised_per_side(variant):
    pc, pr, rc, rr, wc, wr = _random_logps(6, seed=2)
    kl, beta = 0.4, 0.3
    out = wpo_loss(
        pc, pr, rc, rr, wc, wr, loss_type="kto", variant=variant, beta=beta, kto_kl=torch.tensor(kl)
    )
    # Rescaling one side's weights changes nothing: only w / Σw enters.
    scaled = wpo_loss(
        pc, pr, rc, rr, 3 * wc, 0.5 * wr, loss_type="kto", variant=variant, beta=beta, kto_kl=kl
    )
    torch.testing.assert_close(out.loss, scaled.loss, **FP64)
    chosen = 1 - torch.sigmoid(beta * ((pc - rc) - kl))
    rejected = 1 - torch.sigmoid(beta * (kl - (pr - rr)))
    if variant == "none":  # TRL's KTO: mean over all 2B outputs
        want = torch.cat([chosen, rejected]).mean()
    else:
        hat_c = wc / wc.sum() if variant in ("wpo", "wpo_w") else torch.full_like(wc, 1 / 6)
        hat_r = wr / wr.sum() if variant in ("wpo", "wpo_l") else torch.full_like(wr, 1 / 6)
        want = 0.5 * ((hat_c * chosen).sum() + (hat_r * rejected).sum())
    torch.testing.assert_close(out.loss, want, **FP64)
    assert out.metrics["kl"].item() == pytest.approx(kl)


def test_metrics():
    pc, pr, rc, rr, wc, wr = _random_logps(7, seed=3)
    out = wpo_loss(pc, pr, rc, rr, wc, wr, beta=0.1, variant="wpo")
    m = out.metrics
    rw, rl = 0.1 * (pc - rc).detach(), 0.1 * (pr - rr).detach()
    torch.testing.assert_close(m["rewards/chosen"], rw.mean())
    torch.testing.assert_close(m["rewards/rejected"], rl.mean())
    torch.testing.assert_close(m["rewards/margins"], (rw - rl).mean())
    torch.testing.assert_close(m["rewards/accuracies"], (rw > rl).double().mean())
    torch.testing.assert_close(m["logps/chosen"], pc.detach().mean())
    for side, ws in (("chosen", wc), ("rejected", wr), ("pair", wc * wr)):
        torch.testing.assert_close(m[f"weights/{side}_mean"], ws.mean())
        torch.testing.assert_close(m[f"weights/{side}_min"], ws.min())
        torch.testing.assert_close(m[f"weights/{side}_max"], ws.max())
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_empty_batch_is_zero_loss(loss_type):
    pc = torch.zeros(0, requires_grad=True)
    e = torch.zeros(0)
    out = wpo_loss(pc, e, e, e, e, e, loss_type=loss_type, chosen_lengths=e.long(), rejected_lengths=e.long())
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert all(torch.isfinite(v) and v == 0 for v in out.metrics.values())


def test_zero_weights_and_extreme_logps_stay_finite():
    pc = torch.tensor([-1e4, -3.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-2.0, -1e4], dtype=torch.float64)
    z = torch.zeros(2, dtype=torch.float64)
    for loss_type in LOSS_TYPES:
        out = wpo_loss(pc, pr, z, z, z, z, loss_type=loss_type, chosen_lengths=z + 3, rejected_lengths=z)
        (grad,) = torch.autograd.grad(out.loss, pc)
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_minus_inf_logps_with_zero_weight_add_nothing(loss_type):
    """A target on a masked vocabulary entry gives log-prob -inf and WPO weight 0: that pair (or output)
    drops out of the loss and its gradient instead of turning them into NaN."""
    pc = torch.tensor([-float("inf"), -3.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-2.0, -4.0], dtype=torch.float64, requires_grad=True)
    z, w = torch.zeros(2, dtype=torch.float64), torch.tensor([0.0, 0.5], dtype=torch.float64)
    lengths = dict(chosen_lengths=z + 3, rejected_lengths=z + 3)
    out = wpo_loss(pc, pr, z, z, w, w, loss_type=loss_type, **lengths)
    second = {k: v[1:] for k, v in lengths.items()}
    alone = wpo_loss(pc[1:], pr[1:], z[1:], z[1:], w[1:], w[1:], loss_type=loss_type, **second)
    grads = torch.autograd.grad(out.loss, (pc, pr))
    assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads)
    assert grads[0][0] == 0 and grads[1][0] == 0
    scale = 0.5 if loss_type != "kto" else 1.0  # the mean over 2 pairs vs 1 (KTO normalises weights)
    torch.testing.assert_close(out.loss, scale * alone.loss, **FP64)


def _good_args():
    b = torch.zeros(3)
    return dict(
        policy_chosen_logps=b,
        policy_rejected_logps=b,
        ref_chosen_logps=b,
        ref_rejected_logps=b,
        chosen_weight=b,
        rejected_weight=b,
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            dict(policy_rejected_logps=torch.zeros(4)),
            ValueError,
            r"policy_rejected_logps must have the batch size.*B=3.*B=4",
        ),
        (
            dict(ref_chosen_logps=torch.zeros(2)),
            ValueError,
            r"ref_chosen_logps must have the batch size.*B=3.*B=2",
        ),
        (dict(rejected_weight=torch.zeros(5)), ValueError, r"rejected_weight must have the batch size"),
        (dict(chosen_weight=torch.zeros(3, 1)), ValueError, r"chosen_weight must have shape \[B\]"),
        (dict(policy_chosen_logps=[0.0]), TypeError, "policy_chosen_logps must be a torch.Tensor"),
        (dict(policy_chosen_logps=torch.zeros(3, dtype=torch.long)), TypeError, "must be a floating-point"),
        (dict(loss_type="dpo"), ValueError, r"loss_type must be one of \['sigmoid', .*'kto'\], got 'dpo'"),
        (
            dict(variant="wpo_both"),
            ValueError,
            r"variant must be one of \['wpo', 'wpo_w', 'wpo_l', 'none'\], got 'wpo_both'",
        ),
        (dict(beta=0.0), ValueError, "beta must be a finite number > 0, got 0.0"),
        (dict(beta=-1), ValueError, "beta must be a finite number > 0, got -1"),
        (dict(beta=float("nan")), ValueError, "beta must be a finite number"),
        (
            dict(label_smoothing=0.5, loss_type="robust"),
            ValueError,
            r"label_smoothing must lie in \[0.0, 0.5\)",
        ),
        (
            dict(label_smoothing=0.1, loss_type="hinge"),
            ValueError,
            "label_smoothing must be 0 for loss_type='hinge'",
        ),
        (dict(ref_chosen_logps=None), ValueError, "ref_chosen_logps is required for loss_type='sigmoid'"),
        (dict(loss_type="ipo"), ValueError, r"chosen_lengths \(\[B\] token counts\) is required"),
        (
            dict(loss_type="simpo", chosen_lengths=torch.ones(3), rejected_lengths=torch.ones(2)),
            ValueError,
            "rejected_lengths must have the batch size",
        ),
        (dict(kto_kl=0.1), ValueError, "kto_kl is only used by loss_type='kto'"),
        (dict(loss_type="kto", kto_kl=torch.zeros(2)), ValueError, "kto_kl must be a scalar"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = _good_args()
    args.update(kwargs)
    positional = [args.pop(k) for k in list(_good_args())]
    with pytest.raises(error, match=match):
        wpo_loss(*positional, **args)


def test_simpo_needs_no_reference():
    pc, pr, _, _, wc, wr = _random_logps(4, seed=5)
    lc, lr = torch.tensor([3, 5, 1, 2]), torch.tensor([4, 4, 2, 7])
    out = wpo_loss(
        pc,
        pr,
        None,
        None,
        wc,
        wr,
        loss_type="simpo",
        beta=2.0,
        simpo_gamma=0.5,
        chosen_lengths=lc,
        rejected_lengths=lr,
    )
    want = (wc * wr * -F.logsigmoid(2.0 * (pc / lc - pr / lr) - 0.5)).mean()
    torch.testing.assert_close(out.loss, want, **FP64)
