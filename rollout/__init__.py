"""Rollout engines behind one protocol (`rollout.base.RolloutEngine`): HF generate, colocated
vLLM, and HTTP workers (`align rollout serve`) driven by `rollout.client.RemoteEngines`."""

from rollout.base import RolloutEngine, Sample, SamplingParams
from rollout.config import RolloutConfig
from rollout.factory import build_engine

__all__ = ["RolloutConfig", "RolloutEngine", "Sample", "SamplingParams", "build_engine"]
