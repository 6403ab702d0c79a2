"""``score_preference_data`` and ``wpo-score``.

(a) On the study's three data sources (a model's own samples, the other model's, the scripted pairs) under
small SFT models trained here, the mean pair weights come out in the order of the study's committed
report, and the scorer's weights equal ``WPOTrainer``'s step-0 weights on the same pairs (1e-5); the same
equality on a tiny model for conversational data and both truncation modes. (b) ``wpo-score`` end to end
on a tiny saved model: its files, finite non-negative weights, and named refusals of bad input.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

import wpo_kernels.integration.trl as trl_adapter  # noqa: E402
from tests.helpers import tiny_decoder_config  # noqa: E402
from wpo_kernels.integration.examples.study import parse_args  # noqa: E402
from wpo_kernels.integration.examples.study_runs import StudyData, sampled_pairs, sft_fixed_steps  # noqa: E402
from wpo_kernels.integration.examples.toy_setup import build_tokenizer, load_pairs  # noqa: E402
from wpo_kernels.integration.score import (  # noqa: E402
    ScoreInputError,
    score_preference_data,
    scoring_options,
)
from wpo_kernels.integration.score_cli import main  # noqa: E402
from wpo_kernels.integration.trl import WPOConfig, WPOTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "integration" / "results" / "wpo_study" / "report.json"
#: The study's model (hidden 64, 2 layers) with a shorter SFT on fewer prompts: its sample accuracy
#: (about a third) is the full study's; two models train in ~15 s on one core.
SFT_STEPS = 150
STUDY = [
    "--train-prompts", "200", "--eval-prompts", "16", "--kl-prompts", "8",
    "--kernel-backend", "torch", "--device", "cpu",
]  # fmt: skip
SOURCES = ("own samples", "other model's samples", "scripted")


def _kind(data: str, model: str) -> str:
    """The study's data source of a weight-table row, seen from ``model``."""
    if data == "scripted":
        return "scripted"
    return "own samples" if data == f"samples of {model}" else "other model's samples"


def trainer_step0_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model, tokenizer, records, **config
) -> tuple[WPOConfig, torch.Tensor, torch.Tensor]:
    """``WPOTrainer``'s config and the ``(chosen, rejected)`` weights of its first step, every pair in one
    batch, in data set order (a sequential sampler)."""
    seen = []
    real = trl_adapter.wpo_weights
    monkeypatch.setattr(trl_adapter, "wpo_weights", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    args = WPOConfig(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=len(records), max_steps=1,
        learning_rate=1e-6, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
        train_sampling_strategy="sequential", logging_steps=1, seed=0, **config,
    )  # fmt: skip
    trainer = WPOTrainer(
        copy.deepcopy(model), ref_model=copy.deepcopy(model), args=args,
        train_dataset=datasets.Dataset.from_list(records), processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    monkeypatch.undo()
    chosen, rejected = seen[0].chunk(2)
    return args, chosen, rejected


# --- (a) the study's data sources under small trained models ----------------------------------------------


@pytest.fixture(scope="module")
def study() -> dict:
    """Two SFT models of the study (seeds 0 and 1) and its three pair sources as TRL text records."""
    torch.set_num_threads(1)
    args = parse_args(STUDY)
    data = StudyData(args)
    tok = data.tokenizer
    models = {"A": sft_fixed_steps(data, 0, args, SFT_STEPS), "B": sft_fixed_steps(data, 1, args, SFT_STEPS)}
    as_text = lambda p: {  # noqa: E731 - the sampled token pairs, as the text a data set would hold
        "prompt": tok.decode(p["prompt_ids"]),
        "chosen": " " + tok.decode(p["chosen_ids"]),
        "rejected": " " + tok.decode(p["rejected_ids"]),
    }
    sources = {
        f"samples of {m}": [as_text(p) for p in sampled_pairs(models[m], data, args.samples, seed, m)[0]]
        for m, seed in (("A", 10_000), ("B", 10_001))
    }
    sources["scripted"] = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in data.train_records]
    return {"tokenizer": tok, "models": models, "sources": sources}


def test_study_sources_rank_as_in_the_report(study) -> None:
    report = json.loads(REPORT.read_text())["weights"]
    expected = {}
    for key in {(r["pair"], r["model"]) for r in report}:  # each model of each seed pair
        rows = sorted((r for r in report if (r["pair"], r["model"]) == key), key=lambda r: -r["pair_weight"])
        expected[key] = [_kind(r["data"], key[1]) for r in rows]
    orders = set(map(tuple, expected.values()))
    assert orders == {SOURCES}, f"the committed report ranks the sources {orders}"
    sizes = {data: len(pairs) for data, pairs in study["sources"].items()}
    assert min(sizes.values()) >= 50, sizes
    records = [r for pairs in study["sources"].values() for r in pairs]  # one data set, three sources
    bounds = torch.tensor([0, *sizes.values()]).cumsum(0).tolist()
    for name, model in study["models"].items():
        weights = score_preference_data(
            model, study["tokenizer"], records, batch_size=256, backend="torch"
        ).pair_weight
        means = {
            _kind(data, name): weights[lo:hi].mean().item()
            for data, lo, hi in zip(sizes, bounds[:-1], bounds[1:], strict=True)
        }
        assert sorted(means, key=lambda k: -means[k]) == list(SOURCES), (name, means)


def test_study_sources_score_as_the_trainer_weights_them(study, tmp_path, monkeypatch) -> None:
    records = [r for pairs in study["sources"].values() for r in pairs[:8]]
    model = study["models"]["A"]
    # TRL's default precision (bf16 autocast on the CPU too), sampled alignment
    args, chosen, rejected = trainer_step0_weights(tmp_path, monkeypatch, model, study["tokenizer"], records)
    scores = score_preference_data(model, study["tokenizer"], records, **scoring_options(args))
    assert scores.index.tolist() == list(range(len(records))) and not scores.dropped
    torch.testing.assert_close(scores.chosen_weight, chosen, rtol=0, atol=1e-5)
    torch.testing.assert_close(scores.rejected_weight, rejected, rtol=0, atol=1e-5)


# --- the same equality on a tiny model: conversations, truncation, alignments -----------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}assistant{% endif %}"
)


