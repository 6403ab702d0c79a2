"""``WPOTrainer`` logs histograms of the pair weights to TensorBoard beside the mean/min/max scalars: the
values of every step since the last log, for training and evaluation; nothing is kept without TensorBoard."""

from __future__ import annotations

import copy
from collections import defaultdict

import numpy as np
import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from transformers.integrations import TensorBoardCallback  # noqa: E402

import wpo_kernels.integration.trl as trl_adapter  # noqa: E402
from tests.helpers import tiny_decoder_config  # noqa: E402
from wpo_kernels.integration.examples.toy_setup import build_tokenizer, load_pairs  # noqa: E402
from wpo_kernels.integration.trl import WPOConfig, WPOTrainer  # noqa: E402

BATCH = 4
TAGS = {f"{mode}/weights/{name}" for mode in ("train", "eval") for name in ("chosen", "rejected", "pair")}


class RecordingWriter:
    """The part of a ``SummaryWriter`` the callbacks use, keeping what is written."""

    def __init__(self) -> None:
        self.histograms: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
        self.scalars: dict[str, list[tuple[int, float]]] = defaultdict(list)

    def add_histogram(self, tag: str, values: np.ndarray, global_step: int) -> None:
        self.histograms[tag].append((global_step, np.array(values)))

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self.scalars[tag].append((global_step, value))

    def add_text(self, *args: object, **kwargs: object) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class RecordingTensorBoard(TensorBoardCallback):
    """TRL's TensorBoard integration with a recording writer (no ``tensorboard`` package needed)."""

    def __init__(self) -> None:
        self.writer = self.tb_writer = RecordingWriter()
        self.logging_dir = None
        self._SummaryWriter = lambda **_: self.writer  # reopened after training, like a SummaryWriter


@pytest.fixture(scope="module")
def setup() -> dict:
    records = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in load_pairs("train", 12)]
    tok = build_tokenizer(records)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**tiny_decoder_config(len(tok), 16, initializer_range=0.5))
    return {"records": records, "tokenizer": tok, "model": transformers.LlamaForCausalLM(config)}


def make_trainer(setup: dict, tmp_path, callbacks=None, report_to=None) -> WPOTrainer:
    args = WPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
        max_steps=3, logging_steps=2, learning_rate=1e-2, use_cpu=True, bf16=False, save_strategy="no",
        report_to=report_to or [], disable_tqdm=True, kernel_backend="torch", seed=0,
    )  # fmt: skip
    model = copy.deepcopy(setup["model"])
    return WPOTrainer(
        model, ref_model=copy.deepcopy(model), args=args, callbacks=callbacks,
        train_dataset=datasets.Dataset.from_list(setup["records"]),
        eval_dataset=datasets.Dataset.from_list(setup["records"][:6]), processing_class=setup["tokenizer"],
    )  # fmt: skip


def test_histograms_hold_every_weight_since_the_last_log(setup, tmp_path, monkeypatch) -> None:
    seen = []  # the (chosen, rejected) weights of every compute_loss
    real = trl_adapter.wpo_weights

    def recording(*args: object, **kwargs: object) -> torch.Tensor:
        weights = real(*args, **kwargs)
        seen.append(weights.chunk(2))
        return weights

    monkeypatch.setattr(trl_adapter, "wpo_weights", recording)
    callback = RecordingTensorBoard()
    trainer = make_trainer(setup, tmp_path, callbacks=[callback])
    trainer.train()  # steps 1-3, logs after steps 2 and 3
    trainer.evaluate()  # two eval batches (6 pairs), one log
    hist = callback.writer.histograms
    assert set(hist) == TAGS
    assert [step for step, _ in hist["train/weights/pair"]] == [2, 3]
    assert [step for step, _ in hist["eval/weights/pair"]] == [3]
    train_steps = [seen[0:2], seen[2:3]]  # the compute_loss calls of each logging window
    for (_, chosen), window in zip(hist["train/weights/chosen"], train_steps, strict=True):
        np.testing.assert_array_equal(chosen, torch.cat([c for c, _ in window]).numpy())
    (_, rejected), (_, pair) = hist["eval/weights/rejected"][0], hist["eval/weights/pair"][0]
    eval_chosen, eval_rejected = (torch.cat(w) for w in zip(*seen[3:], strict=True))
    assert rejected.shape == (6,)
    np.testing.assert_array_equal(rejected, eval_rejected.numpy())
    np.testing.assert_allclose(pair, (eval_chosen * eval_rejected).numpy(), rtol=1e-6)
    # beside the scalars the trainer logged before
    assert [s for s, _ in callback.writer.scalars["train/weights/pair_mean"]] == [2, 3]
    assert all(not v for v in trainer._weight_values.values())  # emptied at each log


def test_nothing_is_kept_without_tensorboard(setup, tmp_path) -> None:
    trainer = make_trainer(setup, tmp_path)
    recorded = []
    trainer._weight_values = defaultdict(lambda: recorded)
    trainer.train()
    assert recorded == []


def test_real_tensorboard_event_file(setup, tmp_path, monkeypatch) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    trainer = make_trainer(setup, tmp_path, report_to=["tensorboard"])
    trainer.train()
    trainer.evaluate()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0}).Reload()
    assert set(events.Tags()["histograms"]) == TAGS
    pair = events.Histograms("train/weights/pair")
    assert [h.step for h in pair] == [2, 3] and [h.histogram_value.num for h in pair] == [2 * BATCH, BATCH]
    assert [h.histogram_value.num for h in events.Histograms("eval/weights/chosen")] == [6]
    assert "train/weights/pair_mean" in events.Tags()["scalars"]
