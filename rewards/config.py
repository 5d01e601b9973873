"""Recipe schema for rewards: one `RewardSpec` per component, one `RewardsConfig` for the set.

Self-contained on purpose (imports nothing from align.recipe.schema): the recipe schema embeds these.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RewardSpec(BaseModel):
    """One reward component: a function (`name`) or a sequence-classification reward model (`model`)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="Built-in name, `package.module:function` or `path/file.py:function`.")
    model: str | None = Field(None, description="Directory of a sequence-classification reward model (safetensors), or the name of a reward_model stage of the recipe (its final/).")
    alias: str | None = Field(None, description="Metric key; defaults to the function's name or the model directory's.")
    weight: float = Field(1.0, description="w_k in the combined reward Σ w_k·r_k over the components that apply, rescaled to the full weight mass Σ|w_k| when some do not.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Arguments of a parametrised reward's factory; for a `model`: device, batch_size, max_length, calibrate.")
    timeout_s: float | None = Field(None, gt=0, description="Stop waiting for one batch call after this many seconds (its samples get `fallback`); null = wait.")
    fallback: float = Field(0.0, description="Reward given to samples whose call failed, timed out or was non-finite.")
    normalize: Literal["none", "batch", "running"] = Field(
        "none", description="Per-component z-score: over the batch, or with running mean/std kept across steps.")
    gate: float | None = Field(None, description="Safety gate: a raw score below this caps the sample's total.")
    gate_penalty: float = Field(-1.0, description="The cap applied to the total when the gate trips.")
    when: dict[str, list[Any]] | None = Field(
        None, description="Score only rows whose dataset columns take these values, e.g. {category: [safety]}; "
                          "other rows get None (not applicable) and the other components carry their total.")

    @model_validator(mode="after")
    def _one_source(self) -> RewardSpec:
        if (self.name is None) == (self.model is None):
            raise ValueError("a reward needs exactly one of `name` (a function) or `model` (a reward-model directory)")
        if self.model is not None and self.kwargs.keys() - {"device", "batch_size", "max_length", "calibrate"}:
            raise ValueError("reward-model kwargs accept only device, batch_size, max_length and calibrate")
        return self

    @property
    def key(self) -> str:
        """Metric key of this component (`rewards/<key>/mean`)."""
        if self.alias:
            return self.alias
        if self.name:
            return self.name.rsplit(":", 1)[-1]
        return self.model.rstrip("/").rsplit("/", 1)[-1]


class RewardsConfig(BaseModel):
    """How the set of components is run: failure tolerance before a run stops."""

    model_config = ConfigDict(extra="forbid")

    max_failure_rate: float = Field(0.5, ge=0, le=1, description="Share of failed samples per function that stops the run.")
    failure_window: int | None = Field(None, gt=0, description="Judge the rate over the last N samples; None = since start.")
    failure_min_samples: int = Field(64, ge=1, description="Samples seen before the rate is judged, so one bad batch is tolerated.")
