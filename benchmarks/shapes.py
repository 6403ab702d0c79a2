"""The LM heads we benchmark: real models' ``(H, V, softcap)``, and CPU-sized versions of them.

On a GPU the heads are used as they are, at N = 2k–32k tokens. On a CPU each head is divided by
:data:`CPU_DIVISOR` in both H and V (so V/H, and with it the balance between the GEMM and the
per-logit work, is kept) and N stays in the low thousands, so that the whole CPU run takes minutes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

#: TRL 1.16's vocabulary tile width (``trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE``).
TRL_CHUNK_SIZE = 32768


@dataclass(frozen=True)
class Head:
    """One LM head: ``logits = transform(hidden [N, H] @ weight [V, H].T)``.

    ``trl_chunk_size`` is the vocabulary tile TRL's ``ChunkedLogProbFunction`` is given; it shrinks with
    V on scaled-down heads so that TRL visits as many tiles as it does on the real head.
    """

    name: str
    hidden: int
    vocab: int
    softcap: float | None = None
    trl_chunk_size: int = TRL_CHUNK_SIZE

    @property
    def label(self) -> str:
        cap = f", softcap {self.softcap:g}" if self.softcap else ""
        return f"{self.name} (H={self.hidden}, V={self.vocab}{cap})"


#: The LM heads of the models WPO is usually run on (from each model's config.json).
REAL_HEADS: tuple[Head, ...] = (
    Head("llama3-8b", 4096, 128256),
    Head("mistral-7b", 4096, 32000),
    Head("qwen2.5-7b", 3584, 152064),
    Head("gemma2-9b", 3584, 256000, softcap=30.0),
)

#: Token counts per batch on a GPU (N = B * T summed over chosen and rejected).
GPU_TOKENS: tuple[int, ...] = (2048, 8192, 16384, 32768)

#: H and V of each real head are divided by this on a CPU.
CPU_DIVISOR = 16
CPU_TOKENS: tuple[int, ...] = (512, 1024, 2048)

#: ``--quick`` (the CI smoke run): two tiny heads, two token counts.
QUICK_TOKENS: tuple[int, ...] = (128, 256)

#: Sequence length of the preference-loss step: N tokens are ``N / SEQ_LEN / 2`` pairs of sequences.
GPU_SEQ_LEN = 1024
CPU_SEQ_LEN = 256
QUICK_SEQ_LEN = 64
#: Leading fraction of each sequence that is prompt (``ignore_index``) in the loss step.
PROMPT_FRACTION = 0.125


def scaled(head: Head, divisor: int) -> Head:
    """``head`` with H and V divided by ``divisor`` (V rounded to a multiple of 8), same softcap."""
    vocab = max(8, round(head.vocab / divisor / 8) * 8)
    return replace(
        head,
        hidden=max(8, head.hidden // divisor),
        vocab=vocab,
        trl_chunk_size=max(256, TRL_CHUNK_SIZE // divisor),
    )


@dataclass(frozen=True)
class Suite:
    """What one run measures: heads × token counts, and the step's sequence length."""

    heads: tuple[Head, ...]
    tokens: tuple[int, ...]
    seq_len: int


def suite_for(device: str, *, quick: bool = False, heads: tuple[str, ...] | None = None) -> Suite:
    """The heads and token counts for ``device`` (``"cuda"`` or ``"cpu"``); ``heads`` filters by name."""
    if quick:
        suite = Suite(
            heads=(Head("tiny", 64, 2000, trl_chunk_size=512), Head("tiny-softcap", 64, 3000, 30.0, 512)),
            tokens=QUICK_TOKENS,
            seq_len=QUICK_SEQ_LEN,
        )
    elif device == "cuda":
        suite = Suite(REAL_HEADS, GPU_TOKENS, GPU_SEQ_LEN)
    else:
        suite = Suite(tuple(scaled(h, CPU_DIVISOR) for h in REAL_HEADS), CPU_TOKENS, CPU_SEQ_LEN)
    if heads:
        unknown = set(heads) - {h.name for h in suite.heads}
        if unknown:
            raise ValueError(
                f"heads must be among {[h.name for h in suite.heads]}, got unknown {sorted(unknown)}"
            )
        suite = replace(suite, heads=tuple(h for h in suite.heads if h.name in heads))
    return suite
