"""``wpo-study``: a reduced study end to end, its SFT band, its claim counting and statistics, and that the
committed report, its Markdown and the README sections written from it agree."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from trl.trainer.dpo_trainer import DataCollatorForPreference  # noqa: E402

from wpo_kernels.integration.examples import study_runs  # noqa: E402
from wpo_kernels.integration.examples.decoding import decode  # noqa: E402
from wpo_kernels.integration.examples.evaluation import (  # noqa: E402
    AnswerSet,
    answer_kl,
    greedy_correct,
    teacher_forced_correct,
)
from wpo_kernels.integration.examples.preference_loop import CollatedPairs  # noqa: E402
from wpo_kernels.integration.examples.significance import (  # noqa: E402
    mcnemar_exact,
    pooled_mcnemar,
    sign_test,
    welch_z,
    wilson_interval,
)
from wpo_kernels.integration.examples.study import main, parse_args  # noqa: E402
from wpo_kernels.integration.examples.study_claims import (  # noqa: E402
    CLAIMS,
    count_claims,
    pack_bits,
    unpack_bits,
)
from wpo_kernels.integration.examples.study_readme import (  # noqa: E402
    REPORT,
    SECTION,
    SUMMARY,
    between,
    section,
    summary_block,
)
from wpo_kernels.integration.examples.study_report import markdown  # noqa: E402
from wpo_kernels.integration.examples.study_runs import addition_records  # noqa: E402
from wpo_kernels.integration.examples.toy_setup import build_model, build_tokenizer, load_pairs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REDUCED = [
    "--sft-seeds", "0", "1", "--sft-band", "0.0", "1.0", "--sft-check-every", "100", "--steps", "3",
    "--batch-size", "8", "--train-prompts", "96", "--val-prompts", "100", "--eval-prompts", "160",
    "--kl-prompts", "32", "--hidden-size", "32", "--layers", "1", "--kernel-backend", "torch",
    "--device", "cpu", "--threads", "1",
]  # fmt: skip
CLAIM_KEYS = {"claim", "held", "of", "significant", "test", "p", "sign_test_p", "verdict", "per_pair"}
RUN_KEYS = {"pair", "model", "sft_seed", "method", "data", "on_policy", "lr", "steps", "role", "accuracy",
            "ci95", "n_eval", "kl_to_sft", "correct_bits"}  # fmt: skip


def _finite_numbers(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite_numbers(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite_numbers(v) for v in value)
    return True


def _recount(report: dict) -> list[dict]:
    correct = [unpack_bits(r["correct_bits"], r["n_eval"]) for r in report["runs"]]
    return count_claims(report["runs"], correct, report["weights"], report["settings"]["lrs"][0])


def test_study_end_to_end(tmp_path: Path) -> None:
    assert main(["--output-dir", str(tmp_path), *REDUCED]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    runs = report["runs"]
    assert _finite_numbers({k: v for k, v in report.items() if k != "claims"})
    assert len(runs) == 2 * (2 + 4 + 4) + 2  # per model: SFT, continued SFT, 4 crossed, 4 ablation; + check
    for r in runs:
        assert RUN_KEYS <= set(r), RUN_KEYS - set(r)
        assert r["n_eval"] == 160 and r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
        assert int(unpack_bits(r["correct_bits"], 160).sum()) == r["correct"]
    assert [(s["pair"], s["model"], s["steps"]) for s in report["sft_starts"]] == [
        (1, "A", 100),
        (1, "B", 100),
    ]
    assert [c["key"] for c in report["claims"]] == [c.key for c in CLAIMS]
    for claim in report["claims"]:
        assert CLAIM_KEYS <= set(claim) and claim["of"] == 1 and 0.0 <= claim["p"] <= 1.0
    assert _recount(report) == report["claims"]
    assert [r["steps"] for r in runs if r["role"] == "steps check"] == [6, 6]
    assert all(r["curve"][0][0] == 0 and r["curve"][-1][0] == r["steps"] for r in runs if r["data"] != "-")
    assert (tmp_path / "claims.png").stat().st_size > 10_000
    assert (tmp_path / "report.md").read_text() == markdown(report, tmp_path / "claims.png")


def test_sft_start_stops_at_the_first_check_inside_the_band(monkeypatch: pytest.MonkeyPatch) -> None:
    args = parse_args(
        REDUCED + ["--sft-band", "0.5", "0.7", "--sft-check-every", "2", "--sft-max-steps", "8"]
    )
    data = study_runs.StudyData(args)
    readings = iter([0.1, 0.8, 0.6, 0.65])
    monkeypatch.setattr(study_runs, "validation_accuracy", lambda model, data: next(readings))
    _, start = study_runs.sft_to_band(data, 0, args, desc="test")
    assert (start.steps, start.val_accuracy, start.in_band) == (6, 0.6, True)
    assert start.checks == [(2, 0.1), (4, 0.8), (6, 0.6)]
    monkeypatch.setattr(study_runs, "validation_accuracy", lambda model, data: 0.9)
    _, start = study_runs.sft_to_band(data, 0, args, desc="test")
    assert (start.steps, start.in_band) == (8, False)


def test_study_refuses_a_start_outside_the_band(tmp_path: Path) -> None:
    args = ["--sft-band", "0.99", "1.0", "--sft-max-steps", "10", "--sft-check-every", "5"]
    with pytest.raises(SystemExit, match="outside --sft-band"):
        main(["--output-dir", str(tmp_path), *REDUCED, *args])


def test_claims_count_held_significant_and_pooled() -> None:
    """Two seed pairs built by hand: WPO beats DPO off-policy in both (on 40 and on 4 prompts, so
    significantly in one), everything else ties; the counts, tests and verdicts follow the definitions."""
    n = 200
    rows, correct = [], []

    def add(
        pair: int, model: str, method: str, data: str, on_policy: bool | None, hits: torch.Tensor
    ) -> None:
        rows.append({"pair": pair, "model": model, "method": method, "data": data, "on_policy": on_policy,
                     "lr": 1e-5, "role": "design", "accuracy": hits.float().mean().item()})  # fmt: skip
        correct.append(hits)

    base = torch.arange(n) % 2 == 0
    for pair, gain in ((1, 40), (2, 4)):
        for model in ("A", "B"):
            add(pair, model, "SFT", "-", None, base)
            add(pair, model, "continued SFT", "-", None, base)
            for data, on in (("own", True), ("other", False)):
                for method in ("DPO", "WPO (greedy)", "WPO (none)", "WPO-W", "WPO-L"):
                    add(pair, model, method, data, on, base)
                better = base.clone()
                better[1 : 2 * gain : 2] = data == "other"  # WPO right on `gain` more odd prompts, off-policy
                add(pair, model, "WPO", data, on, better)
    weights = [{"pair": p, "kind": k, "pairs": 500, "pair_weight": w, "pair_weight_sd": 0.1}
               for p in (1, 2) for k, w in (("own", 0.9), ("other", 0.8), ("scripted", 0.8))]  # fmt: skip
    claims = {c["key"]: c for c in count_claims(rows, correct, weights, 1e-5)}
    off = claims["wpo_vs_dpo_off"]
    assert (off["held"], off["of"], off["significant"], off["verdict"]) == (2, 2, 1, "holds")
    assert off["p"] == sign_test(40, 0)  # prompts 1, 3, ..., 79 each won by WPO, nowhere lost
    assert off["sign_test_p"] == sign_test(2, 0) == 0.5
    on = claims["wpo_vs_dpo_on"]
    assert (on["held"], on["significant"], on["opposite"], on["verdict"]) == (0, 0, 0, "not shown")
    assert claims["on_vs_off_wpo"]["opposite"] == 2 and claims["wpo_vs_sft"]["held"] == 2
    assert claims["weight_own_vs_other"]["verdict"] == "holds"
    assert claims["weight_other_vs_scripted"]["held"] == 0 and claims["weight_other_vs_scripted"]["p"] == 1.0


def test_committed_report_claims_markdown_and_readme_agree() -> None:
    report = json.loads((ROOT / REPORT).read_text())
    assert _recount(report) == report["claims"]
    assert len(report["sft_starts"]) >= 6  # at least three seed pairs
    low, high = report["settings"]["sft_band"]
    assert all(s["in_band"] and low <= s["val_accuracy"] <= high for s in report["sft_starts"])
    assert (ROOT / REPORT.parent / "report.md").read_text() == markdown(
        report, ROOT / REPORT.parent / "claims.png"
    )
    assert between((ROOT / "integration" / "README.md").read_text(), SECTION) == section(report)
    for readme in (ROOT / "README.md", ROOT / "integration" / "README.md"):  # wherever a summary is included
        block = between(readme.read_text(), SUMMARY)
        assert block is None or block == summary_block(report)


def test_teacher_forced_accuracy_equals_greedy_decoding() -> None:
    tokenizer = build_tokenizer(load_pairs("train") + load_pairs("test"))
    model = build_model("llama", len(tokenizer), hidden_size=32, num_layers=1, seed=5).eval()
    records = addition_records(set())[:64]
    guess = greedy_correct(model, tokenizer, records, device="cpu")
    assert not guess.any()  # an untrained model: make half the "correct" answers its own greedy output
    ids = torch.tensor([tokenizer(r["prompt"])["input_ids"] for r in records])
    out = decode(model, ids, 4, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    items = []
    for i, (row, r) in enumerate(zip(out.tolist(), records, strict=True)):
        answer = tokenizer(r["prompt"] + r["chosen"] + tokenizer.eos_token)["input_ids"][ids.shape[1] :]
        items.append((ids[i].tolist(), row if i % 2 == 0 else answer))
    expected = torch.tensor([i % 2 == 0 for i in range(64)])
    assert torch.equal(teacher_forced_correct(model, AnswerSet.of(items), batch_size=24), expected)


def test_collated_pairs_give_the_collators_batches() -> None:
    gen = torch.Generator().manual_seed(0)
    examples = [
        {key: torch.randint(3, 20, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen).tolist()
         for key in ("prompt_ids", "chosen_ids", "rejected_ids")}
        for _ in range(12)
    ]  # fmt: skip
    pairs = CollatedPairs.of(examples, pad_token_id=0)
    collate = DataCollatorForPreference(pad_token_id=0)
    for idx in ([3, 0, 7], [5], list(range(12))):
        batch, labels = pairs.batch(idx, "cpu")
        expected = collate([examples[i] for i in idx])
        for key in ("input_ids", "attention_mask", "completion_mask"):
            assert torch.equal(batch[key], expected[key]), key
        assert torch.equal(
            labels, expected["input_ids"].masked_fill(expected["completion_mask"] == 0, -100)[:, 1:]
        )


def test_held_out_prompts_are_every_untrained_addition() -> None:
    trained = {r["prompt"] for r in load_pairs("train")}
    held_out = addition_records(trained)
    assert len(held_out) == 8000 and not trained & {r["prompt"] for r in held_out}
    assert {"prompt": "4 7 + 0 8 =", "chosen": " 0 5 5"} in held_out + addition_records(set())
    data = study_runs.StudyData(argparse.Namespace(train_prompts=None, val_prompts=1000, eval_prompts=None,
                                                   kl_prompts=10))  # fmt: skip
    assert (data.validation.size, data.evaluation.size) == (1000, 7000)
    seen = [set(map(tuple, g[1].tolist())) for g in data.validation.groups + data.evaluation.groups]
    assert sum(map(len, seen)) == 8000 and len(set().union(*seen)) == 8000  # disjoint splits


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
    assert pooled_mcnemar(first.int() - second.int()) == (p, b, c)  # one comparison: McNemar itself
    with pytest.raises(ValueError, match="same length"):
        mcnemar_exact(first, first[:3])


def test_sign_and_welch_tests() -> None:
    assert sign_test(4, 0) == 0.125 and sign_test(0, 0) == 1.0 and sign_test(3, 3) == 1.0
    assert sign_test(9, 1) == pytest.approx(2 * 11 / 1024, rel=1e-12)
    assert welch_z((1.0, 0.5, 400), (0.9, 0.5, 400)) == pytest.approx(math.erfc(2.8284271 / math.sqrt(2)))
    with pytest.raises(ValueError, match="at least 2"):
        welch_z((1.0, 0.5, 1), (0.9, 0.5, 400))


def test_bits_round_trip() -> None:
    hits = torch.rand(1003, generator=torch.Generator().manual_seed(1)) > 0.4
    assert torch.equal(unpack_bits(pack_bits(hits), 1003), hits)


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
