"""wpo_weights against the paper's equations on materialised logits (fp64), plus its edge cases."""

import warnings

import pytest
import torch

from wpo_kernels import Alignment, fused_linear_logprobs, wpo_weights
from wpo_kernels.reference import reference_linear_logprobs, reference_wpo_weights

ALIGNMENTS = ["none", "greedy", "sampled"]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=1e-6)}


def _ragged_batch(seqs: int, length: int, vocab: int, hidden: int, dtype: torch.dtype, seed: int):
    """hidden ``[S, T, H]``, head ``[V, H]``, targets ``[S, T]`` with ragged masks; sequence 1 is empty."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(seqs, length, hidden, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g, dtype=torch.float64) / hidden**0.5 * 3).to(dtype)
    y = torch.randint(0, vocab, (seqs, length), generator=g)
    starts = torch.randint(0, length, (seqs,), generator=g)
    ends = torch.randint(1, length + 1, (seqs,), generator=g).maximum(starts + 1)
    pos = torch.arange(length)
    keep = (pos >= starts[:, None]) & (pos < ends[:, None])
    keep[1] = False
    return h, w, y.masked_fill(~keep, -100)


def _per_token(h, w, y):
    out = reference_linear_logprobs(h.reshape(-1, h.shape[-1]), w, y.reshape(-1))
    return {k: v.reshape(y.shape) for k, v in out.as_dict().items()}


@pytest.mark.parametrize("alignment", ALIGNMENTS + list(Alignment))
@pytest.mark.parametrize("clamp_max", [None, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_fp64(alignment, clamp_max, seed):
    h, w, y = _ragged_batch(5, 7, 11, 6, torch.float64, seed)
    stats = _per_token(h, w, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = wpo_weights(
            stats["logprobs"],
            stats["log_max_prob"],
            stats["log_sum_sq_probs"],
            y != -100,
            alignment,
            clamp_max=clamp_max,
        )
    want = reference_wpo_weights(h, w, y, alignment=alignment, clamp_max=clamp_max)
    assert got.dtype == torch.float64 and got.shape == (5,)
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    assert got[1] == 0
    if clamp_max is not None:
        assert bool((got <= clamp_max).all())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_from_fused_kernel_outputs_fp32(alignment, backend, device):
    """The fused kernel's statistics feed wpo_weights directly; compare with the fp64 oracle."""
    h, w, y = _ragged_batch(4, 6, 50, 16, torch.float32, seed=3)
    h, w, y = h.to(device), w.to(device), y.to(device)
    out = fused_linear_logprobs(h, w, y, outputs=("log_max_prob", "log_sum_sq_probs"), backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = wpo_weights(out.logprobs, out.log_max_prob, out.log_sum_sq_probs, y != -100, alignment)
    want = reference_wpo_weights(h.double(), w.double(), y, alignment=alignment)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, **TOL[torch.float32])


def test_sampled_alignment_is_one_in_expectation():
    """Σ_v p(v)·w(v) = Σ_v p(v)²/Σ_u p(u)² = 1 for one-token outputs: on-policy samples weigh 1 on average."""
    g = torch.Generator().manual_seed(0)
    vocab = 13
    logits = torch.randn(vocab, generator=g, dtype=torch.float64) * 2
    log_p = torch.log_softmax(logits, -1)
    lssp = torch.logsumexp(2 * log_p, -1).expand(vocab, 1)
    weights = wpo_weights(log_p[:, None], None, lssp, torch.ones(vocab, 1, dtype=torch.bool), "sampled")
    torch.testing.assert_close((log_p.exp() * weights).sum(), torch.tensor(1.0, dtype=torch.float64))


def test_greedy_alignment_gives_the_argmax_weight_one():
    h, w, y = _ragged_batch(3, 5, 9, 4, torch.float64, seed=4)
    stats = _per_token(h, w, y)
    greedy = (h @ w.T).argmax(-1)
    stats = _per_token(h, w, greedy)
    got = wpo_weights(
        stats["logprobs"],
        stats["log_max_prob"],
        None,
        torch.ones_like(greedy, dtype=torch.bool),
        Alignment.GREEDY,
    )
    torch.testing.assert_close(got, torch.ones(3, dtype=torch.float64))


def test_empty_sequence_weight_zero_and_warns():
    logprobs = -torch.rand(3, 4)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2] = False
    with pytest.warns(RuntimeWarning, match="no tokens"):
        got = wpo_weights(logprobs, None, None, mask, "none")
    assert got[2] == 0 and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got[:2], logprobs[:2].mean(-1).exp())


def test_empty_batch_and_neg_inf_logprobs():
    assert wpo_weights(
        torch.zeros(0, 4), None, torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.bool)
    ).shape == (0,)
    logprobs = -torch.rand(2, 3)
    logprobs[0, 1] = -torch.inf
    logprobs[1, 2] = -torch.inf  # ignored position: must not leak
    mask = torch.tensor([[True, True, True], [True, True, False]])
    got = wpo_weights(logprobs, None, torch.full((2, 3), -1.0), mask, "sampled")
    assert got[0] == 0 and torch.isfinite(got).all() and got[1] > 0


def test_detached_and_integer_mask():
    logprobs = (-torch.rand(2, 3)).requires_grad_()
    got = wpo_weights(logprobs, None, None, torch.ones(2, 3, dtype=torch.long), "none")
    assert not got.requires_grad
    torch.testing.assert_close(got, logprobs.detach().mean(-1).exp())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            dict(alignment="typical"),
            ValueError,
            r"alignment must be one of \['none', 'greedy', 'sampled'\].*'typical'",
        ),
        (dict(alignment="sampled", log_sum_sq_probs=None), ValueError, "log_sum_sq_probs is required"),
        (dict(alignment="greedy", log_max_prob=None), ValueError, "log_max_prob is required"),
        (
            dict(mask=torch.ones(2, 4, dtype=torch.bool)),
            ValueError,
            r"mask must have the shape of logprobs \(2, 3\)",
        ),
        (dict(mask=torch.ones(2, 3)), TypeError, "mask must be a bool"),
        (dict(logprobs=torch.zeros(6)), ValueError, r"logprobs must have shape \[B, T\]"),
        (dict(logprobs=[0.0]), TypeError, "logprobs must be a torch.Tensor"),
        (dict(log_sum_sq_probs=torch.zeros(3, 2)), ValueError, "log_sum_sq_probs must have the shape"),
        (dict(clamp_max=0.0), ValueError, "clamp_max must be a number > 0"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = dict(
        logprobs=torch.zeros(2, 3),
        log_max_prob=torch.zeros(2, 3),
        log_sum_sq_probs=torch.zeros(2, 3),
        mask=torch.ones(2, 3, dtype=torch.bool),
        alignment="sampled",
    )
    args.update(kwargs)
    clamp = args.pop("clamp_max", None)
    with pytest.raises(error, match=match):
        wpo_weights(**args, clamp_max=clamp)
