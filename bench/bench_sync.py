"""Rollout servers, in one run: a GRPO stage on two stock `vllm serve` processes (weights over
align's gloo transfer engine) against the same stage on two of align's own HTTP workers running
the same vLLM engine with the weights in the request body (the path before vLLM servers), both
on the same model, prompts and seed. Reports each path's median sync time and step time.

    python bench/bench_sync.py --size tiny --steps 5 --baseline /path/to/align-checkout-before

`--baseline` is an align checkout whose `align rollout serve --engine vllm` still is align's own
FastAPI worker (this checkout's starts stock vLLM); without it the first path runs this
checkout's `--engine hf` workers (HF generate, weights over gloo too). The HF workers' sync alone,
against the HTTP body it replaced: bench/bench_hf_sync.py. The servers of one path are stopped
before the other path starts, so the two never share the 2 cores. Prints Markdown for
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from helpers.workers import free_port, kill_group, wait_healthy  # noqa: E402  (the tests' server helpers)


def start_servers(model_dir: Path, engine: str, checkout: Path, count: int = 2) -> list[tuple[subprocess.Popen, str]]:
    """`count` servers of `align rollout serve` from `checkout`, each in its own process group."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    started = []
    for _ in range(count):
        port = free_port()
        cmd = [sys.executable, "-m", "align", "rollout", "serve", "--model", str(model_dir), "--port", str(port),
               "--engine", engine, "--dtype", "float32", "--kv-cache-gb", "0.5"]
        log = open(Path(tempfile.gettempdir()) / f"bench_sync_{engine}_{port}.log", "wb")  # vLLM fills pipes
        proc = subprocess.Popen(cmd, env=env, cwd=checkout, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        started.append((proc, f"http://127.0.0.1:{port}"))
    for proc, url in started:
        wait_healthy(proc, url, timeout_s=900)
    return started


def stop(started: list[tuple[subprocess.Popen, str]]) -> None:
    for proc, _ in started:
        kill_group(proc)


def grpo(model_dir: Path, rollout: dict, args) -> list[dict]:
    from rich.console import Console

    from align.recipe.schema import Recipe
    from align.data.io import write_jsonl
    from align.data.synth import generate
    from align.pipeline import run_pipeline
    from align.tracking import read_metrics

    out = Path(tempfile.mkdtemp(prefix="bench_sync_"))
    write_jsonl(generate("math", args.prompts * args.steps, seed=3, form="prompts"), out / "prompts.jsonl")
    recipe = Recipe.model_validate({
        "name": "bench-sync", "output_dir": str(out / "run"), "model": {"path": str(model_dir)},
        "logging": {"report_to": ["none"], "plots": False},
        "stages": [{"name": "rl", "kind": "grpo", "prompts": str(out / "prompts.jsonl"),
                    "rewards": [{"name": "math_accuracy"}, {"name": "format", "weight": 0.1}],
                    "group_size": args.group, "prompts_per_step": args.prompts, "per_device_batch_size": 64,
                    "max_steps": args.steps, "beta": 0.0, "lr": 1e-5, "save_steps": None, "seed": 0,
                    "sampling": {"temperature": 1.0, "max_new_tokens": args.max_new_tokens},
                    "rollout": {"mode": "server", **rollout}}]})
    run_pipeline(recipe, console=Console(quiet=True))
    return [row for row in read_metrics(out / "run" / "rl") if "time/rollout" in row]


def summary(rows: list[dict]) -> dict[str, float]:
    """Medians over the steps after the first (which pays warm-ups)."""
    steady = rows[1:] or rows
    phases = sorted({k for r in rows for k in r if k.startswith("time/") and k.count("/") == 1})
    return {"sync": statistics.median(r["time/sync"] for r in steady),
            "rollout": statistics.median(r["time/rollout"] for r in steady),
            "step": statistics.median(sum(r[p] for p in phases) for r in steady),
            "gap": max(r.get("rollout/sync_check_gap", float("nan")) for r in rows), "steps": len(rows)}


def main() -> None:
    from safetensors.torch import load_file

    from align.models.tiny import build_tiny

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="tiny", help="align.models.tiny size: nano, tiny, small, medium")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--baseline", type=Path, default=None, help="align checkout with the HTTP vLLM worker")
    args = parser.parse_args()
    model_dir = Path(build_tiny(tempfile.mkdtemp(prefix=f"bench_sync_{args.size}_"), size=args.size, seed=0))
    params = sum(t.numel() for t in load_file(model_dir / "model.safetensors").values())
    http_engine = "vllm" if args.baseline else "hf"
    first = ("align HTTP workers (--engine vllm), weights in the body" if args.baseline else
             "align HF workers (--engine hf), weights over gloo")
    paths = [(first, http_engine,
              args.baseline or ROOT, {"engine": "hf"}),
             ("stock vllm serve, weights over gloo (this change)", "vllm", ROOT, {"engine": "vllm"})]
    results = []
    for label, engine, checkout, rollout in paths:
        started = start_servers(model_dir, engine, checkout)
        try:
            rollout["servers"] = [url for _, url in started]
            results.append((label, summary(grpo(model_dir, rollout, args))))
        finally:
            stop(started)
    print(f"\n{args.size} ({params / 1e6:.1f}M params), 2 servers, {args.prompts} prompts x G {args.group} x "
          f"{args.max_new_tokens} new tokens, {args.steps} steps, medians of steps 2-{args.steps}\n")
    print("| path | sync s | rollout s | step s | sync share | sync check gap (max) |")
    print("|---|---|---|---|---|---|")
    for label, r in results:
        print(f"| {label} | {r['sync']:.3f} | {r['rollout']:.2f} | {r['step']:.2f} | {r['sync'] / r['step']:.1%} "
              f"| {r['gap']:.1e} |")
    print(json.dumps({label: r for label, r in results}))


if __name__ == "__main__":
    main()
