"""Stage 3 of :mod:`benchmarks.gpu_evidence`: the trainers end to end, on a model with a real head.

``python -m benchmarks.gpu_evidence_trainer --record PATH --cap-s S [--dry-run]`` (normally started by the
orchestrator). A random-init ``LlamaForCausalLM`` with Llama-3-8B's head (V = 128256, H = 4096) and two of its
layers, in bf16, trains on random-token preference pairs of 1–2k tokens (40% prompt) under each trainer of
:data:`TRAINERS`, from the same weights, on the same batches: our ``WPOTrainer`` against TRL 1.16's
``DPOTrainer(use_weighting=True)`` (its chunked fused head) and ``DPOTrainer(use_weighting=True,
use_liger_kernel=True)``. TRL 1.16 applies Liger's layer kernels then (RMSNorm, SwiGLU, RoPE) and keeps its
own chunked LM head: Liger's fused linear cross-entropy replaces the model's forward, which the trainer
refuses. All three compute the same WPO loss (sampled alignment, no clamp), so their first losses must agree.

Recorded per trainer: ms per step (median over the steps after the warm-up; CUDA synchronised around each
step, logging excluded), peak memory above what the models held before training (gradients, optimizer
state, activations, the head's scratch) and over the last step alone, and every logged loss. Nothing is
downloaded: the tokenizer is a word-level one built here, the models come from a config.

``--dry-run``: a tiny Llama on the CPU, our kernels in the Triton interpreter, a few steps.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import math
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_evidence_stage import StageClock, write_json
from benchmarks.run import log

ROOT = Path(__file__).resolve().parents[1]
MIB = float(1 << 20)


@dataclass(frozen=True)
class TrainerSetup:
    """The model, data and schedule of the stage."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    pairs_per_step: int
    min_len: int
    max_len: int
    prompt_fraction: float
    warmup_steps: int
    timed_steps: int


#: Llama-3-8B's head and two of its layers; 4 pairs of 1–2k tokens per step (about 12k tokens).
SETUP = TrainerSetup(128256, 4096, 2, 32, 8, 14336, 4, 1024, 2048, 0.4, 2, 5)
#: The dry run: a tiny Llama, a few steps.
DRY_SETUP = TrainerSetup(256, 64, 2, 4, 2, 128, 2, 20, 40, 0.4, 1, 2)

#: ``(provider, trainer class, config options)``: the trainers compared, in one place. ``ours`` is
#: ``WPOTrainer`` with ``WPOConfig``; the others TRL's ``DPOTrainer`` with ``DPOConfig``.
TRAINERS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("ours", "WPOTrainer", {"alignment": "sampled", "wpo_variant": "wpo"}),
    ("trl", "DPOTrainer", {"use_weighting": True}),
    ("liger", "DPOTrainer", {"use_weighting": True, "use_liger_kernel": True}),
)
#: Options the dry run adds, and why: what the CPU cannot run as the GPU does.
DRY_RUN_OPTIONS: dict[str, dict[str, Any]] = {
    "liger": {"liger_kernel_config": {"rope": False, "rms_norm": False, "swiglu": False}},
}
DRY_RUN_STAND_INS = {
    "ours": "WPOTrainer(kernel_backend='triton') with the kernels in the Triton interpreter",
    "trl": "TRL's torch tile path of its chunked head (its Triton fold runs on cuda/xpu only)",
    "liger": "use_liger_kernel=True with every Liger layer kernel switched off (liger_kernel_config): in the "
    "Triton interpreter its RMSNorm and SwiGLU kernels fail (.to() on float scalar arguments) and its RoPE "
    "kernel gave NaN losses at ~25 s a step",
}


