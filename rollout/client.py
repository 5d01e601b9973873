"""Drive `align rollout serve --engine hf` workers as one `RolloutEngine`.

Batches, failover and counts: `rollout.pool` (shared with the stock-vLLM client). Seeds are
offset by each run's first prompt index, so the samples do not depend on how the batch was split.

Staleness: the client's `weight_version` counts its own pushes; a sample made by older weights
(e.g. by a worker that missed a push) is counted in `stats["stale_samples"]`.

Routing replay: `record_routes=True` asks every worker for each sample's MoE expert ids
(`return_routes`), decoded into the same `Sample.routes` a colocated `HFEngine(record_routes=True)`
fills; a worker whose engine cannot record them refuses, and that refusal is an AlignError.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import httpx
import torch

from align.errors import AlignError
from rollout.base import Sample, SamplingParams
from rollout.pool import UNREACHABLE, WorkerPool, raise_for_refusal
from rollout.wire import pack_weights, sample_from_json, sampling_to_json


class RemoteEngines(WorkerPool):
    """`RolloutEngine` over HTTP rollout workers."""

    def __init__(self, urls: list[str], timeout_s: float = 600.0, retries: int = 2,
                 record_routes: bool = False):
        super().__init__(urls, retries, "align rollout serve")
        self.timeout_s = timeout_s
        self.record_routes = record_routes
        self._http = httpx.Client(timeout=timeout_s)

    def _post(self, url: str, path: str, **kwargs) -> dict:
        response = self._http.post(url + path, **kwargs)
        raise_for_refusal(url, path, response)
        return response.json()

    async def _generate_on(self, http: httpx.AsyncClient, url: str, prompts: list[list[int]], n: int,
                           sampling: dict) -> list[list[Sample]]:
        response = await http.post(url + "/generate", json={"prompt_token_ids": prompts, "n": n,
                                                            "sampling": sampling,
                                                            "return_routes": self.record_routes})
        raise_for_refusal(url, "/generate", response)
        groups = [[sample_from_json(s) for s in g] for g in response.json()["groups"]]
        if self.record_routes and any(s.routes is None for g in groups for s in g):
            raise AlignError(f"rollout worker {url} returned samples without routes; it "
                             "predates return_routes: upgrade align there and restart it")
        return groups

    def generate(self, prompt_token_ids: list[list[int]], n: int,
                 sampling: SamplingParams) -> list[list[Sample]]:
        groups = self.spread(len(prompt_token_ids), lambda http, url, a, b: self._generate_on(
            http, url, prompt_token_ids[a:b], n, sampling_to_json(replace(sampling, seed=sampling.seed + a * n))),
            self.timeout_s)
        self.count([s for g in groups for s in g])
        return groups

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push to every live worker; a worker that fails the push is dead (its weights are stale)."""
        payload = pack_weights(named_tensors)
        version = self.weight_version + 1
        self._broadcast("/update_weights", content=payload, params={"version": version},
                        headers={"content-type": "application/octet-stream"})
        self.weight_version = version

    def sleep(self) -> None:
        self._broadcast("/sleep")

    def wake(self) -> None:
        self._broadcast("/wake")

    def _broadcast(self, path: str, **kwargs) -> None:
        for url in list(self.live):
            try:
                self._post(url, path, **kwargs)
            except (*UNREACHABLE, httpx.HTTPStatusError) as exc:
                self.mark_dead(url, exc)
        if not self.live:
            raise self.no_worker_left(path.lstrip("/"))

