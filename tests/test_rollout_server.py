"""Real `align rollout serve --engine hf` workers (subprocesses on loopback) driven by RemoteEngines:
two dense HF workers and one MoE worker returning routes. Stock vLLM servers: test_vllm_serve.py."""

from __future__ import annotations

import httpx
import pytest
import torch

from align.errors import AlignError
from align.moe import SENTINEL, moe_gates, routes_to_batch
from align.weights import checkpoint_weights
from rollout.base import Sample, SamplingParams
from rollout.client import RemoteEngines
from rollout.hf import HFEngine
from rollout.pool import split_runs
from rollout.wire import routes_from_json, routes_to_json, sample_from_json, sample_to_json
from helpers.workers import chat_ids, running_worker, start_worker, stop, wait_healthy

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10)


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
        assert httpx.get(url + "/health").json() == {"model": str(model_dir), "engine": "hf",
                                                     "weight_version": 0}


def test_batch_spreads_over_both_workers_and_matches_local_engine(workers, local, prompts):
    client = RemoteEngines([url for _, url in workers])
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8, seed=11)
    groups = client.generate(prompts, 3, sampling)
    assert client.stats["requests"] == 2  # one run of whole prompts per worker
    assert [len(g) for g in groups] == [3, 3, 3, 3]
    # seeds are offset per run exactly like the local engine's batches of 2: same samples
    want = local.generate(prompts, 3, sampling)
    assert [[s.completion_ids for s in g] for g in groups] == [[s.completion_ids for s in g] for g in want]
    assert client.stats["stale_samples"] == 0


def test_bad_request_is_refused_not_retried(workers):
    client = RemoteEngines([url for _, url in workers])
    with pytest.raises(AlignError, match="empty prompt"):
        client.generate([[]], 1, GREEDY)
    assert client.stats["retries"] == 0 and len(client.live) == 2


def test_update_weights_reaches_both_workers(workers, local, prompts):
    client = RemoteEngines([url for _, url in workers])
    with torch.no_grad():
        for p in local.model.parameters():
            p.add_(torch.randn_like(p) * 0.2, alpha=1.0)
    before = client.generate(prompts, 1, GREEDY)
    client.update_weights(local.model.state_dict().items())
    assert [httpx.get(url + "/health").json()["weight_version"] for _, url in workers] == [1, 1]
    after = client.generate(prompts, 1, GREEDY)
    want = local.generate(prompts, 1, GREEDY)
    assert [g[0].completion_ids for g in after] == [g[0].completion_ids for g in want]
    assert [g[0].completion_ids for g in before] != [g[0].completion_ids for g in want]
    assert all(s.weight_version == 1 for g in after for s in g)
    lagging = RemoteEngines([workers[0][1]])
    lagging.weight_version = 2  # a client ahead of the worker: its samples are stale
    lagging.generate(prompts[:2], 2, GREEDY)
    assert lagging.stats["stale_samples"] == 4


def test_routes_from_a_dense_model_are_refused_with_the_reason(workers, prompts):
    client = RemoteEngines([workers[0][1]], record_routes=True)
    with pytest.raises(AlignError, match="no MoE router"):
        client.generate(prompts[:1], 1, GREEDY)
    assert client.stats["retries"] == 0 and client.live == [workers[0][1]]
    # the refusal left no state behind: the next plain request is served
    assert RemoteEngines([workers[0][1]]).generate(prompts[:1], 1, GREEDY)[0][0].routes is None


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
    and after a push of checkpoint-format weights (experts unfused, as the GRPO trainer sends)."""
    local = HFEngine.from_pretrained(moe_dir, record_routes=True)
    prompts = chat_ids(local.tokenizer, ["What is 7 * 6?", "Say hello.", "Why is the sky blue?"])
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8, seed=5)
    with running_worker(moe_dir) as url:
        client = RemoteEngines([url], record_routes=True)
        runs = [(client.generate(prompts, 2, sampling), local.generate(prompts, 2, sampling))]
        with torch.no_grad():
            for p in local.model.parameters():
                p.add_(torch.randn_like(p) * 0.2)
        client.update_weights(checkpoint_weights(local.model))
        runs.append((client.generate(prompts, 2, sampling), local.generate(prompts, 2, sampling)))
        plain = RemoteEngines([url]).generate(prompts, 1, GREEDY)  # one worker serves both kinds of run
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


def test_dead_worker_is_retried_elsewhere_then_all_dead_is_a_clear_error(workers, prompts):
    (proc_a, url_a), (proc_b, url_b) = workers
    client = RemoteEngines([url_a, url_b], timeout_s=30)
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
