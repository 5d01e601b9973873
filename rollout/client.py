"""Drive `align rollout serve --engine hf` workers as one `RolloutEngine`.

Batches, failover and counts: `rollout.pool` (shared with the stock-vLLM client). Seeds are
offset by each run's first prompt index, so the samples do not depend on how the batch was split.

Weights: over a torch.distributed gloo group per worker (rollout.gloo_group; the trainer is rank
0 and hosts the store on `transfer_address`), the lifecycle of vLLM's RL routes (rollout.server):
join at the first sync, then per sync start (the layout, checked by the worker) → update (the
worker receives layer group by layer group while we broadcast) → finish (labelled with the
trainer's version). No weights travel in HTTP bodies. A worker that fails a sync is dead; one
that answers `/health` again at a later sync joins a new group and gets that sync's weights
before it serves. After every sync each worker must report the new version and score the sync
check's probe (rollout.sync_check) as the pushed weights do.

Staleness: the client's `weight_version` counts its own pushes; a sample made by older weights
(e.g. by a worker that missed a push) is counted in `stats["stale_samples"]`.

Routing replay: `record_routes=True` asks every worker for each sample's MoE expert ids
(`return_routes`), decoded into the same `Sample.routes` a colocated `HFEngine(record_routes=True)`
fills; a worker whose engine cannot record them refuses, and that refusal is an AlignError.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from functools import cached_property
from pathlib import Path

import httpx
import torch
from torch.distributed.distributed_c10d import ProcessGroupGloo

from align.errors import AlignError
from rollout.base import Sample, SamplingParams
from rollout.gloo_group import GroupLayout, grouped, host_group, send_while
from rollout.pool import SYNC_GONE, WorkerPool, raise_for_refusal
from rollout.sync_check import ProbeReference
from rollout.wire import sample_from_json, sampling_to_json

START_HINT = "align rollout serve"


class RemoteEngines(WorkerPool):
    """`RolloutEngine` over align's HTTP rollout workers, weights over gloo."""

    def __init__(self, urls: list[str], model_dir: str | Path, *, timeout_s: float = 600.0, retries: int = 2,
                 transfer_address: str = "127.0.0.1", record_routes: bool = False):
        super().__init__(urls, retries, START_HINT, timeout_s)
        self.model_dir = model_dir
        self.transfer_address = transfer_address
        self.record_routes = record_routes
        # url -> (the trainer's side of its transfer group, the group's id), joined at its first
        # sync: only a rank that pushes joins
        self.joined: dict[str, tuple[ProcessGroupGloo, str]] = {}

    @cached_property
    def reference(self) -> ProbeReference:
        return ProbeReference(self.model_dir)

    def mark_dead(self, url: str, exc: BaseException) -> None:
        self.joined.pop(url, None)  # its group is broken, or it restarts without one
        super().mark_dead(url, exc)

    # ------------------------------------------------------------------ weights

    def _join(self, url: str) -> tuple[ProcessGroupGloo, str]:
        """A new two-rank group with `url` (the trainer is rank 0), named `address:port` as the
        worker names it."""
        ids = []

        def join(info: dict) -> None:
            ids.append(f"{info['master_address']}:{info['master_port']}")
            self._post(url, "/init_weight_transfer_engine", json={"init_info": info})

        self.joined[url] = host_group(self.transfer_address, 2, self.timeout_s, join), ids[0]
        return self.joined[url]

    def _start(self, url: str, layout: GroupLayout) -> ProcessGroupGloo:
        """Open the update on `url`, joining it first if needed; a worker that answers 409 is not
        in our group (it restarted since, or another client joined it) and is joined anew."""
        group, group_id = self.joined.get(url) or self._join(url)
        body = {"group": group_id, "update_info": asdict(layout)}
        response = self._http.post(url + "/start_weight_update", json=body)
        if response.status_code == 409:
            group, body["group"] = self._join(url)
            response = self._http.post(url + "/start_weight_update", json=body)
        raise_for_refusal(url, "/start_weight_update", response)
        return group

    def _sync_one(self, url: str, groups: list[list[tuple[str, torch.Tensor]]], layout: GroupLayout,
                  version: int) -> None:
        group = self._start(url, layout)
        send_while(group, ([t for _, t in g] for g in groups), lambda: self._post(url, "/update_weights"))
        self._post(url, "/finish_weight_update", json={"weight_version": version})

    def push(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        """The sync without its check: every live worker gets `pairs` as the next weight version."""
        groups = grouped(pairs)
        layout = GroupLayout.of(groups)
        self.revive(lambda url: None)  # it joins a new group in its sync
        self.sync_all(lambda url, version: self._sync_one(url, groups, layout, version))

    def check_sync(self, pairs: list[tuple[str, torch.Tensor]]) -> float:
        """Every live worker reports this version and scores the probe like the pushed weights do;
        else SyncCheckError naming the worker and the gap. Returns the largest mean gap."""
        return self.check_workers("rollout worker", self.reference.logprobs(pairs), self._probe)

    def _probe(self, url: str) -> tuple[int, list[float], str]:
        got = self._post(url, "/prompt_logprobs", json={"token_ids": self.reference.tokens})
        return got["weight_version"], got["logprobs"], self._get(url, "/health")["dtype"]

    # ------------------------------------------------------------------ generation

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

    def sleep(self) -> None:
        self._broadcast("/sleep")

    def wake(self) -> None:
        self._broadcast("/wake")

    def _broadcast(self, path: str) -> None:
        for url in list(self.live):
            try:
                self._post(url, path)
            except SYNC_GONE as exc:
                self.mark_dead(url, exc)
        if not self.live:
            raise self.no_worker_left(path.lstrip("/"))
