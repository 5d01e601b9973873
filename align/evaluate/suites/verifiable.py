"""`math` and `code`: tasks with a checkable answer, scored with the reward functions GRPO trains on.

Metrics: `greedy_accuracy`, the share of prompts whose greedy completion gets full credit (for
`math_accuracy`, exactly the `eval/math_accuracy` the GRPO stage logs on the same prompts with
the same max_new_tokens), and `pass@k` for each k of `--k`, from `--samples` completions per prompt
at `--temperature` with the unbiased estimator (align.evaluate.passk). A prompt the reward marks
not applicable (None: e.g. an unparseable reference) is left out of every mean. `math` also
reports `format`, the mean `format` reward of the greedy completions: accuracy that rises while
format falls is how a policy that games its verifier shows (docs/rewards.md, "Why math_accuracy is
strict").
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from align.errors import AlignError
from align.evaluate import defaults
from align.evaluate.checkpoints import Checkpoint
from align.evaluate.context import EvalContext, EvalOptions, nanmean
from align.evaluate.passk import mean_pass_at_k
from rewards.config import RewardSpec


class VerifiableSuite:
    name: str
    reward: RewardSpec
    extras: tuple[RewardSpec, ...] = ()  # also scored on the greedy completions, each a metric
    lower_is_better = frozenset()

    def __init__(self, options: EvalOptions, default: Callable[[Path, int | None], Path] | None = None):
        if any(k > options.n_samples for k in options.k):
            raise AlignError(f"--k {max(options.k)} needs at least that many samples per prompt; "
                             f"--samples is {options.n_samples}")
        self.options = options
        self.source = options.prompts.get(self.name) or self._default(default)

    def _default(self, default: Callable[[Path, int | None], Path] | None) -> Path:
        if default is None:
            raise AlignError(f"the {self.name} suite needs a prompts file: --prompts {self.name}=FILE "
                             f"(see docs/evaluation.md)")
        return default(self.options.out, self.options.limit)

    def run(self, ckpt: Checkpoint, ctx: EvalContext) -> dict[str, float]:
        prompts = ctx.prompts(ckpt, self.source, self.options.limit)
        greedy, components = self._verdicts(ckpt, ctx, prompts, 1, self.options.greedy(), self.extras)
        metrics = {"greedy_accuracy": nanmean([v[0] for v in greedy])}
        metrics.update({spec.key: nanmean(components[spec.key]) for spec in self.extras})
        if self.options.k:
            groups, _ = self._verdicts(ckpt, ctx, prompts, self.options.n_samples, self.options.sampled())
            metrics.update({f"pass@{k}": mean_pass_at_k(groups, k) for k in self.options.k})
        return metrics

    def _verdicts(self, ckpt, ctx, prompts, n, sampling, extras: tuple[RewardSpec, ...] = ()
                  ) -> tuple[list[list[bool]], dict[str, list]]:
        """Per applicable prompt, whether each of its n samples got full credit; and every scored
        component's values (the suite's reward and `extras`), one per sample."""
        groups = ctx.generate(ckpt, prompts, self.source, n, sampling)
        components = ctx.score([self.reward, *extras], ckpt, prompts, groups).components
        values = components[self.reward.key]
        per_prompt = [values[i * n:(i + 1) * n] for i in range(len(prompts))]
        return [[v is not None and v >= 1.0 for v in vals] for vals in per_prompt
                if not all(v is None for v in vals)], components


class MathSuite(VerifiableSuite):
    """Final-answer accuracy by math-verify (`math_accuracy`); default: held-out synthetic math."""

    name = "math"

    def __init__(self, options: EvalOptions):
        super().__init__(options, defaults.math_prompts)
        self.reward = RewardSpec(name="math_accuracy", kwargs={"strict": options.math_strict})
        self.extras = (RewardSpec(name="format"),)


class CodeSuite(VerifiableSuite):
    """Unit tests run in the sandbox (`code_tests`); prompts need a `tests` column."""

    name = "code"
    reward = RewardSpec(name="code_tests")

    def __init__(self, options: EvalOptions):
        super().__init__(options)

