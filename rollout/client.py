"""Drive `align rollout serve` workers as one `RolloutEngine`.

A batch is cut into contiguous runs of whole prompts (a GRPO group never spans workers), one run
per live worker, sent in parallel. A run whose worker fails is retried on another live worker; a
worker that cannot be reached is marked dead for the rest of the run. Seeds are offset by each
run's first prompt index, so the samples do not depend on how the batch was split.

Staleness: the client's `weight_version` counts its own pushes; a sample made by older weights
(e.g. by a worker that missed a push) is counted in `stats["stale_samples"]`.

Routing replay: `record_routes=True` asks every worker for each sample's MoE expert ids
(`return_routes`), decoded into the same `Sample.routes` a colocated `HFEngine(record_routes=True)`
fills; a worker whose engine cannot record them refuses, and that refusal is an AlignError.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import torch

from align.errors import AlignError
from rollout.base import Sample, SamplingParams
from rollout.wire import pack_weights, sample_from_json, sampling_to_json

UNREACHABLE = (httpx.TransportError,)  # connect/read errors and timeouts: the worker is gone


class RemoteEngines:
    """`RolloutEngine` over HTTP rollout workers."""

    supports_sleep = True

    def __init__(self, urls: list[str], timeout_s: float = 600.0, retries: int = 2,
                 record_routes: bool = False):
        if not urls:
            raise AlignError("RemoteEngines: no worker URLs; start workers with `align rollout serve`")
        self.urls = [u.rstrip("/") for u in urls]
        self.live = list(self.urls)
        self.errors: dict[str, str] = {}
        self.retries = retries
        self.record_routes = record_routes
        self.weight_version = 0
        self.stats = {"requests": 0, "retries": 0, "dead_workers": 0, "samples": 0, "stale_samples": 0}
        self._http = httpx.Client(timeout=timeout_s)

    def _mark_dead(self, url: str, exc: Exception) -> None:
        self.errors[url] = f"{type(exc).__name__}: {exc}"
        if url in self.live:
            self.live.remove(url)
            self.stats["dead_workers"] += 1

    def _no_worker_left(self, what: str) -> AlignError:
        tried = "; ".join(f"{u} ({self.errors.get(u, 'not tried')})" for u in self.urls)
        return AlignError(f"rollout {what}: no live worker left. Workers: {tried}. "
                          "Check they run (`align rollout serve`) and are reachable, then restart the run.")

    def _post(self, url: str, path: str, **kwargs) -> dict:
        response = self._http.post(url + path, **kwargs)
        if 400 <= response.status_code < 500:  # the request itself is wrong: every worker would refuse it
            raise AlignError(f"rollout worker {url} refused {path}: {refusal(response)}")
        response.raise_for_status()
        return response.json()

    def _generate_run(self, first: int, prompts: list[list[int]], n: int, sampling: SamplingParams,
                      url: str) -> list[list[Sample]]:
        """Generate one run of prompts; on failure move to another live worker, up to `retries` times."""
        body_sampling = sampling_to_json(replace(sampling, seed=sampling.seed + first * n))
        tried: list[str] = []
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats["retries"] += 1
                candidates = [u for u in self.live if u not in tried] or self.live
                if not candidates:
                    break
                url = candidates[0]
            tried.append(url)
            self.stats["requests"] += 1
            try:
                data = self._post(url, "/generate", json={"prompt_token_ids": prompts, "n": n,
                                                          "sampling": body_sampling,
                                                          "return_routes": self.record_routes})
                groups = [[sample_from_json(s) for s in g] for g in data["groups"]]
                if self.record_routes and any(s.routes is None for g in groups for s in g):
                    raise AlignError(f"rollout worker {url} returned samples without routes; it "
                                     "predates return_routes: upgrade align there and restart it")
                return groups
            except UNREACHABLE as exc:
                self._mark_dead(url, exc)
            except httpx.HTTPStatusError as exc:  # a worker-side error: try elsewhere, keep the worker
                self.errors[url] = f"HTTP {exc.response.status_code}: {exc.response.text[:200]}"
        raise self._no_worker_left(f"generate (tried {', '.join(tried)})")

    def generate(self, prompt_token_ids: list[list[int]], n: int,
                 sampling: SamplingParams) -> list[list[Sample]]:
        if not self.live:
            raise self._no_worker_left("generate")
        runs = split_runs(len(prompt_token_ids), len(self.live))
        with ThreadPoolExecutor(len(runs)) as pool:
            futures = [pool.submit(self._generate_run, a, prompt_token_ids[a:b], n, sampling, url)
                       for (a, b), url in zip(runs, self.live)]
            groups = [g for f in futures for g in f.result()]
        samples = [s for g in groups for s in g]
        self.stats["samples"] += len(samples)
        self.stats["stale_samples"] += sum(s.weight_version < self.weight_version for s in samples)
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
                self._mark_dead(url, exc)
        if not self.live:
            raise self._no_worker_left(path.lstrip("/"))

    def health(self) -> list[dict]:
        """/health of every live worker (model, engine, weight_version)."""
        return [self._http.get(u + "/health").json() for u in self.live]


def refusal(response: httpx.Response) -> str:
    """The worker's reason (FastAPI's `detail`), else the start of the body."""
    try:
        return str(response.json()["detail"])
    except (ValueError, KeyError, TypeError):
        return response.text[:500]


def split_runs(num_prompts: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) runs of prompts, as even as possible, at most one per worker."""
    workers = max(1, min(workers, num_prompts))
    size, extra = divmod(num_prompts, workers)
    bounds, start = [], 0
    for w in range(workers):
        end = start + size + (w < extra)
        bounds.append((start, end))
        start = end
    return bounds
