"""Mixture-of-experts support: router metrics, Rollout Routing Replay, and (align.moe.rl) a GRPO stage's MoE policy."""

from align.moe.gates import moe_gates
from align.moe.metrics import RouterStats, route_mismatch, router_stats
from align.moe.replay import (SENTINEL, RouteRecorder, RouteReplay, ensure_replay_supported, replaying,
                              routes_to_batch)

__all__ = ["SENTINEL", "RouteRecorder", "RouteReplay", "RouterStats", "ensure_replay_supported",
           "moe_gates", "replaying", "route_mismatch", "router_stats",
           "routes_to_batch"]
