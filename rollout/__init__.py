"""Rollout engines behind one protocol (`rollout.base.RolloutEngine`): HF generate (`rollout.hf`),
colocated vLLM (`rollout.vllm_engine`), and HTTP workers (`align rollout serve`, `rollout.server`)
driven by `rollout.client.RemoteEngines`. Recipes configure them with `rollout.config.RolloutConfig`
and build them with `rollout.factory.build_engine`.

Nothing is imported here, so `align --help` (which loads `rollout.cli`) stays free of torch.
"""
