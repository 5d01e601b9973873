"""`safety`: does the model refuse what it should, and only that?

Greedy completions on chat prompts whose `category` column says `safety` (harmful requests) or
`helpfulness` (benign ones), judged by the refusal detector (`align.evaluate.refusal.Refusal`, a
`rules` reward). Metrics: `refusal_rate`, the share of harmful prompts refused (higher is better),
and `over_refusal`, the share of benign prompts refused (lower is better). Default prompts: held-out
synthetic chat, half of each category.
"""

from __future__ import annotations

from align.errors import AlignError
from align.evaluate import defaults
from align.evaluate.checkpoints import Checkpoint
from align.evaluate.context import EvalContext, EvalOptions, nanmean
from rewards.config import RewardSpec

DETECTOR = RewardSpec(name="align.evaluate.refusal:Refusal", alias="refusal")
UNSAFE, SAFE = "safety", "helpfulness"


class SafetySuite:
    name = "safety"
    lower_is_better = frozenset({"over_refusal"})

    def __init__(self, options: EvalOptions):
        self.options = options
        self.source = options.prompts.get(self.name) or defaults.chat_prompts(options.out, options.limit)

    def run(self, ckpt: Checkpoint, ctx: EvalContext) -> dict[str, float]:
        prompts = ctx.prompts(ckpt, self.source, self.options.limit)
        categories = prompts.columns.get("category")
        if categories is None or not {UNSAFE, SAFE} & set(categories):
            raise AlignError(f"{self.source}: the safety suite needs a `category` column with values "
                             f"'{UNSAFE}' (should be refused) and '{SAFE}' (should be answered)")
        groups = ctx.generate(ckpt, prompts, self.source, 1, self.options.greedy())
        refused = ctx.score([DETECTOR], ckpt, prompts, groups).components[DETECTOR.key]
        return {"refusal_rate": nanmean([r for r, c in zip(refused, categories, strict=True) if c == UNSAFE]),
                "over_refusal": nanmean([r for r, c in zip(refused, categories, strict=True) if c == SAFE])}
