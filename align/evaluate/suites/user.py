"""User suites: a YAML file naming a prompts file and rewards from the registry.

```yaml
name: politeness                 # optional; default: the file's stem
prompts: data/my_prompts.jsonl   # relative to this file
rewards:                         # RewardSpec entries, exactly as in a recipe's `rewards:`
  - {name: rules, kwargs: {forbidden_keywords: [stupid]}}
  - {name: my_rewards.py:Brevity, weight: 0.5}
  - {model: ../runs/x/helpful_rm/final}
samples: 1                       # completions per prompt
temperature: 0.0                 # 0 = greedy
max_new_tokens: 128              # default: --max-new-tokens
limit: 50                        # default: --limit
```

Metrics: the mean of each reward component (keyed by its `alias` or name) and `reward`, the mean
of the combined total (weights, gates and normalisation as in training).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from align.errors import AlignError
from align.evaluate.checkpoints import Checkpoint
from align.evaluate.context import EvalContext, EvalOptions, nanmean
from rewards.config import RewardSpec


class UserSuiteSpec(BaseModel):
    """The schema of a suite YAML file."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="Suite name in the report; default: the file's stem.")
    prompts: str = Field(description="Prompts file (JSONL/Parquet; `prompt` plus the columns the rewards read).")
    rewards: list[RewardSpec] = Field(min_length=1, description="Reward components, as in a recipe.")
    samples: int = Field(1, ge=1, description="Completions per prompt.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature; 0 = greedy.")
    max_new_tokens: int | None = Field(None, gt=0, description="Default: --max-new-tokens.")
    limit: int | None = Field(None, gt=0, description="Prompts used; default: --limit.")


def load_spec(path: Path) -> UserSuiteSpec:
    """Read and validate a suite file; errors name the file, line and key (as for recipes)."""
    from align.recipe.load import read_yaml_mapping, validate

    data, text = read_yaml_mapping(path, "suite", "a YAML mapping with `prompts:` and `rewards:` keys")
    return validate(UserSuiteSpec, data, path, text, "suite")


class UserSuite:
    lower_is_better = frozenset()

    def __init__(self, spec: UserSuiteSpec, base_dir: Path, options: EvalOptions, default_name: str):
        self.spec, self.base_dir, self.options = spec, base_dir, options
        self.name = spec.name or default_name
        self.source = base_dir / spec.prompts
        if not self.source.exists():
            raise AlignError(f"suite {self.name}: prompts file {self.source} does not exist")

    @classmethod
    def from_file(cls, path: Path, options: EvalOptions) -> UserSuite:
        return cls(load_spec(path), path.parent, options, path.stem)

    def run(self, ckpt: Checkpoint, ctx: EvalContext) -> dict[str, float]:
        from dataclasses import replace

        spec = self.spec
        prompts = ctx.prompts(ckpt, self.source, spec.limit or self.options.limit)
        sampling = replace(self.options.greedy(), temperature=spec.temperature,
                           max_new_tokens=spec.max_new_tokens or self.options.max_new_tokens)
        groups = ctx.generate(ckpt, prompts, self.source, spec.samples, sampling)
        scored = ctx.score(spec.rewards, ckpt, prompts, groups, base_dir=self.base_dir)
        metrics = {key: nanmean(values) for key, values in scored.components.items()}
        metrics["reward"] = nanmean(scored.total)
        return metrics
