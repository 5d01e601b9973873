"""GRPO under FSDP2 (`distributed.strategy: fsdp2`): the two places where ranks must act together.

- `sync_engine`: new weights into a rollout engine that does not share the policy's tensors. A
  server pool is shared, so rank 0 alone pushes (one transfer group per server, rank 0 its
  sender) and the other ranks take its weight version. Colocated vLLM is one engine per rank
  (`one_per_rank`): every rank loads the full weights into its own. A sharded policy's full
  weights exist on no rank, so they are gathered from the shards group by group
  (`gathered_weights`, `distributed.sync_group_mb` each) onto rank 0 (servers) or every rank
  (colocated vLLM); the other ranks send their shards.
- `every_rank_done`: dynamic sampling's "enough groups with spread?" agreed over ranks, so every
  rank runs the same number of generation rounds (each round's forwards are collectives).
The colocated HF engine generates with the sharded policy itself in lock-step (rollout/hf.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from align.sharding import gathered_weights, is_sharded
from align.weights import policy_weights


def sync_engine(engine, policy: torch.nn.Module, shares_policy: bool, group_mb: int, device) -> None:
    """Give `engine` the policy's current weights (a collective when the policy is sharded)."""
    if shares_policy:  # the colocated HF engine reads the training tensors: only the version moves
        engine.update_weights([])
        return
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        engine.update_weights(policy_weights(policy))
        return
    own = getattr(engine, "one_per_rank", False)  # colocated vLLM: every rank syncs its own engine
    if is_sharded(policy):
        groups = gathered_weights(policy, group_mb << 20, every_rank=own)
    else:
        groups = iter([policy_weights(policy)] if own or dist.get_rank() == 0 else [])
    try:
        if own or dist.get_rank() == 0:
            engine.update_weights(pair for group in groups for pair in group)
    finally:  # the gather is a collective: a failed push still drains it, or the other ranks hang
        for _ in groups:
            pass
    if own:  # each engine counts its own versions
        return
    version = torch.tensor([engine.weight_version], dtype=torch.long, device=device)
    dist.broadcast(version, src=0)
    engine.weight_version = int(version.item())


def every_rank_done(policy: torch.nn.Module, device) -> Callable[[bool], bool]:
    """`done -> done on every rank` (an all-reduce) for a sharded policy on several ranks;
    unsharded, each rank decides alone (`done` as is), as dynamic sampling always did."""
    if not (is_sharded(policy) and dist.is_initialized() and dist.get_world_size() > 1):
        return bool

    def agree(done: bool) -> bool:
        flag = torch.tensor([int(done)], dtype=torch.long, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())
    return agree