def _ensure_integration_importable() -> None:
    """``wpo_kernels.integration`` is ``integration/`` (pyproject's package-dir): map it by hand where the
    checkout is not pip-installed (a bare GPU machine)."""
    if importlib.util.find_spec("wpo_kernels.integration") is not None:
        return
    spec = importlib.util.spec_from_file_location(
        "wpo_kernels.integration",
        ROOT / "integration" / "__init__.py",
        submodule_search_locations=[str(ROOT / "integration")],
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["wpo_kernels.integration"] = module
    spec.loader.exec_module(module)


def build_tokenizer(vocab: int) -> Any:
    """A word-level tokenizer over ``t3 … t{vocab-1}`` plus ``<pad>``, ``<eos>``, ``<unk>`` (ids 0–2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"t{i}": i for i in range(3, vocab)}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="right"
    )


def make_pairs(setup: TrainerSetup, n_pairs: int, seed: int = 0) -> list[dict[str, str]]:
    """Random-token preference pairs: each ``min_len``–``max_len`` tokens long, ``prompt_fraction`` of them
    prompt; chosen and rejected of the same length (targets spread over the whole vocabulary)."""
    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(f"t{rng.randrange(3, setup.vocab)}" for _ in range(n))

    pairs = []
    for _ in range(n_pairs):
        total = rng.randrange(setup.min_len, setup.max_len)
        prompt = round(total * setup.prompt_fraction)
        # TRL appends <eos> to each completion (one token of the total) and joins prompt and completion as
        # strings: the completion's leading space keeps the last prompt word a word of its own
        completion = total - prompt - 1
        pairs.append(
            {"prompt": words(prompt), "chosen": " " + words(completion), "rejected": " " + words(completion)}
        )
    return pairs


def build_model(setup: TrainerSetup, device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A random-init ``LlamaForCausalLM`` of ``setup``, built on ``device`` in ``dtype`` (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=setup.vocab,
        hidden_size=setup.hidden,
        intermediate_size=setup.intermediate,
        num_hidden_layers=setup.layers,
        num_attention_heads=setup.heads,
        num_key_value_heads=setup.kv_heads,
        max_position_embeddings=2 * setup.max_len,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_timer(device: str) -> Any:
    """A ``TrainerCallback`` that records each optimizer step's wall time (synchronised) and, on CUDA, each
    step's peak allocation (absolute, and for the last step above its starting level). The peak is reset at
    every step, so the whole run's peak is the largest of the steps'."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times_ms: list[float] = []
            self.step_peak_mib: float | None = None
            self.peak_bytes = 0
            self._t0 = 0.0
            self._base = 0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _sync(device)
            if device == "cuda":
                self._base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            self._t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _sync(device)
            self.times_ms.append((time.perf_counter() - self._t0) * 1e3)
            if device == "cuda":
                peak = torch.cuda.max_memory_allocated()
                self.peak_bytes = max(self.peak_bytes, peak)
                self.step_peak_mib = (peak - self._base) / MIB

    return StepTimer()


def _config(kind: str, options: dict[str, Any], setup: TrainerSetup, device: str, out: str) -> Any:
    from trl import DPOConfig

    common = dict(
        output_dir=out,
        max_steps=setup.warmup_steps + setup.timed_steps,
        per_device_train_batch_size=setup.pairs_per_step,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        data_seed=0,
        max_length=setup.max_len + 8,
        bf16=True,
        use_cpu=device == "cpu",
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if kind == "WPOTrainer":
        from wpo_kernels.integration.trl import WPOConfig

        return WPOConfig(**common, kernel_backend="triton", **options)
    return DPOConfig(**common, **options)


def run_trainer(
    name: str,
    kind: str,
    options: dict[str, Any],
    base: torch.nn.Module,
    tokenizer: Any,
    dataset: Any,
    setup: TrainerSetup,
    device: str,
) -> dict[str, Any]:
    """Train copies of ``base`` (policy and reference) for the setup's steps; the trainer's record."""
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOTrainer

    row: dict[str, Any] = {
        "provider": name,
        "peer": name,
        "mode": "trainer",
        "trainer": kind,
        "options": options,
    }
    policy, reference = copy.deepcopy(base).train(), copy.deepcopy(base).eval()
    timer = step_timer(device)
    with tempfile.TemporaryDirectory() as out:
        config = _config(kind, options, setup, device, out)
        if kind == "WPOTrainer":
            from wpo_kernels.integration.trl import WPOTrainer as trainer_cls
        else:
            trainer_cls = DPOTrainer
        trainer = trainer_cls(
            policy,
            ref_model=reference,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        trainer.remove_callback(PrinterCallback)
        _sync(device)
        before = torch.cuda.memory_allocated() if device == "cuda" else 0
        start = time.perf_counter()
        trainer.train()
        _sync(device)
        row["train_s"] = time.perf_counter() - start
        if device == "cuda":
            row["peak_mib"] = (timer.peak_bytes - before) / MIB
            row["models_mib"] = before / MIB
        row["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    timed = timer.times_ms[setup.warmup_steps :]
    finite = bool(row["losses"]) and all(math.isfinite(x) for x in row["losses"])
    row.update(
        status="ok" if timed and finite else "failed",
        step_ms=timer.times_ms,
        time_ms=statistics.median(timed) if timed else None,
        step_peak_mib=timer.step_peak_mib,
        reason=None if timed and finite else ("no timed step" if not timed else "a loss is not finite"),
    )
    if device != "cuda":
        row.update(peak_mib=None, models_mib=None)
    del trainer, policy, reference
    return row


def compare_losses(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each trainer's logged losses against ours, step by step: the largest absolute difference."""
    ours = next((r["losses"] for r in rows if r["provider"] == "ours" and r.get("losses")), None)
    out: dict[str, Any] = {}
    for r in rows:
        if r["provider"] == "ours" or not r.get("losses") or ours is None:
            continue
        k = min(len(ours), len(r["losses"]))
        out[r["provider"]] = {
            "steps": k,
            "max_abs_diff": max(abs(a - b) for a, b in zip(ours[:k], r["losses"][:k], strict=True)),
            "first_ours": ours[0],
            "first_theirs": r["losses"][0],
        }
    return out


def dataset_stats(dataset: Any, tokenizer: Any) -> dict[str, Any]:
    """Token counts of the pairs as the trainers see them (prompt + completion + <eos>)."""
    prompt = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in dataset["prompt"]]
    chosen = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 for c in dataset["chosen"]]
    totals = [a + b for a, b in zip(prompt, chosen, strict=True)]
    return {
        "pairs": len(totals),
        "sequence_tokens_min": min(totals),
        "sequence_tokens_max": max(totals),
        "sequence_tokens_mean": statistics.mean(totals),
        "prompt_fraction": sum(prompt) / sum(totals),
    }


def run_stage(record_path: Path, cap_s: float, dry_run: bool) -> int:
    """Run every trainer that fits the cap, rewriting ``record_path`` after each."""
    clock = StageClock(cap_s)
    device = "cpu" if dry_run else "cuda"
    setup = DRY_SETUP if dry_run else SETUP
    record: dict[str, Any] = {"stage": "trainer", "status": "running", "setup": asdict(setup), "rows": []}
    trainers = [(n, k, o | (DRY_RUN_OPTIONS.get(n, {}) if dry_run else {})) for n, k, o in TRAINERS]
    record["trainers"] = [{"provider": n, "trainer": k, "options": o} for n, k, o in trainers]
    record["stand_ins"] = DRY_RUN_STAND_INS if dry_run else {}

    def checkpoint() -> None:
        record["wall_s"] = round(clock.elapsed(), 1)
        write_json(record_path, record)

    checkpoint()
    if device == "cuda" and not torch.cuda.is_available():
        record.update(status="failed", error="no CUDA device visible")
        checkpoint()
        return 2
    if dry_run:
        torch.set_num_threads(1)
    _ensure_integration_importable()
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    disable_progress_bar()
    tokenizer = build_tokenizer(setup.vocab)
    n_steps = setup.warmup_steps + setup.timed_steps
    dataset = Dataset.from_list(make_pairs(setup, setup.pairs_per_step * n_steps))
    record["data"] = dataset_stats(dataset, tokenizer)
    base = build_model(setup, device, torch.bfloat16)
    record["model"] = {
        "class": type(base).__name__,
        "parameters": sum(p.numel() for p in base.parameters()),
        "dtype": "bfloat16",
    }
    checkpoint()
    gc.collect()
    gc.freeze()
    longest = 0.0
    for name, kind, options in trainers:
        if clock.left() < 1.2 * longest:
            record["rows"].append(
                {
                    "provider": name,
                    "peer": name,
                    "mode": "trainer",
                    "trainer": kind,
                    "options": options,
                    "status": "not run",
                    "reason": "stage time cap",
                }
            )
            continue
        log(f"== trainer {name}: {kind}({options}) (at {clock.elapsed():.0f} s)")
        t0 = time.perf_counter()
        try:
            row = run_trainer(name, kind, options, base, tokenizer, dataset, setup, device)
        except torch.OutOfMemoryError:
            row = {
                "provider": name,
                "peer": name,
                "mode": "trainer",
                "trainer": kind,
                "options": options,
                "status": "oom",
                "reason": "out of memory",
            }
        except Exception as e:  # noqa: BLE001 - a trainer that breaks is a finding, not the end of the stage
            row = {
                "provider": name,
                "peer": name,
                "mode": "trainer",
                "trainer": kind,
                "options": options,
                "status": "failed",
                "reason": f"{type(e).__name__}: {e}",
            }
        longest = max(longest, time.perf_counter() - t0)
        record["rows"].append(row)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        log(
            f"  {name}: {row['status']}"
            + (f", {row['time_ms']:.0f} ms/step" if row.get("time_ms") else "")
            + (f" ({row['reason']})" if row.get("reason") else "")
        )
        checkpoint()
    record["losses_vs_ours"] = compare_losses(record["rows"])
    cut = any(r["status"] == "not run" for r in record["rows"])
    record["status"] = "cut" if cut else "complete"
    checkpoint()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_evidence_trainer", description=__doc__.split("\n")[0]
    )
    ap.add_argument(
        "--record", type=Path, required=True, help="the stage's JSON record (rewritten as it goes)"
    )
    ap.add_argument("--cap-s", type=float, required=True, help="the hard cap; new work stops a little before")
    ap.add_argument("--dry-run", action="store_true", help="CPU, a tiny model, the Triton interpreter")
    args = ap.parse_args(argv)
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--dry-run needs TRITON_INTERPRET=1 in the environment (set before triton is imported)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    status = run_stage(args.record, args.cap_s, args.dry_run)
    # the record is on disk: skip the interpreter's teardown (Triton's bindings report leaks there, and a
    # stray framework thread can hang it)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
