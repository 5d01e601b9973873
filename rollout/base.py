"""The rollout-engine protocol every engine implements (HF generate, vLLM colocated, HTTP servers).

One protocol, so the GRPO trainer never branches on the engine: colocated vs server is a
constructor choice. The lifecycle mirrors what a vLLM engine sharing GPUs with training needs:
`wake()` → `generate()` → `sleep()` → (train) → `update_weights()`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:  # keep `align --help` free of the torch import
    import torch


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings for one generate call. `seed` seeds the whole call; engines derive a
    distinct seed per sample from it so identical prompts in a group never sample alike."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    seed: int = 0
    logprobs: bool = True


@dataclass
class Sample:
    """One completion. Token-level lists all have len == len(completion_ids)."""

    completion_ids: list[int]
    logprobs: list[float] | None  # log π_rollout(token) under the engine's own numerics
    finish_reason: Literal["stop", "length"]
    weight_version: int = 0  # version of the weights that produced it (staleness accounting)
    # MoE routing replay: per completion token, per MoE layer, the experts chosen (or None).
    routes: "torch.Tensor | None" = field(default=None, repr=False)


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from an engine."""

    weight_version: int

    def generate(self, prompt_token_ids: list[list[int]], n: int,
                 sampling: SamplingParams) -> list[list[Sample]]:
        """Return, for each prompt, `n` samples (the GRPO group), in prompt order."""
        ...

    def update_weights(self, named_tensors: "Iterable[tuple[str, torch.Tensor]]") -> None:
        """Load new policy weights (HF names, full unsharded tensors); bumps weight_version."""
        ...

    def sleep(self) -> None:
        """Release device memory (KV cache, weights where supported) while training runs."""
        ...

    def wake(self) -> None:
        """Re-acquire what sleep() released, before the next generate()."""
        ...