@pytest.fixture(scope="module")
def tiny() -> dict:
    records = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in load_pairs("train", 10)]
    tok = build_tokenizer(records)
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**tiny_decoder_config(len(tok), 16, initializer_range=0.5))
    return {"records": records, "tokenizer": tok, "model": transformers.LlamaForCausalLM(config).eval()}


def _conversational(r: dict) -> dict:
    return {
        "prompt": [{"role": "user", "content": r["prompt"]}],
        "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
        "rejected": [{"role": "assistant", "content": r["rejected"].strip()}],
    }


@pytest.mark.parametrize(
    "fmt, config",
    [
        ("standard", dict(max_length=8, truncation_mode="keep_start", alignment="greedy", bf16=False)),
        ("standard", dict(max_length=8, truncation_mode="keep_end", weight_clamp=0.01, bf16=False)),
        ("conversational", dict(max_length=12, alignment="none")),
    ],
)
def test_scorer_equals_trainer_step0(tiny, tmp_path, monkeypatch, fmt, config) -> None:
    long_prompt = {"prompt": " ".join(["1"] * 12), "chosen": " 2", "rejected": " 3"}  # fills max_length
    records = [*tiny["records"][:5], long_prompt, *tiny["records"][5:]]
    if fmt == "conversational":
        records = [_conversational(r) for r in records]
    model, tok = tiny["model"], tiny["tokenizer"]
    args, chosen, rejected = trainer_step0_weights(tmp_path, monkeypatch, model, tok, records, **config)
    scores = score_preference_data(model, tok, records, **scoring_options(args))
    dropped = [5] if args.truncation_mode == "keep_start" else []
    assert scores.dropped == dropped and scores.index.tolist() == [i for i in range(11) if i not in dropped]
    torch.testing.assert_close(scores.chosen_weight, chosen, rtol=0, atol=1e-5)
    torch.testing.assert_close(scores.rejected_weight, rejected, rtol=0, atol=1e-5)
    if args.truncation_mode == "keep_start" and fmt == "standard":  # 6 prompt tokens: 2 of 4 kept
        assert scores.chosen_tokens.tolist() == [2] * 10
    if args.weight_clamp is not None:  # some weights are clamped, some not
        assert 0 < (scores.rejected_weight == args.weight_clamp).sum() < len(scores)
    unclamped = scores.chosen_mean_logp.exp()
    clamped = unclamped if args.weight_clamp is None else unclamped.clamp(max=args.weight_clamp)
    torch.testing.assert_close(clamped, scores.chosen_weight)
    assert not model.training and "_wpo_original_forward" not in model.__dict__  # the model is left as it was


