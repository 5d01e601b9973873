"""What every suite shares while evaluating: options, one open engine, a generation cache, scorers.

Why a shared context: suites often ask the same model for the same completions (`safety` and
`reward` both read the default chat prompts greedily), and the `reward` suite needs the baseline's
completions next to each checkpoint's. The context keeps one engine open at a time (a model's
memory is released before the next loads) and caches completions per (model, prompts, sampling),
so nothing is generated twice and two runs with the same seed see the same samples.
"""

from __future__ import annotations

import gc
import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from align.evaluate.checkpoints import Checkpoint
from rollout.base import Sample, SamplingParams

if TYPE_CHECKING:
    from align.data.prompts import PromptSet
    from rewards.config import RewardSpec
    from rewards.reward_set import ScoredBatch

EngineKind = Literal["auto", "hf", "vllm"]


@dataclass
class EvalOptions:
    """Knobs shared by the suites (the `align eval` flags)."""

    out: Path
    engine: EngineKind = "auto"
    seed: int = 0
    limit: int | None = None  # prompts per suite; None = the suite's default / the whole file
    k: tuple[int, ...] = (1,)
    samples: int | None = None  # samples per prompt for pass@k; None = max(k)
    temperature: float = 0.8  # for pass@k sampling; greedy metrics always use 0
    max_new_tokens: int = 256
    max_prompt_len: int = 512  # as GRPO's default, so prompts are cut the way training cut them
    math_strict: bool = True  # math_accuracy's `strict` (rewards/accuracy.py): an anchored value only
    batch_size: int | None = None  # HF engine: prompts per generate call
    prompts: dict[str, Path] = field(default_factory=dict)  # suite name -> prompts/conversations file
    judge: Path | None = None
    baseline: Checkpoint | None = None

    @property
    def n_samples(self) -> int:
        return self.samples or max(self.k, default=1)

    def greedy(self) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_new_tokens=self.max_new_tokens, seed=self.seed, logprobs=False)

    def sampled(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, max_new_tokens=self.max_new_tokens, seed=self.seed,
                              logprobs=False)


def resolve_engine(kind: EngineKind) -> Literal["hf", "vllm"]:
    """`auto`: vLLM when it is installed, else HF generate."""
    if kind == "auto":
        return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    return kind


class EvalContext:
    def __init__(self, options: EvalOptions):
        self.options = options
        self.engine_kind = resolve_engine(options.engine)
        self._open: tuple[Path, Any] | None = None
        self._tokenizers: dict[Path, Any] = {}
        self._generations: dict[tuple, list[list[Sample]]] = {}
        self._scorers: dict[tuple, Any] = {}
        self.records: list[dict[str, Any]] = []  # every scored completion, for samples.jsonl
        self.suite = ""  # the suite running now, to label its records

    # ------------------------------------------------------------------------ models

    def tokenizer(self, path: Path):
        from align.models.load import load_tokenizer

        if path not in self._tokenizers:
            self._tokenizers[path] = load_tokenizer(path)
        return self._tokenizers[path]

    def engine(self, path: Path):
        """The engine for `path`, closing any other one first."""
        from rollout.config import RolloutConfig
        from rollout.factory import build_engine

        if self._open is not None and self._open[0] == path:
            return self._open[1]
        self.close()
        cfg = RolloutConfig(engine=self.engine_kind, batch_size=self.options.batch_size)
        self._open = (path, build_engine(cfg, path, self.tokenizer(path), seed=self.options.seed))
        return self._open[1]

    def causal_lm(self, path: Path):
        """A transformers model for forward passes: the open HF engine's, or freshly loaded."""
        from align.models.load import load_causal_lm

        if self._open is not None and self._open[0] == path and hasattr(self._open[1], "model"):
            return self._open[1].model
        return load_causal_lm(path).eval()

    def close(self) -> None:
        if self._open is not None:
            self._open = None
            gc.collect()

    # ------------------------------------------------------------------------ data

    def prompts(self, ckpt: Checkpoint, source: Path, limit: int | None) -> PromptSet:
        """A prompts file tokenised as the GRPO trainer tokenises it (`load_prompts`), so a
        checkpoint is scored on exactly the token ids it was evaluated on during training."""
        from align.recipe.schema import DataSource
        from align.data.prompts import load_prompts

        prompts = load_prompts([DataSource(path=str(source))], self.tokenizer(ckpt.path), self.options.max_prompt_len)
        n = len(prompts) if limit is None else min(limit, len(prompts))
        return prompts.take(list(range(n)))

    def generate(self, ckpt: Checkpoint, prompts: PromptSet, source: Path, n: int,
                 sampling: SamplingParams) -> list[list[Sample]]:
        """`n` completions per prompt, cached per (model, prompts, n, sampling)."""
        key = (ckpt.path.resolve(), str(source), len(prompts), n, sampling)
        if key not in self._generations:
            self._generations[key] = self.engine(ckpt.path).generate(prompts.ids, n, sampling)
        return self._generations[key]

    # ------------------------------------------------------------------------ scoring

    def score(self, specs: Sequence[RewardSpec], ckpt: Checkpoint, prompts: PromptSet,
              groups: list[list[Sample]], base_dir: Path | None = None) -> ScoredBatch:
        """Score every sample with the reward registry's functions, through `RewardSet` (the GRPO
        trainer's path: same isolation, same fallbacks, same combination)."""
        from align.data.prompts import as_completions, completion_texts
        from rewards.reward_set import RewardSet

        key = (tuple(s.model_dump_json() for s in specs), base_dir)
        if key not in self._scorers:
            self._scorers[key] = RewardSet(list(specs), base_dir=base_dir)
        n = len(groups[0]) if groups else 1
        samples = [s for group in groups for s in group]
        repeated = [p for p in prompts.prompts for _ in range(n)]
        columns = {k: [v for v in vals for _ in range(n)] for k, vals in prompts.columns.items()}
        texts = completion_texts(self.tokenizer(ckpt.path), samples)
        scored = self._scorers[key](repeated, as_completions(repeated, texts),
                                    completion_ids=[s.completion_ids for s in samples], **columns)
        for i, (prompt, text) in enumerate(zip(repeated, texts, strict=True)):
            self.records.append({"checkpoint": ckpt.label, "suite": self.suite, "prompt": prompt, "completion": text,
                                 "finish_reason": samples[i].finish_reason,
                                 "rewards": {name: values[i] for name, values in scored.components.items()}})
        return scored


def nanmean(values: Sequence[float | None]) -> float:
    """Mean over applicable values (None/NaN skipped), NaN when there are none."""
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(kept) / len(kept) if kept else math.nan
