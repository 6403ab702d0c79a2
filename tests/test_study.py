"""``wpo-study`` end to end at a reduced size (report structure, finite numbers), and its statistics."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("trl")

from wpo_kernels.integration.examples.decoding import decode  # noqa: E402
from wpo_kernels.integration.examples.evaluation import answer_kl  # noqa: E402
from wpo_kernels.integration.examples.significance import mcnemar_exact, wilson_interval  # noqa: E402
from wpo_kernels.integration.examples.study import addition_records, main  # noqa: E402
from wpo_kernels.integration.examples.toy_setup import build_model, load_pairs  # noqa: E402

REDUCED = [
    "--sft-steps", "150", "--steps", "3", "--batch-size", "8", "--train-prompts", "96",
    "--eval-prompts", "160", "--kl-prompts", "32", "--hidden-size", "32", "--layers", "1",
    "--lrs", "1e-4", "3e-4", "--kernel-backend", "torch", "--device", "cpu", "--threads", "1",
]  # fmt: skip
RUN_KEYS = {
    "model", "sft_seed", "method", "data", "on_policy", "lr", "accuracy", "ci95", "n_eval", "kl_to_sft",
}  # fmt: skip
METHODS = {"SFT", "continued SFT", "DPO", "WPO", "WPO (greedy)", "WPO (none)", "WPO-W", "WPO-L"}


def _finite_numbers(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite_numbers(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite_numbers(v) for v in value)
    return True


def test_study_end_to_end(tmp_path) -> None:
    assert main(["--output-dir", str(tmp_path), *REDUCED]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    runs = report["runs"]
    assert _finite_numbers(report)
    assert {r["method"] for r in runs} == METHODS
    assert {r["data"] for r in runs} == {"-", "samples of A", "samples of B", "scripted"}
    for r in runs:
        assert RUN_KEYS <= set(r), RUN_KEYS - set(r)
        assert r["n_eval"] == 160 and r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
        if r["method"] != "SFT":
            assert 0.0 <= r["p_vs_sft"] <= 1.0
        else:
            assert r["kl_to_sft"] == 0.0
        if r["method"] in ("DPO", "WPO"):
            assert {"applied_weight", "data_pair_weight", "p_vs_continued_sft"} <= set(r)
    # crossed design: both models, each on its own and the other's samples, both methods at both lrs
    crossed = {
        (r["model"], r["data"], r["method"], r["lr"]) for r in runs if r["data"].startswith("samples of")
    }
    for model, other in (("A", "B"), ("B", "A")):
        for data in (f"samples of {model}", f"samples of {other}"):
            for method in ("DPO", "WPO"):
                assert {(model, data, method, 1e-4), (model, data, method, 3e-4)} <= crossed
    wpo = [r for r in runs if r["method"] == "WPO"]
    assert all(0.0 <= r["p_wpo_vs_dpo"] <= 1.0 for r in wpo)
    dpo = [r for r in runs if r["method"] == "DPO"]
    assert all(r["applied_weight"] == 1.0 for r in dpo) and all(0.0 < r["applied_weight"] < 1.5 for r in wpo)
    weights = report["weights"]
    assert {(w["model"], w["data"]) for w in weights} == {
        (m, d) for m in "AB" for d in ("samples of A", "samples of B", "scripted")
    }
    assert sum(w["on_policy"] for w in weights) == 2
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
    md = (tmp_path / "report.md").read_text()
    for section in (
        "## Summary",
        "## SFT starts",
        "## Model-generated pairs",
        "## Alignment ablation",
        "## Mean WPO weights",
    ):
        assert section in md


def test_held_out_prompts_are_every_untrained_addition() -> None:
    trained = {r["prompt"] for r in load_pairs("train")}
    held_out = addition_records(trained)
    assert len(held_out) == 8000 and not trained & {r["prompt"] for r in held_out}
    assert {"prompt": "4 7 + 0 8 =", "chosen": " 0 5 5"} in held_out + addition_records(set())


def test_wilson_interval() -> None:
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.40383, abs=1e-5) and hi == pytest.approx(0.59617, abs=1e-5)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def test_mcnemar_exact_matches_the_binomial_tail() -> None:
    first = torch.tensor([True] * 7 + [False] * 2 + [True] * 5)
    second = torch.tensor([False] * 7 + [True] * 2 + [True] * 5)
    p, b, c = mcnemar_exact(first, second)
    tail = sum(math.comb(9, i) for i in range(3)) / 2**9  # P(X <= 2), X ~ Bin(9, 1/2)
    assert (b, c) == (7, 2) and p == pytest.approx(2 * tail, rel=1e-12)
    assert mcnemar_exact(first, first) == (1.0, 0, 0)
    with pytest.raises(ValueError, match="same length"):
        mcnemar_exact(first, first[:3])


def test_greedy_decode_matches_full_logits() -> None:
    model = build_model("gemma2", 15, hidden_size=32, num_layers=1, seed=3).eval()  # softcap on the logits
    ids = torch.randint(3, 15, (6, 5), generator=torch.Generator().manual_seed(0))
    out = decode(model, ids, 3, eos_token_id=1, pad_token_id=0)
    seq = ids
    with torch.no_grad():
        for _ in range(3):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = seq[:, 5:]
    done = torch.cumsum((expected == 1).int(), dim=1) - (expected == 1).int() > 0  # after an EOS: padding
    assert torch.equal(out, expected.masked_fill(done, 0))


def test_answer_kl_is_the_exact_token_kl_along_the_answer() -> None:
    policy = build_model("llama", 15, hidden_size=32, num_layers=1, seed=1).eval()
    start = build_model("llama", 15, hidden_size=32, num_layers=1, seed=2).eval()
    prompts = torch.randint(3, 15, (5, 4), generator=torch.Generator().manual_seed(0))
    answers = torch.tensor([[5, 6, 1, 0], [7, 1, 0, 0], [8, 9, 10, 11], [1, 0, 0, 0], [3, 4, 5, 1]])
    kl = answer_kl(policy, start, prompts, answers, eos_token_id=1)
    with torch.no_grad():
        ids = torch.cat([prompts, answers], dim=1)
        logp, logq = (torch.log_softmax(m(ids).logits[:, 3:-1].double(), -1) for m in (policy, start))
    lengths = [3, 2, 4, 1, 4]  # up to and including the EOS (token 1)
    token_kl = (logp.exp() * (logp - logq)).sum(-1)
    expected = torch.stack([token_kl[i, :n].sum() for i, n in enumerate(lengths)]).float()
    assert torch.allclose(kl, expected, rtol=1e-4, atol=1e-6)
    assert torch.allclose(answer_kl(policy, policy, prompts, answers, eos_token_id=1), torch.zeros(5))
