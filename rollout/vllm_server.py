"""Stock `vllm serve` processes as one `RolloutEngine` (`rollout: {mode: server, engine: vllm}`).

Everything goes through vLLM's own routes (`VLLM_SERVER_DEV_MODE=1`):
- generation: `/v1/completions` with the prompt as token ids, one request per sample with its own
  seed (`seed + prompt_index * n + k`, as the colocated engine; vLLM gives `n > 1` children the
  parent's seed), `logprobs: 0` and `return_token_ids`. The server must run with
  `--logprobs-mode processed_logprobs` (the sampled token's log softmax(logits / T), what the
  trainer recomputes); this is checked at connect.
- weights: `/pause` → `/start_weight_update` → `/update_weights` → `/finish_weight_update` →
  `/update_weight_version` → `/resume`, the tensors moving through a vLLM weight-transfer engine
  (the `gloo` engine of `rollout.transfer_gloo` on CPU), one group per server between the trainer
  (rank 0) and that server's workers. No weights travel in HTTP bodies.
- after every sync, each server's `/weight_info` must report the new version, and the sync check
  (`rollout.sync_check`) compares its prompt logprobs of a fixed probe with the trainer's.
- a server may hold an earlier run's weights, or another checkpoint than the stage starts from:
  the GRPO trainer pushes its own weights before the first rollout (`_start_engine_at`).

Failover (`rollout.pool`): a run whose server fails goes to another live server; a server that
fails a sync is dead (its weights would be stale). At every sync the dead servers are asked for
`/health` again; one that answers (restarted, or back on the network) joins a new transfer group
and receives this sync's weights before it serves again. align's own HF workers
(`rollout.client`) follow the same lifecycle over the same gloo data plane.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import torch

from align.errors import AlignError
from rollout.base import Sample, SamplingParams
from rollout.pool import SYNC_GONE, WorkerPool, raise_for_refusal
from rollout.sync_check import ProbeReference

START_HINT = "align rollout serve --engine vllm"
BACKEND = "gloo"


def completion_body(prompt: list[int], sampling: SamplingParams, seed: int) -> dict:
    """One `/v1/completions` request: token ids in, token ids and sampled logprobs out."""
    return {"prompt": list(prompt), "n": 1, "max_tokens": sampling.max_new_tokens,
            "temperature": max(sampling.temperature, 0.0), "top_p": sampling.top_p, "top_k": sampling.top_k,
            "stop": list(sampling.stop), "seed": seed, "logprobs": 0 if sampling.logprobs else None,
            "return_token_ids": True}


def sample_from_choice(choice: dict, version: int) -> Sample:
    logprobs = choice.get("logprobs")
    return Sample(list(choice["token_ids"]), None if logprobs is None else list(logprobs["token_logprobs"]),
                  "stop" if choice["finish_reason"] == "stop" else "length", weight_version=version)


def probe_logprobs(choice: dict, tokens: list[int]) -> list[float]:
    """The probe's own tokens' logprobs from vLLM's `prompt_logprobs` (position 0 has none)."""
    rows = choice["prompt_logprobs"][1:]
    return [row[str(t)]["logprob"] for row, t in zip(rows, tokens[1:], strict=True)]


class Server:
    """One `vllm serve` process: its settings, its transfer engine and its weight version."""

    def __init__(self, url: str, info: dict, world_size: int):
        config = info["vllm_config"]
        self.url = url
        self.dtype = str(config["model_config"]["dtype"]).removeprefix("torch.")
        self.world_size = world_size
        self.transfer = None  # trainer side of the weight-transfer group (rollout.transfer_gloo)
        self.version = 0


