"""Failover bookkeeping shared by the two server-mode engines (`rollout.client.RemoteEngines` for
align's own workers, `rollout.vllm_server.VLLMServers` for stock `vllm serve`).

A batch is cut into contiguous runs of whole prompts (a GRPO group never spans workers), one run
per live worker. A run whose worker fails is retried on another live worker, up to `retries`
times; a worker that cannot be reached is marked dead; a worker-side error (5xx) is retried
elsewhere without killing the worker; a 4xx is the request's fault and raised at once, since
every worker would refuse it. Counts go to `stats` (requests, retries, dead_workers, samples,
stale_samples, syncs, readmitted, sync_check_gap), which the GRPO trainer logs as `rollout/<key>`.

Weight syncs (`sync_all`) go to every live worker at once, each over its own transfer group, so
one worker failing costs only that worker; before each sync the dead workers are asked for
`/health` again (`revive`), and one that answers is synced with the others before it serves.
After a sync, `check_workers` asks each worker for its weight version and its log-probabilities
of the sync check's probe (rollout.sync_check).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import httpx
import torch

from align.errors import AlignError
from rollout.base import Sample
from rollout.sync_check import SyncCheckError, compare

UNREACHABLE = (httpx.TransportError,)  # connect/read errors and timeouts: the worker is gone
# a sync failing with these lost its worker: unreachable (httpx, or requests inside vLLM's HTTP
# client: OSError), a 5xx, or a transfer group broken by a peer that died (RuntimeError from gloo)
SYNC_GONE = (httpx.HTTPError, OSError, RuntimeError)
T = TypeVar("T")


class WorkerPool:
    """Live/dead workers, their last errors and the running counts."""

    def __init__(self, urls: list[str], retries: int, start_hint: str, timeout_s: float):
        if not urls:
            raise AlignError(f"no rollout worker URLs; start workers with `{start_hint}`")
        self.urls = [u.rstrip("/") for u in urls]
        self.live = list(self.urls)
        self.errors: dict[str, str] = {}
        self.retries = retries
        self.start_hint = start_hint
        self.timeout_s = timeout_s
        self.weight_version = 0
        self.stats: dict[str, float] = {"requests": 0, "retries": 0, "dead_workers": 0, "samples": 0,
                                        "stale_samples": 0, "syncs": 0, "readmitted": 0, "sync_check_gap": 0.0}
        self._http = httpx.Client(timeout=timeout_s)

    def _get(self, url: str, path: str, **params) -> dict:
        response = self._http.get(url + path, params=params)
        raise_for_refusal(url, path, response)
        return response.json()

    def _post(self, url: str, path: str, json: dict | None = None, **params) -> dict:
        response = self._http.post(url + path, json=json, params=params)
        raise_for_refusal(url, path, response)
        return response.json()

    def mark_dead(self, url: str, exc: BaseException) -> None:
        self.errors[url] = f"{type(exc).__name__}: {exc}"
        if url in self.live:
            self.live.remove(url)
            self.stats["dead_workers"] += 1

    def no_worker_left(self, what: str) -> AlignError:
        tried = "; ".join(f"{u} ({self.errors.get(u, 'not tried')})" for u in self.urls)
        return AlignError(f"rollout {what}: no live worker left. Workers: {tried}. "
                          f"Check they run (`{self.start_hint}`) and are reachable, then restart the run.")

    async def with_failover(self, url: str, attempt: Callable[[str], Awaitable[T]], what: str) -> T:
        """`await attempt(url)`; on failure again on another live worker, up to `retries` times."""
        tried: list[str] = []
        for n in range(self.retries + 1):
            if n:
                self.stats["retries"] += 1
                candidates = [u for u in self.live if u not in tried] or self.live
                if not candidates:
                    break
                url = candidates[0]
            tried.append(url)
            self.stats["requests"] += 1
            try:
                return await attempt(url)
            except UNREACHABLE as exc:
                self.mark_dead(url, exc)
            except httpx.HTTPStatusError as exc:  # a worker-side error: try elsewhere, keep the worker
                self.errors[url] = f"HTTP {exc.response.status_code}: {exc.response.text[:200]}"
        raise self.no_worker_left(f"{what} (tried {', '.join(tried)})")

    def spread(self, num_prompts: int, run: Callable[[httpx.AsyncClient, str, int, int], Awaitable[list[T]]],
               timeout_s: float) -> list[T]:
        """`await run(http, url, a, b)` for one contiguous run [a, b) of prompts per live worker, all
        at once, each with failover; the runs' results concatenated in prompt order."""
        if not self.live:
            raise self.no_worker_left("generate")

        async def runs() -> list[T]:
            limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
            async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as http:
                results = await asyncio.gather(*(
                    self.with_failover(url, lambda u, a=a, b=b: run(http, u, a, b), "generate")
                    for (a, b), url in zip(split_runs(num_prompts, len(self.live)), self.live)))
            return [item for result in results for item in result]

        return asyncio.run(runs())

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Sync every live worker (dead ones that came back included), then check each serves them;
        each client defines `push(pairs)` (its transfer) and `check_sync(pairs)` (its probe)."""
        pairs = [(name, tensor.detach()) for name, tensor in named_tensors]
        self.push(pairs)
        self.check_sync(pairs)

    def revive(self, connect: Callable[[str], object]) -> None:
        """Dead workers that answer /health again (restarted, or back on the network) are live
        again once `connect(url)` has accepted them; the sync that follows brings them up to date."""
        for url in [u for u in self.urls if u not in self.live]:
            try:
                if self._http.get(url + "/health", timeout=5).status_code != 200:
                    continue
                connect(url)
            except (*UNREACHABLE, httpx.HTTPStatusError, AlignError):
                continue
            self.live.append(url)
            self.stats["readmitted"] += 1

    def sync_all(self, sync_one: Callable[[str, int], object]) -> None:
        """`sync_one(url, version)` on every live worker at once, for the next weight version. A
        worker whose sync fails with SYNC_GONE is dead (its weights are stale); any other error (a
        refused request, a bug) would fail alike everywhere and is raised."""
        version = self.weight_version + 1
        urls = list(self.live)
        with ThreadPoolExecutor(max_workers=len(urls) or 1) as pool:
            futures = {url: pool.submit(sync_one, url, version) for url in urls}
        for url in urls:
            error = futures[url].exception()
            if isinstance(error, SYNC_GONE):
                self.mark_dead(url, error)
            elif error is not None:
                raise error
        if not self.live:
            raise self.no_worker_left("update_weights")
        self.weight_version = version
        self.stats["syncs"] += 1

    def check_workers(self, kind: str, want: list[float],
                      probe: Callable[[str], tuple[object, list[float], str]]) -> float:
        """Every live worker reports the trainer's weight version and scores the probe as `want`
        (the pushed weights' log-probabilities); `probe(url)` -> (reported version, its probe
        log-probabilities, its dtype). Else SyncCheckError naming the worker and the gap. A worker
        gone since its sync is dead, nothing to check. Returns the largest mean gap."""
        worst = 0.0
        for url in list(self.live):
            try:
                reported, got, dtype = probe(url)
            except SYNC_GONE as exc:
                self.mark_dead(url, exc)
                continue
            if str(reported) != str(self.weight_version):
                raise SyncCheckError(f"sync check failed: {kind} {url} reports weight version {reported!r}, "
                                     f"the trainer pushed version {self.weight_version}: that {kind} missed "
                                     "the update")
            worst = max(worst, compare(f"{kind} {url}", got, want, dtype, self.weight_version))
        if not self.live:
            raise self.no_worker_left("sync check")
        self.stats["sync_check_gap"] = worst
        return worst

    def count(self, samples: list[Sample]) -> None:
        """A sample made by weights older than the trainer's last push is stale."""
        self.stats["samples"] += len(samples)
        self.stats["stale_samples"] += sum(s.weight_version < self.weight_version for s in samples)


def raise_for_refusal(url: str, path: str, response: httpx.Response) -> None:
    """4xx: the request itself is wrong, every worker would refuse it: AlignError with the reason.
    5xx: httpx.HTTPStatusError, which `with_failover` retries elsewhere."""
    if 400 <= response.status_code < 500:
        raise AlignError(f"rollout worker {url} refused {path}: {refusal(response)}")
    response.raise_for_status()


def refusal(response: httpx.Response) -> str:
    """The worker's reason (FastAPI's `detail`, vLLM's `error.message`), else the body's start."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        detail = body.get("detail") or body.get("error")
        if isinstance(detail, dict):
            detail = detail.get("message", detail)
        if detail is not None:
            return str(detail)
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