def test_api_refuses_bad_data(tiny) -> None:
    model, tok = tiny["model"], tiny["tokenizer"]
    with pytest.raises(ScoreInputError, match="empty"):
        score_preference_data(model, tok, [])
    with pytest.raises(ScoreInputError, match=r"no \['rejected'\] column"):
        score_preference_data(model, tok, [{"prompt": "1 =", "chosen": " 1"}])
    with pytest.raises(ScoreInputError, match="row 1: missing field 'chosen'"):
        score_preference_data(model, tok, [tiny["records"][0], {"prompt": "1 =", "rejected": " 2"}])
    with pytest.raises(ScoreInputError, match="row 0: field 'chosen' must be"):
        score_preference_data(model, tok, [{"prompt": "1 =", "chosen": 3, "rejected": " 2"}])
    nothing_left = score_preference_data(model, tok, tiny["records"][:2], max_length=3)  # 6 prompt tokens
    assert len(nothing_left) == 0 and nothing_left.dropped == [0, 1]


# --- (b) wpo-score end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_model")
    tiny["model"].save_pretrained(path)
    tiny["tokenizer"].save_pretrained(path)
    return path


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_wpo_score_end_to_end(tiny, saved_model, tmp_path, capsys) -> None:
    rows = [{**r, "source": "first" if i < 6 else "second"} for i, r in enumerate(tiny["records"])]
    rows[0]["id"] = "pair-zero"
    data = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out"
    argv = ["--model", str(saved_model), "--data", str(data), "--out", str(out), "--split-by", "source"]
    assert main([*argv, "--batch-size", "4", "--kernel-backend", "torch"]) == 0
    printed = capsys.readouterr().out
    assert "first" in printed and "second" in printed and "pairs/s" in printed
    weights = [json.loads(line) for line in (out / "weights.jsonl").read_text().splitlines()]
    assert [w["id"] for w in weights] == ["pair-zero", *(f"pairs.jsonl:{i}" for i in range(2, 11))]
    for w in weights:
        for key in ("pair_weight", "chosen_weight", "rejected_weight"):
            assert math.isfinite(w[key]) and w[key] >= 0, w
        assert w["chosen_tokens"] == 4 and w["group"] in ("first", "second")
    # the CLI's weights are the API's (the model loaded back from disk)
    api = score_preference_data(tiny["model"], tiny["tokenizer"], tiny["records"], batch_size=4)
    assert [w["pair_weight"] for w in weights] == pytest.approx(api.pair_weight.tolist(), abs=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scored"] == summary["pairs"] == 10 and summary["split_by"] == "source"
    assert summary["groups"]["first"]["pair_weight"]["n"] == 6
    assert summary["overall"]["pair_weight"]["mean"] == pytest.approx(api.pair_weight.mean().item(), abs=1e-6)
    assert set(summary["overall"]["pair_weight"]["fraction_below"]) == {"0.25", "0.5", "0.75"}
    assert (out / "weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wpo_score_refuses_bad_input(tiny, saved_model, tmp_path, capsys) -> None:
    good = _write_jsonl(tmp_path / "good.jsonl", tiny["records"][:2])
    missing = _write_jsonl(tmp_path / "m.jsonl", [tiny["records"][0], {"prompt": "1 =", "chosen": " 1"}])
    cases = {
        "missing field": ({"--data": missing}, r"m\.jsonl line 2: missing field 'rejected'"),
        "empty file": ({"--data": _write_jsonl(tmp_path / "e.jsonl", [])}, r"e\.jsonl: the file is empty"),
        "no model": ({"--model": tmp_path / "nowhere"}, r"--model \S*nowhere: no such directory"),
        "split field": ({"--split-by": "source"}, r"good\.jsonl line 1: missing field 'source'"),
    }
    for name, (override, message) in cases.items():
        options = {"--model": saved_model, "--data": good, "--out": tmp_path / name, **override}
        assert main([str(x) for option in options.items() for x in option]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("wpo-score: error:") and re.search(message, err), (name, err)
        assert not (tmp_path / name).exists(), name  # nothing written


def test_wpo_score_is_a_console_script() -> None:
    scripts = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    assert re.search(r'^wpo-score = "wpo_kernels\.integration\.score_cli:main"$', scripts, re.M), scripts