class VLLMServers(WorkerPool):
    """`RolloutEngine` over stock `vllm serve` processes started with align's gloo transfer engine."""

    def __init__(self, urls: list[str], model_dir: str | Path, *, timeout_s: float = 600.0, retries: int = 2,
                 transfer_address: str = "127.0.0.1", record_routes: bool = False):
        super().__init__(urls, retries, START_HINT, timeout_s)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise AlignError("rollout.mode: server with engine: vllm drives the servers from one trainer process; "
                             f"this run has {torch.distributed.get_world_size()} ranks. Train on one rank, or "
                             "use rollout.engine: hf servers")
        if record_routes:
            raise AlignError("routing_replay with rollout.engine: vllm, mode: server: stock vLLM returns expert "
                             "routes only with enable_return_routed_experts (model runner V2 and Triton; not on "
                             "CPU), which align does not drive yet. Use `align rollout serve --engine hf` workers "
                             "(rollout.engine: hf), or set routing_replay: false")
        self.transfer_address = transfer_address
        self.reference = ProbeReference(model_dir)
        self.servers: dict[str, Server] = {}
        for url in self.urls:
            try:
                self._connect(url)
            except SYNC_GONE as exc:  # down at start: it joins at a sync once it answers
                self.mark_dead(url, exc)
        if not self.live:
            raise self.no_worker_left("connect")

    # ------------------------------------------------------------------ control plane

    def _connect(self, url: str) -> None:
        """Read the server's settings (refusing one that cannot serve a GRPO run correctly) and
        join it in a new weight-transfer group."""
        try:
            info = self._get(url, "/server_info", config_format="json")
        except AlignError as exc:
            raise AlignError(f"{url}: no /server_info ({exc}); start the server with VLLM_SERVER_DEV_MODE=1 "
                             f"(`{START_HINT}` does)") from exc
        config = info["vllm_config"]
        transfer = config.get("weight_transfer_config") or {}
        if transfer.get("backend") != BACKEND:
            raise AlignError(f"{url}: weight transfer backend is {transfer.get('backend')!r}, align sends over "
                             f"{BACKEND!r}: start it with --weight-transfer-config '{{\"backend\": \"{BACKEND}\"}}' "
                             "--worker-extension-cls rollout.transfer_gloo.GlooWorkerExtension "
                             f"(`{START_HINT}` does)")
        mode = config["model_config"].get("logprobs_mode")
        if mode != "processed_logprobs":
            raise AlignError(f"{url}: logprobs_mode is {mode!r}; the trainer needs the log-probability of "
                             "the sampled token at the sampling temperature: start it with --logprobs-mode "
                             f"processed_logprobs (`{START_HINT}` does)")
        server = Server(url, info, self._get(url, "/get_world_size")["world_size"])
        self._init_transfer(server)
        self.servers[url] = server

    def _init_transfer(self, server: Server) -> None:
        from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        from rollout.transfer_gloo import GlooTrainerInitInfo, RoundSource

        info = GlooTrainerInitInfo(rank=0, master_address=self.transfer_address,
                                   server_world_size=server.world_size, timeout_s=self.timeout_s)
        server.transfer = WeightTransferTrainerFactory.trainer_init(
            info, client=HTTPVLLMWeightSyncClient(server.url, timeout=self.timeout_s), source=RoundSource())

    def _sync_one(self, url: str, pairs: list[tuple[str, torch.Tensor]], version: int) -> None:
        """Pause, move the weights, label them, resume. Any failure leaves the server dead."""
        server = self.servers[url]
        self._post(url, "/pause", mode="wait")  # clears the prefix cache of the old weights
        server.transfer.source.set(pairs)
        try:
            server.transfer.send_weights()
        finally:
            server.transfer.source.set([])  # hold no reference to the trainer's tensors
        self._post(url, "/update_weight_version", json={"new_version": str(version)})
        self._post(url, "/resume")
        server.version = version

    # ------------------------------------------------------------------ RolloutEngine

    def push(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        """The sync without its check: every live server gets `pairs` as the next weight version."""
        self.revive(self._connect)  # a restarted server: new settings, new group
        self.sync_all(lambda url, version: self._sync_one(url, pairs, version))

    def check_sync(self, pairs: list[tuple[str, torch.Tensor]]) -> float:
        """Every live server reports this version and scores the probe like the pushed weights do;
        else SyncCheckError naming the server and the gap. Returns the largest mean gap."""
        return self.check_workers("vLLM server", self.reference.logprobs(pairs), self._probe)

    def _probe(self, url: str) -> tuple[str, list[float], str]:
        reported = self._get(url, "/weight_info")["weight_version"]
        body = {"prompt": self.reference.tokens, "max_tokens": 1, "prompt_logprobs": 0, "temperature": 1.0}
        choice = self._post(url, "/v1/completions", json=body)["choices"][0]
        return reported, probe_logprobs(choice, self.reference.tokens), self.servers[url].dtype

    async def _generate_on(self, http: httpx.AsyncClient, url: str, first: int, prompts: list[list[int]], n: int,
                           sampling: SamplingParams) -> list[list[Sample]]:
        version = self.servers[url].version

        async def one(prompt: list[int], seed: int) -> Sample:
            response = await http.post(url + "/v1/completions", json=completion_body(prompt, sampling, seed))
            raise_for_refusal(url, "/v1/completions", response)
            return sample_from_choice(response.json()["choices"][0], version)

        samples = await asyncio.gather(*(one(p, sampling.seed + (first + i) * n + k)
                                         for i, p in enumerate(prompts) for k in range(n)))
        return [list(samples[i * n:(i + 1) * n]) for i in range(len(prompts))]

    def generate(self, prompt_token_ids: list[list[int]], n: int,
                 sampling: SamplingParams) -> list[list[Sample]]:
        if any(len(p) == 0 for p in prompt_token_ids):
            raise AlignError("generate: empty prompt; every prompt needs at least one token")
        groups = self.spread(len(prompt_token_ids), lambda http, url, a, b: self._generate_on(
            http, url, a, prompt_token_ids[a:b], n, sampling), self.timeout_s)
        self.count([s for g in groups for s in g])
        return groups

    def sleep(self) -> None:
        """No-op: the servers' memory is not the trainer's, so nothing is released here."""

    def wake(self) -> None:
        """No-op (see `sleep`)."""

    def versions(self) -> dict[str, str]:
        """The weight version each live server reports (`/weight_info`)."""
        return {u: self._get(u, "/weight_info")["weight_version"] for u in self.live}
