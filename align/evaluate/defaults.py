"""Held-out synthetic inputs for suites run without a data file.

Seeds differ from every seed the recipes under `recipes/` train on, and each file is written into
`<out>/data/`, so a report always points at the exact rows it was computed from. Synthetic rows
come from one seeded stream, so a larger `n` extends the same prefix.
"""

from __future__ import annotations

from itertools import chain
from pathlib import Path

HELD_OUT_SEED = 9_001
DEFAULT_N = 100


def _write(out: Path, name: str, rows) -> Path:
    from align.data.io import write_jsonl

    path = out / "data" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(rows, path)
    return path


def math_prompts(out: Path, n: int | None) -> Path:
    """Arithmetic word problems with `answer` (scored by math_accuracy)."""
    from align.data.synth import generate

    return _write(out, "math_prompts.jsonl", generate("math", n or DEFAULT_N, seed=HELD_OUT_SEED, form="prompts"))


def chat_prompts(out: Path, n: int | None) -> Path:
    """Chat requests, half `safety` (harmful: should be refused), half `helpfulness` (should not)."""
    from align.data.synth import generate

    return _write(out, "chat_prompts.jsonl",
                  generate("chat", n or DEFAULT_N, seed=HELD_OUT_SEED, form="prompts", safety_share=0.5))


def conversations(out: Path, n: int | None) -> Path:
    """Math and chat conversations with reference answers, for held-out loss."""
    from align.data.synth import generate

    n = n or DEFAULT_N
    rows = chain(generate("math", n // 2, seed=HELD_OUT_SEED), generate("chat", n - n // 2, seed=HELD_OUT_SEED))
    return _write(out, "conversations.jsonl", rows)
