"""``WPOTrainer`` under ``accelerate launch``: a few WPO steps of a small random-init Llama on the shipped
preference pairs, with whatever engine the accelerate config picks (the shipped ones:
``integration/accelerate/{ddp,fsdp2,zero3}.yaml``), or in one plain process without a launcher.

It writes ``<output-dir>/log_history.json`` (the trainer's logged loss and WPO metrics per step, gathered
across ranks), ``weights.pt`` (the final weights, gathered from the FSDP2 / ZeRO-3 shards) and
``engine.json`` (what ran), so that runs under different engines can be compared
(``tests/test_accelerate_engines.py``).
``--pairs-per-device`` is per process: ``P`` pairs on each of ``R`` processes is the same global batch
as ``R·P`` pairs in one process.

Example (2 CPU processes, gloo)::

    accelerate launch --num_processes 2 --config_file integration/accelerate/zero3.yaml \\
        integration/examples/accelerate_wpo.py --output-dir outputs/zero3
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--pairs-per-device", type=int, default=2)
    p.add_argument("--pairs", type=int, default=64, help="training pairs read from the shipped data")
    p.add_argument("--hidden-size", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    p.add_argument("--kernel-backend", default="torch", choices=("auto", "triton", "torch"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    import torch
    from datasets import Dataset

    from wpo_kernels.distributed import is_dtensor
    from wpo_kernels.integration.examples.toy_setup import build_model, build_tokenizer, load_pairs
    from wpo_kernels.integration.trl import WPOConfig, WPOTrainer

    args = parse_args(argv)
    torch.set_num_threads(1)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not torch.cuda.is_available():
        enable_fsdp_on_cpu()
    records = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in load_pairs("train", args.pairs)]
    tokenizer = build_tokenizer(records)
    model = build_model(
        "llama",
        len(tokenizer),
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        seed=args.seed,
    )
    config = WPOConfig(
        output_dir=str(args.output_dir),
        per_device_train_batch_size=args.pairs_per_device,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        beta=0.5,
        alignment="sampled",
        wpo_variant="wpo",
        kernel_backend=args.kernel_backend,
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=args.seed,
        data_seed=args.seed,
    )
    trainer = WPOTrainer(
        model,
        ref_model=copy.deepcopy(model),
        args=config,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
    )
    trainer.train()
    # gathered from the shards on every rank (collectives): ZeRO-3 consolidates, FSDP2 DTensors are gathered
    weights = trainer.accelerator.get_state_dict(trainer.model_wrapped) or {}  # ZeRO-3: on rank 0 only
    weights = {
        k: (v.full_tensor() if is_dtensor(v) else v).detach().cpu().clone() for k, v in weights.items()
    }
    if trainer.accelerator.is_main_process:
        torch.save(weights, args.output_dir / "weights.pt")
        history = [entry for entry in trainer.state.log_history if "loss" in entry]
        (args.output_dir / "log_history.json").write_text(json.dumps(history, indent=1))
        (args.output_dir / "engine.json").write_text(json.dumps(describe_engine(trainer)))
    trainer.accelerator.wait_for_everyone()  # every rank past its last collective before any exits


def enable_fsdp_on_cpu() -> None:
    """Let an FSDP accelerate config shard on CPU (gloo). accelerate 1.15 turns FSDP on only for GPU-like
    devices: on CPU it silently runs plain data parallelism (``MULTI_CPU``) instead. This switches the
    state every ``Accelerator`` shares to FSDP with the launcher's plugin settings, right after the
    trainer's ``Accelerator`` is built, so its ``prepare`` applies ``fully_shard``."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    build = Accelerator.__init__

    def build_then_shard(self: Accelerator, *args: object, **kwargs: object) -> None:
        build(self, *args, **kwargs)
        if self.state.distributed_type == DistributedType.MULTI_CPU:
            self.state.distributed_type = DistributedType.FSDP
            self.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # read from the launcher's variables

    Accelerator.__init__ = build_then_shard


def describe_engine(trainer) -> dict[str, object]:
    """What ran: ``"fsdp"``, ``"deepspeed"`` or ``"ddp"`` (``"single"`` for one process), the process count
    and how the trained head weight is stored (``"dtensor"``: FSDP2 shards, ``"zero3"``: a DeepSpeed
    partition, else ``"plain"``)."""
    from wpo_kernels.distributed import is_dtensor, is_zero3_partitioned

    weight = trainer.model.get_output_embeddings().weight  # FSDP2 and ZeRO-3 change the module in place
    processes = trainer.accelerator.num_processes
    engine = "fsdp" if trainer.is_fsdp_enabled else "deepspeed" if trainer.is_deepspeed_enabled else "ddp"
    storage = "dtensor" if is_dtensor(weight) else "zero3" if is_zero3_partitioned(weight) else "plain"
    engine = engine if processes > 1 else "single"
    return {"engine": engine, "num_processes": processes, "head_weight": storage}


if __name__ == "__main__":
    main()
    # Exit without finalisation: at interpreter exit a thread the distributed engines leave behind can
    # abort the process after the results are written ("terminate called without an active exception":
    # FSDP2 and ZeRO-3 runs in fresh clean-clone CI runs, after training had finished).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
