"""Reward functions for GRPO: built-ins, user functions, reward models, the sandbox and the combiner.

The contract is TRL GRPOTrainer's, so a TRL reward function plugs in unchanged::

    fn(prompts, completions, **kwargs) -> list[float | None]

`kwargs` carries the dataset's extra columns (one list entry per sample), `completion_ids`,
`trainer_state`, `log_extra` and `log_metric`; `None` means "not applicable to this sample".
See docs/rewards.md. Entry points: `rewards.registry.resolve`, `rewards.reward_set.RewardSet`.
"""
