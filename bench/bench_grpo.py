"""GRPO step time: align's trainer (HF and/or colocated vLLM engine) against TRL's GRPOTrainer on the
same model, prompts, G, batch, sampling and completion length, measured in one run.

    python bench/bench_grpo.py --model DIR [--engine hf vllm] [--trl-vllm] [--threads 2]
    python bench/bench_grpo.py --size tiny --steps 3

What is the same on every leg: the model (float32, full fine-tune, no gradient checkpointing: TRL's
default turns it on, which costs an extra forward), the prompts, G, prompts per step, one micro-batch
of all P·G completions, max new tokens, temperature 1 / top_p 1 / top_k 0, beta, lr, TRL's default
`dapo` loss on both, one optimizer step per batch (so no π_old pass on either side), the reward.
Each leg runs in its own process with `torch.set_num_threads(--threads)`; the thread count torch
has after the leg's last step is printed next to its time (an in-process vLLM engine may change it).

Prints per leg: median s/step after one warm-up step, completion tokens per step, and the median
of each phase (rollout, reward, logprobs, forward, backward, optimizer, sync, other = the rest of
the step); then the ratio align / TRL (lower is better). align's step is one `train_step` and its
phases are its own `time/*` metrics; TRL's step is the time between two step ends of its loop
(its data loader and logging included) and its phases come from timers wrapped around its methods
(`_generate`, `_calculate_rewards`, `_get_per_token_logps_and_entropies`, `compute_loss`,
`accelerator.backward`, `_clip_grad_norm`, the optimizer callbacks), exclusive of nested timers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from phase_timers import ExclusiveTimers, trl_step_profile  # bench/ is on sys.path: scripts run as bench/*.py

PHASES = ("rollout", "reward", "logprobs", "advantage", "forward", "backward", "optimizer", "sync", "other")
LEGS = {"hf": "align-hf", "vllm": "align-vllm"}


def make_inputs(root: Path, args) -> tuple[Path, Path]:
    from align.data.io import write_jsonl
    from align.data.synth import generate

    model = Path(args.model) if args.model else _tiny(root, args.size)
    n_prompts = max(64, args.prompts * (args.steps + 2))
    write_jsonl(generate("math", n_prompts, seed=4, form="prompts"), root / "prompts.jsonl")
    return model, root / "prompts.jsonl"


def _tiny(root: Path, size: str) -> Path:
    from align.models.tiny import build_tiny

    return build_tiny(root / "model", size=size)


def diversity(prompts, completions, **kwargs):
    """Distinct characters: varies between samples, so both trainers do real updates."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [len(set(t)) / 10.0 for t in texts]


def bench_align(root: Path, model: Path, prompts: Path, args, engine: str) -> dict:
    import torch

    from align.grpo.trainer import GRPOTrainer
    from align.recipe.load import load_recipe
    from align.stage import StageContext
    from align.train_utils import NonFiniteGuard, make_accelerator

    rollout = {"engine": engine, **({"dtype": "float32"} if engine == "vllm" else {})}
    recipe_path = root / f"align-{engine}.yaml"
    recipe_path.write_text(json.dumps({
        "output_dir": str(root / f"align-{engine}"), "model": {"path": str(model), "dtype": "float32"},
        "logging": {"report_to": ["none"]},
        "stages": [{"name": "rl", "kind": "grpo", "prompts": str(prompts),
                    "rewards": [{"name": f"{Path(__file__).resolve()}:diversity"}],
                    "group_size": args.group, "prompts_per_step": args.prompts,
                    "per_device_batch_size": args.prompts * args.group, "max_steps": args.steps + 1,
                    "lr": 1e-5, "beta": args.beta, "loss_type": "dapo", "gradient_checkpointing": False,
                    "sampling": {"max_new_tokens": args.new_tokens, "temperature": 1.0, "top_p": 1.0, "top_k": 0},
                    "rollout": rollout}]}))
    recipe = load_recipe(recipe_path)
    stage = recipe.stages[0]
    torch.manual_seed(recipe.stage_seed(stage))  # as the stage loop seeds before building
    ctx = StageContext(recipe=recipe, stage=stage, stage_dir=root / f"align-{engine}/rl", init_model=model)
    start = time.perf_counter()
    trainer = GRPOTrainer(ctx, make_accelerator(stage), NonFiniteGuard())
    build_s = time.perf_counter() - start
    steps = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        m = trainer.train_step(step, log=True)
        total = time.perf_counter() - start
        phases = {p: m.get(f"time/{p}", 0.0) for p in PHASES if p != "other"}
        phases["forward"], phases["backward"], phases["optimizer"] = (
            m["time/update/forward"], m["time/update/backward"], m["time/update/optimizer"])
        phases["other"] = total - sum(phases.values())
        tokens = m["completions/length_mean"] * args.prompts * args.group
        steps.append({"s": total, "tokens": tokens, **phases})
    return {"build_s": build_s, "steps": steps[1:]}  # the first step warms up


