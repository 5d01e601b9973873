"""What both rollout-server suites (align's HF workers, stock `vllm serve`) check about a weight
sync: the same helpers and the same skipped/corrupted-sync scenario, so the two paths are held to
one standard."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
import pytest
import torch

from rollout.sync_check import SyncCheckError


def perturb(model: torch.nn.Module, scale: float = 0.2) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def completions(groups) -> list[list[list[int]]]:
    return [[s.completion_ids for s in g] for g in groups]


def check_catches_a_skipped_and_a_corrupted_sync(client, model: torch.nn.Module, first_url: str) -> list:
    """In sync: the check passes; the trainer moves on without a sync, or one tensor arrives
    corrupted: the check names the server and the gap; a good sync clears it. Returns the
    trainer's new weights (the client serves them on return)."""
    client.update_weights(model.state_dict().items())  # in sync: passes
    perturb(model, 0.05)
    new = list(model.state_dict().items())
    with pytest.raises(SyncCheckError, match=rf"{first_url} does not serve the weights.*differ by"):
        client.check_sync(new)  # the trainer moved on, the servers did not get the weights
    name = "model.layers.1.mlp.down_proj.weight"
    corrupted = [(n, t.flip(0) if n == name else t) for n, t in new]  # one tensor's rows swapped in transit
    client.push(corrupted)
    with pytest.raises(SyncCheckError, match="tolerance 0.001 for float32"):
        client.check_sync(new)
    client.update_weights(new)  # a good sync clears it
    return new


def kill_when_synced(kill: Callable[[], object], version_url: str, version) -> threading.Thread:
    """Call `kill()` once GET `version_url` reports `weight_version == version`: mid-run, between
    one step's sync and the next rollout."""
    def watch() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(version_url, timeout=2).json()["weight_version"] == version:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        kill()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread
