"""Real `align rollout serve --engine hf` workers (subprocesses on loopback) driven by RemoteEngines:
two dense HF workers and one MoE worker returning routes; weights over a gloo group per worker,
never in an HTTP body; the sync check; failover and readmission across kills and restarts.
Stock vLLM servers: test_vllm_serve.py."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from align.data.io import write_jsonl
from align.data.synth import generate
from align.errors import AlignError
from align.moe import SENTINEL, moe_gates, routes_to_batch
from align.pipeline import run_pipeline
from align.recipe.load import load_recipe
from align.weights import checkpoint_weights
from helpers.sync import check_catches_a_skipped_and_a_corrupted_sync, completions, kill_when_synced, perturb
from rollout.base import Sample, SamplingParams
from rollout.client import RemoteEngines
from rollout.hf import HFEngine
from rollout.pool import split_runs
from rollout.sync_check import SyncCheckError
from rollout.wire import pack_weights, routes_from_json, routes_to_json, sample_from_json, sample_to_json
from helpers.workers import chat_ids, running_worker, start_worker, stop, wait_healthy

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10)
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def workers(model_dir):
    started = [start_worker(model_dir), start_worker(model_dir)]
    try:
        for proc, url in started:
            wait_healthy(proc, url)
        yield started
    finally:
        stop(started)


@pytest.fixture(scope="module")
def local(model_dir):
    """A local HF engine on the same weights: what the workers must reproduce."""
    return HFEngine.from_pretrained(model_dir, batch_size=2)


@pytest.fixture(scope="module")
def prompts(local):
    texts = ["What is 7 * 6?", "Say hello.", "List two colours.", "Why is the sky blue?"]
    return chat_ids(local.tokenizer, texts)


def test_split_runs_keeps_whole_prompts_and_covers_the_batch():
    assert split_runs(5, 2) == [(0, 3), (3, 5)]
    assert split_runs(1, 3) == [(0, 1)]
    assert split_runs(6, 3) == [(0, 2), (2, 4), (4, 6)]


def test_health_reports_model_engine_and_version(workers, model_dir):
    for _, url in workers:
        assert httpx.get(url + "/health").json() == {"model": str(model_dir), "engine": "hf", "dtype": "float32",
                                                     "weight_version": 0, "update": "serving"}


def test_batch_spreads_over_both_workers_and_matches_local_engine(workers, local, prompts, model_dir):
    client = RemoteEngines([url for _, url in workers], model_dir)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8, seed=11)
    groups = client.generate(prompts, 3, sampling)
    assert client.stats["requests"] == 2  # one run of whole prompts per worker
    assert [len(g) for g in groups] == [3, 3, 3, 3]
    # seeds are offset per run exactly like the local engine's batches of 2: same samples
    want = local.generate(prompts, 3, sampling)
    assert [[s.completion_ids for s in g] for g in groups] == [[s.completion_ids for s in g] for g in want]
    assert client.stats["stale_samples"] == 0


def test_bad_request_is_refused_not_retried(workers, model_dir):
    client = RemoteEngines([url for _, url in workers], model_dir)
    with pytest.raises(AlignError, match="empty prompt"):
        client.generate([[]], 1, GREEDY)
    assert client.stats["retries"] == 0 and len(client.live) == 2


def test_a_weight_body_is_refused_and_changes_nothing(workers, local, prompts, model_dir):
    """The old path (a safetensors state dict as the body of POST /update_weights) is gone: the
    worker refuses it, keeps its weights and version, and serves on."""
    url = workers[0][1]
    client = RemoteEngines([url], model_dir)
    before = client.generate(prompts, 1, GREEDY)
    state = {n: torch.randn_like(t) for n, t in local.model.state_dict().items()}
    response = httpx.post(url + "/update_weights", content=pack_weights(state.items()), params={"version": 7},
                          headers={"content-type": "application/octet-stream"})
    assert response.status_code == 400 and "call /start_weight_update first" in response.json()["detail"]
    assert httpx.get(url + "/health").json()["weight_version"] == 0
    assert completions(client.generate(prompts, 1, GREEDY)) == completions(before)


def test_update_weights_reaches_both_workers_over_gloo(workers, local, prompts, model_dir):
    client = RemoteEngines([url for _, url in workers], model_dir)
    perturb(local.model)
    before = client.generate(prompts, 1, GREEDY)
    client.update_weights(local.model.state_dict().items())
    assert [httpx.get(url + "/health").json()["weight_version"] for _, url in workers] == [1, 1]
    assert client.stats["syncs"] == 1 and client.stats["sync_check_gap"] < 1e-6  # float32 on both sides
    after = client.generate(prompts, 1, GREEDY)
    want = local.generate(prompts, 1, GREEDY)
    assert completions(after) == completions(want) != completions(before)
    for got, ref in zip((s for g in after for s in g), (s for g in want for s in g)):
        assert got.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
    assert all(s.weight_version == 1 for g in after for s in g)
    lagging = RemoteEngines([workers[0][1]], model_dir)
    lagging.weight_version = 2  # a client ahead of the worker: its samples are stale
    lagging.generate(prompts[:2], 2, GREEDY)
    assert lagging.stats["stale_samples"] == 4


def test_sync_check_catches_a_skipped_and_a_corrupted_sync(workers, local, model_dir):
    urls = [url for _, url in workers]
    client = RemoteEngines(urls, model_dir)
    new = check_catches_a_skipped_and_a_corrupted_sync(client, local.model, urls[0])
    # another trainer pushed to one worker since: its version is not this trainer's
    RemoteEngines(urls[1:], model_dir).update_weights(new)
    with pytest.raises(SyncCheckError, match=rf"{urls[1]} reports weight version 1, the trainer pushed version 3"):
        client.check_sync(new)
    client.update_weights(new)  # rejoins that worker (it is in the other trainer's group now): 409, join, sync
    assert [httpx.get(u + "/health").json()["weight_version"] for u in urls] == [4, 4]


def test_a_push_that_does_not_fit_the_model_is_refused_before_any_tensor_moves(workers, local, model_dir):
    client = RemoteEngines([url for _, url in workers], model_dir)
    state = list(local.model.state_dict().items())
    started = time.monotonic()
    with pytest.raises(AlignError, match=r"refused /start_weight_update.*'base_model.model.lora_A.weight' "
                                         r"\(not a weight of"):
        client.update_weights([*state, ("base_model.model.lora_A.weight", torch.zeros(2, 2))])
    with pytest.raises(AlignError, match=r"'model.norm.weight' \(sent \[3\], model \[64\]\)"):
        client.update_weights([(n, torch.zeros(3) if n == "model.norm.weight" else t) for n, t in state])
    assert time.monotonic() - started < 30  # refused at once, not after a transfer timeout
    assert len(client.live) == 2 and client.weight_version == 0
    assert all(httpx.get(url + "/health").json()["update"] == "serving" for _, url in workers)


def test_routes_from_a_dense_model_are_refused_with_the_reason(workers, prompts, model_dir):
    client = RemoteEngines([workers[0][1]], model_dir, record_routes=True)
    with pytest.raises(AlignError, match="no MoE router"):
        client.generate(prompts[:1], 1, GREEDY)
    assert client.stats["retries"] == 0 and client.live == [workers[0][1]]
    # the refusal left no state behind: the next plain request is served
    assert RemoteEngines([workers[0][1]], model_dir).generate(prompts[:1], 1, GREEDY)[0][0].routes is None


def test_routes_wire_format_round_trips_exactly():
    routes = torch.tensor([[[0, 159], [SENTINEL, 32767]], [[-32768, 7], [3, 4]]])
    sample = Sample([5, 6], [-0.1, -2.5e-7], "length", weight_version=3, routes=routes)
    back = sample_from_json(sample_to_json(sample))
    assert back.routes.dtype == torch.long and torch.equal(back.routes, routes)
    assert (back.completion_ids, back.logprobs, back.weight_version) == ([5, 6], [-0.1, -2.5e-7], 3)
    empty = torch.zeros((0, 26, 6), dtype=torch.long)
    assert routes_from_json(routes_to_json(empty)).shape == (0, 26, 6)
    assert "routes" not in sample_to_json(Sample([5], None, "stop"))
    with pytest.raises(AlignError, match="int16"):
        routes_to_json(torch.tensor([[[40000]]]))


def test_moe_worker_returns_the_routes_the_colocated_engine_records(moe_dir):
    """Same prompts and seed: the worker's decoded routes equal a colocated engine's, exactly, before
    and after a push of checkpoint-format weights (experts unfused, as the GRPO trainer sends) over
    the gloo group, which the sync check confirms."""
    local = HFEngine.from_pretrained(moe_dir, record_routes=True)
    prompts = chat_ids(local.tokenizer, ["What is 7 * 6?", "Say hello.", "Why is the sky blue?"])
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8, seed=5)
    with running_worker(moe_dir) as url:
        client = RemoteEngines([url], moe_dir, record_routes=True)
        runs = [(client.generate(prompts, 2, sampling), local.generate(prompts, 2, sampling))]
        with torch.no_grad():
            for p in local.model.parameters():
                p.add_(torch.randn_like(p) * 0.2)
        client.update_weights(checkpoint_weights(local.model))
        assert client.stats["sync_check_gap"] < 1e-6 and httpx.get(url + "/health").json()["weight_version"] == 1
        runs.append((client.generate(prompts, 2, sampling), local.generate(prompts, 2, sampling)))
        plain = RemoteEngines([url], moe_dir).generate(prompts, 1, GREEDY)  # one worker serves both kinds of run
    assert all(s.routes is None for g in plain for s in g)
    for got, want in runs:
        got_s, want_s = [s for g in got for s in g], [s for g in want for s in g]
        assert [s.completion_ids for s in got_s] == [s.completion_ids for s in want_s]
        for g, w in zip(got_s, want_s, strict=True):
            assert g.routes.dtype == w.routes.dtype and torch.equal(g.routes, w.routes)
    assert [s.completion_ids for g in runs[0][0] for s in g] != [s.completion_ids for g in runs[1][0] for s in g]
    assert got_s[0].routes.shape[1:] == (len(moe_gates(local.model)), local.model.config.num_experts_per_tok)
    # the trainer's replay batch is built from them unchanged
    prompt_lens = [len(p) for p in prompts for _ in range(2)]
    p_len, t_len = max(prompt_lens), max(len(s.completion_ids) for s in want_s)
    assert torch.equal(routes_to_batch(prompt_lens, [s.routes for s in got_s], p_len, t_len),
                       routes_to_batch(prompt_lens, [s.routes for s in want_s], p_len, t_len))


def test_dead_worker_is_retried_elsewhere_then_all_dead_is_a_clear_error(workers, prompts, model_dir):
    (proc_a, url_a), (proc_b, url_b) = workers
    client = RemoteEngines([url_a, url_b], model_dir, timeout_s=30)
    proc_b.kill()
    proc_b.wait()
    groups = client.generate(prompts, 2, GREEDY)
    assert len(groups) == 4 and client.live == [url_a]
    assert client.stats["dead_workers"] == 1 and client.stats["retries"] == 1
    proc_a.kill()
    proc_a.wait()
    with pytest.raises(AlignError) as err:
        client.generate(prompts, 2, GREEDY)
    assert url_a in str(err.value) and url_b in str(err.value)


def kill_mid_sync(proc, url: str) -> tuple[threading.Thread, list[str], threading.Event]:
    """Kill `proc` as soon as its worker reports a weight update under way (the stage it was in
    goes into the list), unless the event is set first (the sync ended unseen)."""
    seen: list[str] = []
    over = threading.Event()

    def watch() -> None:
        with httpx.Client(timeout=2) as http:
            while not over.is_set() and not seen:
                stage = http.get(url + "/health").json()["update"]
                if stage != "serving":
                    proc.kill()
                    seen.append(stage)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, seen, over


def test_a_worker_killed_mid_sync_costs_nothing_and_comes_back_synced(model_dir, local, prompts):
    """A worker killed while it receives: the survivor gets the weights in the same sync. Restarted
    on its URL (initial weights, version 0), it is readmitted at the next sync and serves the
    trainer's weights, with its version, before it generates anything."""
    (proc_a, url_a), (proc_b, url_b) = started = [start_worker(model_dir), start_worker(model_dir)]
    try:
        for proc, url in started:
            wait_healthy(proc, url)
        client = RemoteEngines([url_a, url_b], model_dir, timeout_s=60)
        for syncs in range(1, 11):  # a nano sync lasts milliseconds: on busy cores the watcher can miss one
            perturb(local.model)
            watcher, seen, over = kill_mid_sync(proc_b, url_b)
            begun = time.monotonic()
            client.update_weights(local.model.state_dict().items())
            over.set()
            watcher.join(timeout=60)
            if seen:
                break
        assert seen and seen[0] in ("started", "receiving", "received"), seen  # killed inside the sync
        assert time.monotonic() - begun < 30  # the dead peer broke the broadcast at once, no timeout waited
        assert client.live == [url_a] and client.stats["dead_workers"] == 1 and client.weight_version == syncs
        assert completions(client.generate(prompts, 2, GREEDY)) == completions(local.generate(prompts, 2, GREEDY))
        proc_b.wait()
        proc_b, _ = started[1] = start_worker(model_dir, port=int(url_b.rsplit(":", 1)[1]))
        wait_healthy(proc_b, url_b)
        assert httpx.get(url_b + "/health").json()["weight_version"] == 0  # back with the initial weights
        assert client.live == [url_a]  # not serving until a sync brings it up to date
        perturb(local.model)
        client.update_weights(local.model.state_dict().items())
        assert client.live == [url_a, url_b] and client.stats["readmitted"] == 1
        assert [httpx.get(u + "/health").json()["weight_version"] for u in (url_a, url_b)] == [syncs + 1] * 2
        want = completions(local.generate(prompts, 2, GREEDY))
        assert completions(RemoteEngines([url_b], model_dir).generate(prompts, 2, GREEDY)) == want
        got = client.generate(prompts, 2, GREEDY)
        assert completions(got) == want and client.stats["stale_samples"] == 0
    finally:
        stop(started)


def test_a_worker_holding_an_earlier_runs_weights_serves_the_trainers_from_the_first_rollout(
        tmp_path, model_dir, monkeypatch):
    """An earlier run left other weights (and version 1) on the worker: the new run's first
    rollouts (the greedy evaluation before step 1, then step 1's samples) come from the trainer's
    starting weights, labelled version 0."""
    from align.data.prompts import load_prompts
    from align.recipe.schema import DataSource

    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(generate("math", 4, seed=4, form="prompts"), prompts)
    record = tmp_path / "generated.jsonl"
    monkeypatch.setenv("ALIGN_TEST_RECORD", str(record))
    earlier = HFEngine.from_pretrained(model_dir)
    perturb(earlier.model)
    stage = {"name": "rl", "kind": "grpo", "prompts": str(prompts), "eval_prompts": str(prompts),
             "rewards": [{"name": f"{FIXTURES}/user_rewards.py:recorded_ids"}], "group_size": 2,
             "prompts_per_step": 2, "per_device_batch_size": 4, "max_steps": 1, "beta": 0.0,
             "sampling": {"max_new_tokens": 8}, "save_steps": None, "rollout": {"mode": "server"}}
    with running_worker(model_dir, timeout_s=600) as url:
        RemoteEngines([url], model_dir).update_weights(earlier.model.state_dict().items())
        stage["rollout"]["servers"] = [url]
        path = tmp_path / "recipe.yaml"
        path.write_text(json.dumps({"output_dir": str(tmp_path / "run"), "model": {"path": str(model_dir)},
                                    "logging": {"report_to": ["none"]}, "stages": [stage]}))
        run_pipeline(load_recipe(path))
    local = HFEngine.from_pretrained(model_dir)
    ids = load_prompts([DataSource(path=str(prompts))], local.tokenizer, 512).ids
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    served = [json.loads(line)["ids"] for line in record.read_text().splitlines()]
    assert served[0] == [g[0] for g in completions(local.generate(ids, 1, greedy))]  # the evaluation before step 1
    assert served[0] != [g[0] for g in completions(earlier.generate(ids, 1, greedy))]  # the earlier weights differ
    rows = [json.loads(line) for line in (tmp_path / "run/rl/metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if "loss" in r)
    assert step["step"] == 1 and step["mismatch/logp_diff_max"] < 1e-4  # step 1's samples: the trainer's policy
    assert step["rollout/stale_samples"] == 0


@pytest.mark.slow
def test_an_fsdp2_trainer_on_two_ranks_syncs_a_worker_from_its_shards(tmp_path, model_dir):
    """FSDP2 on two gloo ranks: rank 0 gathers the full weights from both ranks' shards and
    pushes them over gloo; afterwards the worker's greedy tokens and their logprobs are the
    trained policy's."""
    from align.data.prompts import load_prompts
    from align.recipe.schema import DataSource
    from helpers.launch import train

    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(generate("math", 16, seed=4, form="prompts"), prompts)
    stage = {"name": "rl", "kind": "grpo", "prompts": str(prompts),
             "rewards": [{"name": f"{FIXTURES}/user_rewards.py:char_diversity"}], "group_size": 4,
             "prompts_per_step": 4, "per_device_batch_size": 4, "max_steps": 2, "lr": 1e-3, "beta": 0.0,
             "sampling": {"max_new_tokens": 8}, "save_steps": None, "rollout": {"mode": "server"}}
    with running_worker(model_dir, timeout_s=600) as url:
        stage["rollout"]["servers"] = [url]
        path = tmp_path / "recipe.json"
        path.write_text(json.dumps({"output_dir": str(tmp_path / "run"), "model": {"path": str(model_dir)},
                                    "logging": {"report_to": ["none"]}, "distributed": {"strategy": "fsdp2"},
                                    "stages": [stage]}))
        done = train(path, 2)
        assert done.returncode == 0, done.stderr[-4000:]
        final = tmp_path / "run/rl/final"
        trained = HFEngine.from_pretrained(final)
        ids = load_prompts([DataSource(path=str(prompts))], trained.tokenizer, 512).ids[:4]
        served = RemoteEngines([url], final).generate(ids, 1, GREEDY)
        version = httpx.get(url + "/health").json()["weight_version"]
    want = trained.generate(ids, 1, GREEDY)
    assert completions(served) == completions(want)
    logprobs = [lp for g in served for s in g for lp in s.logprobs]
    assert logprobs == pytest.approx([lp for g in want for s in g for lp in s.logprobs], abs=1e-5)
    base = [lp for g in HFEngine.from_pretrained(model_dir).generate(ids, 1, GREEDY) for s in g for lp in s.logprobs]
    assert logprobs != pytest.approx(base, abs=1e-3)  # training moved them: the push is what they show
    rows = [json.loads(line) for line in (tmp_path / "run/rl/metrics.jsonl").read_text().splitlines()]
    assert version == 2 and all(r["rollout/sync_check_gap"] < 1e-5 for r in rows if "loss" in r)


@pytest.mark.slow
def test_grpo_on_two_workers_loses_no_step_when_one_is_killed(tmp_path, model_dir):
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(generate("math", 16, seed=4, form="prompts"), prompts)
    started = [start_worker(model_dir), start_worker(model_dir)]
    try:
        for proc, url in started:
            wait_healthy(proc, url)
        (_, survivor), (victim, victim_url) = started
        stage = {"name": "rl", "kind": "grpo", "prompts": str(prompts), "rewards": [{"name": "math_accuracy"}],
                 "group_size": 4, "prompts_per_step": 2, "per_device_batch_size": 8, "max_steps": 3,
                 "lr": 1e-3, "beta": 0.0, "sampling": {"max_new_tokens": 12}, "save_steps": None,
                 "rollout": {"mode": "server", "servers": [u for _, u in started]}}
        path = tmp_path / "recipe.yaml"
        path.write_text(json.dumps({"output_dir": str(tmp_path / "run"), "model": {"path": str(model_dir)},
                                    "logging": {"report_to": ["none"]}, "stages": [stage]}))
        watcher = kill_when_synced(victim.kill, victim_url + "/health", 1)
        results = run_pipeline(load_recipe(path))
        watcher.join(timeout=60)
        survivor_version = httpx.get(survivor + "/health").json()["weight_version"]
    finally:
        stop(started)
    rows = [json.loads(line) for line in (tmp_path / "run/rl/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert steps[-1]["rollout/dead_workers"] == 1  # killed after step 1's sync
    assert all(r["rollout/sync_check_gap"] < 1e-6 for r in steps)
    assert steps[-1]["rollout/samples"] == 3 * 8 and steps[-1]["rollout/stale_samples"] == 0
    assert survivor_version == 3 and results["rl"].final.is_dir()