def bench_trl(root: Path, model: Path, prompts: Path, args, use_vllm: bool) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    timers, steps = ExclusiveTimers(), []
    tokens: list[int] = []  # completion tokens of the current step

    def step_tokens() -> int:
        n = sum(tokens)
        tokens.clear()
        return n

    vllm = ({"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3,
             "vllm_importance_sampling_correction": False} if use_vllm else {})
    config = GRPOConfig(output_dir=str(root / "trl"), per_device_train_batch_size=args.prompts * args.group,
                        num_generations=args.group, max_completion_length=args.new_tokens,
                        gradient_accumulation_steps=1, learning_rate=1e-5, beta=args.beta, loss_type="dapo",
                        temperature=1.0, top_p=1.0, top_k=0, gradient_checkpointing=False,
                        max_steps=args.steps + 1, logging_steps=1, report_to="none", save_strategy="no",
                        use_cpu=True, bf16=False, seed=0, dataloader_num_workers=0, **vllm)
    data = load_dataset("json", data_files=str(prompts), split="train")
    start = time.perf_counter()
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
                          reward_funcs=[diversity], args=config, train_dataset=data,
                          processing_class=AutoTokenizer.from_pretrained(model),
                          callbacks=[trl_step_profile(timers, PHASES, steps, step_tokens)])
    build_s = time.perf_counter() - start
    reward_inner = trainer._calculate_rewards

    def count_tokens(inputs, prompts, completions, completion_ids_list):
        tokens.append(sum(len(c) for c in completion_ids_list))
        return reward_inner(inputs, prompts, completions, completion_ids_list)

    trainer._calculate_rewards = count_tokens
    timers.wrap(trainer, "_generate", "rollout")
    timers.wrap(trainer, "_calculate_rewards", "reward")
    timers.wrap(trainer, "_get_per_token_logps_and_entropies",
                lambda: "forward" if torch.is_grad_enabled() else "logprobs")
    timers.wrap(trainer, "compute_loss", "forward")
    timers.wrap(trainer.accelerator, "backward", "backward")
    timers.wrap(trainer, "_clip_grad_norm", "optimizer")
    if use_vllm:
        timers.wrap(trainer.vllm_generation, "sync_weights", "sync")
    trainer.train()
    return {"build_s": build_s, "steps": steps[1:]}


def run_leg(leg: str, args) -> None:
    """One leg, in this (child) process: threads set first, result as JSON to --out."""
    import torch

    torch.set_num_threads(args.threads)
    root = Path(args.work)
    model, prompts = Path(args.model_dir), root / "prompts.jsonl"
    if leg.startswith("align-"):
        result = bench_align(root, model, prompts, args, leg.removeprefix("align-"))
    else:
        result = bench_trl(root, model, prompts, args, use_vllm=leg == "trl-vllm")
    result["threads"] = torch.get_num_threads()  # after the last step: what the trainer really had
    Path(args.out).write_text(json.dumps(result))


def summarise(result: dict) -> dict:
    steps = result["steps"]
    return {"s": statistics.median(s["s"] for s in steps), "tokens": statistics.median(s["tokens"] for s in steps),
            **{p: statistics.median(s[p] for s in steps) for p in PHASES}, "threads": result["threads"],
            "build_s": result["build_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Hugging Face model directory (e.g. SmolLM2-135M-Instruct)")
    parser.add_argument("--size", default="tiny", help="tiny model size, when --model is not given")
    parser.add_argument("--engine", nargs="+", choices=sorted(LEGS), default=["hf"], help="align's rollout engines")
    parser.add_argument("--trl-vllm", action="store_true", help="also TRL with use_vllm, vllm_mode colocate")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of every leg")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--leg", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.leg:
        run_leg(args.leg, args)
        return
    legs = [LEGS[e] for e in args.engine] + ["trl"] + (["trl-vllm"] if args.trl_vllm else [])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, _ = make_inputs(root, args)
        for leg in legs:
            out = root / f"{leg}.json"
            cmd = [sys.executable, __file__, *sys.argv[1:], "--leg", leg, "--work", str(root),
                   "--model-dir", str(model), "--out", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                results[leg] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"}
                print(f"{leg} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            else:
                results[leg] = summarise(json.loads(out.read_text()))
            print(leg, json.dumps(results[leg]), file=sys.stderr, flush=True)
    report(args, model, results)


def report(args, model: Path, results: dict) -> None:
    print(f"model {args.model or args.size}, {args.prompts} prompts × G {args.group}, {args.new_tokens} new tokens, "
          f"beta {args.beta}, full fine-tune, float32, {args.threads} torch threads requested, "
          f"median of {args.steps} steps after a warm-up; load {Path('/proc/loadavg').read_text().split()[:3]}")
    ok = {leg: r for leg, r in results.items() if "error" not in r}
    print("| leg | s/step | completion tokens/step | threads | " + " | ".join(PHASES) + " |")
    print("|---" * (4 + len(PHASES)) + "|")
    for leg, r in ok.items():
        print(f"| {leg} | {r['s']:.2f} | {r['tokens']:.0f} | {r['threads']} | "
              + " | ".join(f"{r[p]:.2f}" for p in PHASES) + " |")
    for leg, r in results.items():
        if "error" in r:
            print(f"{leg}: failed: {r['error']}")
    for leg in (x for x in ok if x.startswith("align-")):
        for peer in (x for x in ok if x.startswith("trl")):
            print(f"ratio {leg} / {peer}: {ok[leg]['s'] / ok[peer]['s']:.2f}× (goal ≤ 0.5)")


if __name__ == "__main__":
    main()
