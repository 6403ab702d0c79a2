"""Generate the shipped arithmetic preference data set (run once; the example only reads the output).

Task: two-digit addition written digit by digit, ``"4 7 + 0 8 ="`` → ``" 0 5 5"`` (three answer digits).
Each pair has the correct sum as ``chosen`` and a plausible mistake as ``rejected``:

- ``ones``: a wrong ones digit;
- ``carry``: the tens digit off by one (a dropped or spurious carry);
- ``hundreds``: the hundreds digit flipped (0 ↔ 1);
- ``swap``: the tens and ones digits swapped (when they differ).

The held-out prompts (``arithmetic_prefs_test.jsonl``) never appear in the training file, so held-out
reward accuracy measures whether preference learning generalises, and every answer is checkable.

Usage: ``python integration/data/make_arithmetic_prefs.py`` (fixed seed: the output is reproducible).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20240617
N_TRAIN = 2000
N_TEST = 300
ERRORS = ("ones", "carry", "hundreds", "swap")
ERROR_PROBS = (0.4, 0.3, 0.15, 0.15)


def digits(n: int, width: int) -> str:
    """``n`` zero-padded to ``width`` digits, separated by spaces: ``digits(7, 2) == "0 7"``."""
    return " ".join(f"{n:0{width}d}")


def wrong_answer(total: int, kind: str, rng: random.Random) -> int:
    """A mistaken sum of the given kind (always different from ``total``, in ``[0, 199]``)."""
    hundreds, tens, ones = total // 100, total // 10 % 10, total % 10
    if kind == "ones":
        ones = rng.choice([d for d in range(10) if d != ones])
    elif kind == "carry":
        tens = (tens + rng.choice([-1, 1])) % 10
    elif kind == "hundreds":
        hundreds = 1 - hundreds
    elif kind == "swap" and tens != ones:
        tens, ones = ones, tens
    else:  # a swap of equal digits changes nothing: fall back to a wrong ones digit
        ones = rng.choice([d for d in range(10) if d != ones])
    return 100 * hundreds + 10 * tens + ones


def make_pair(a: int, b: int, rng: random.Random) -> dict[str, str]:
    """One preference record: ``prompt``, ``chosen`` (correct), ``rejected`` (a mistake), ``error``."""
    kind = rng.choices(ERRORS, weights=ERROR_PROBS)[0]
    total = a + b
    return {
        "prompt": f"{digits(a, 2)} + {digits(b, 2)} =",
        "chosen": f" {digits(total, 3)}",
        "rejected": f" {digits(wrong_answer(total, kind, rng), 3)}",
        "error": kind,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    rng = random.Random(SEED)
    prompts = [(a, b) for a in range(100) for b in range(100)]
    rng.shuffle(prompts)
    splits = {"train": prompts[:N_TRAIN], "test": prompts[N_TRAIN : N_TRAIN + N_TEST]}
    for split, pairs in splits.items():
        path = args.out_dir / f"arithmetic_prefs_{split}.jsonl"
        with path.open("w") as f:
            for a, b in pairs:
                f.write(json.dumps(make_pair(a, b, rng)) + "\n")
        print(f"wrote {len(pairs)} pairs to {path}")


if __name__ == "__main__":
    main()
