"""Rollout throughput: our vLLM engine vs our HF engine vs raw `vllm.LLM.generate` (the ceiling),
on the same prompts, group size and token budget; plus the time of one weight sync.

    python bench/bench_rollout.py --size tiny --prompts 64 --group 8 --max-new-tokens 64

One size per process: vLLM binds the process's CPU threads and keeps its engine for the process's life.

Prompts are chat-formatted synthetic questions of mixed length; sampling at T=1 (EOS allowed, so
tokens/s counts the tokens actually generated). Prints one Markdown row per model size.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

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
    return {"params_m": count_parameters(hf.model) / 1e6, "hf": hf_tps, "ours": ours_tps, "raw": raw_tps,
            "sync_s": sum(times) / len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="tiny", help="align.models.tiny size: nano, tiny, small, medium")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--syncs", type=int, default=5)
    args = parser.parse_args()
    print(f"{args.prompts} prompts x G {args.group} x {args.max_new_tokens} new tokens, T=1\n")
    print("| model | params | HF engine tok/s | our vLLM engine tok/s | raw LLM.generate tok/s "
          "| ours / HF | ours / raw | weight sync (mean of %d) |" % args.syncs)
    print("|---|---|---|---|---|---|---|---|")
    r = bench_size(args.size, args)
    print(f"| {args.size} | {r['params_m']:.1f}M | {r['hf']:,.0f} | {r['ours']:,.0f} | {r['raw']:,.0f} "
          f"| {r['ours'] / r['hf']:.2f}x | {r['ours'] / r['raw']:.2f}x | {r['sync_s'] * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
