"""`reward`: how a reward model judges each checkpoint, alone and head to head with a baseline.

Greedy completions on chat prompts, scored by the judge (`--judge RM_DIR`, or the run's reward
model stage). Metrics: `rm_score`, the judge's mean score, and `win_rate`, the share of prompts
where the checkpoint's completion scores higher than the baseline's on the same prompt (ties count
half; `--baseline`, default the first checkpoint, whose own win rate is therefore 0.5).
"""

from __future__ import annotations

from align.errors import AlignError
from align.evaluate import defaults
from align.evaluate.checkpoints import Checkpoint
from align.evaluate.context import EvalContext, EvalOptions, nanmean
from rewards.config import RewardSpec


def win_rate(scores: list[float | None], baseline: list[float | None]) -> float:
    """Share of pairs won (higher score), ties half; pairs with a missing score are skipped.

    >>> win_rate([1.0, 0.5, 0.2, None], [0.0, 0.5, 0.9, 1.0])
    0.5
    """
    pairs = [(s, b) for s, b in zip(scores, baseline, strict=True) if s is not None and b is not None]
    return nanmean([1.0 if s > b else 0.5 if s == b else 0.0 for s, b in pairs])


class RewardSuiteEval:
    name = "reward"
    lower_is_better = frozenset()

    def __init__(self, options: EvalOptions):
        if options.judge is None:
            raise AlignError("the reward suite needs a judge: --judge RM_DIR (a `kind: reward_model` stage's "
                             "final/ directory)")
        self.options = options
        self.judge = RewardSpec(model=str(options.judge), alias="judge")
        self.source = options.prompts.get(self.name) or defaults.chat_prompts(options.out, options.limit)

    def _scores(self, ckpt: Checkpoint, ctx: EvalContext) -> tuple[list[float | None], list]:
        prompts = ctx.prompts(ckpt, self.source, self.options.limit)
        groups = ctx.generate(ckpt, prompts, self.source, 1, self.options.greedy())
        scores = ctx.score([self.judge], ckpt, prompts, groups).components[self.judge.key]
        return scores, prompts.columns.get("category") or [None] * len(scores)

    def run(self, ckpt: Checkpoint, ctx: EvalContext) -> dict[str, float]:
        """Over all prompts, and per `category` when the prompts have one (`rm_score/helpfulness`):
        a helpfulness judge is expected to score a refusal of a harmful request low, so only the
        per-category numbers say whether answers to benign requests got better."""
        scores, categories = self._scores(ckpt, ctx)
        baseline, _ = self._scores(self.options.baseline or ckpt, ctx)
        out = {"rm_score": nanmean(scores), "win_rate": win_rate(scores, baseline)}
        for cat in sorted({c for c in categories if c is not None}):
            rows = [i for i, c in enumerate(categories) if c == cat]
            out[f"rm_score/{cat}"] = nanmean([scores[i] for i in rows])
            out[f"win_rate/{cat}"] = win_rate([scores[i] for i in rows], [baseline[i] for i in rows])
        return out
