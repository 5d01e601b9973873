"""Mixture-of-experts support: router metrics, Rollout Routing Replay, and MoE weight sync."""

from align.moe.gates import moe_gates
from align.moe.metrics import RouterStats, metrics_from_router_logits, route_mismatch, router_stats
from align.moe.replay import (SENTINEL, RouteRecorder, RouteReplay, ensure_replay_supported,
                              routes_to_batch)
from align.moe.sync import checkpoint_weights, repack_cpu_experts

__all__ = ["SENTINEL", "RouteRecorder", "RouteReplay", "RouterStats", "checkpoint_weights",
           "ensure_replay_supported", "metrics_from_router_logits", "moe_gates", "repack_cpu_experts",
           "route_mismatch", "router_stats", "routes_to_batch"]
