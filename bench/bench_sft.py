"""SFT benchmarks, each against a peer measured in the same run.

(a) preprocessing: conversations/s of align's streaming tokenise-to-Arrow-cache path
    (`align.data.cache.tokenized_source`: read + validate + render + batch-encode + mask + write)
    against the raw fast tokenizer's batch encode of the same, already rendered texts, and against
    `apply_chat_template(..., return_assistant_tokens_mask=True)` (what TRL calls); peak RSS of the
    cache build, measured in a child process.
(b) training tokens/s on the same data, model, batch, max length and torch threads, each leg in its
    own process: align's trainer (length-bucketed padding, and packing) against TRL's SFTTrainer with
    its defaults (gradient checkpointing on), with gradient checkpointing off (align's default: the
    same work as align padded), and with padding-free packing (`packing=True`, bfd, `padding_free`;
    the same work as align packed). Per-step phases of TRL (data, forward, backward, optimizer).

    python bench/bench_sft.py --rows 300000 --skip train
    python bench/bench_sft.py --skip preprocess --train-rows 1000 --size tiny
    python bench/bench_sft.py --skip preprocess --model DIR --train-rows 400 --max-steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _child_cache_build(data: str, model: str, cache: str) -> None:
    """Run in a fresh process so ru_maxrss is the cache build's own peak."""
    import datasets.arrow_writer  # noqa: F401  (import time is not per-row throughput)

    from align.data.cache import tokenized_source
    from align.models.load import load_tokenizer

    tok = load_tokenizer(model)
    t = time.perf_counter()
    ds, stats = tokenized_source(data, tok, max_seq_len=1024, overlong="truncate", assistant_only=True,
                                 cache_root=cache)
    build = time.perf_counter() - t
    t = time.perf_counter()
    again, _ = tokenized_source(data, tok, max_seq_len=1024, overlong="truncate", assistant_only=True,
                                cache_root=cache)
    reload_s = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB
    print(json.dumps({"rows": len(ds), "build_s": build, "reload_s": reload_s, "peak_rss_gib": rss,
                      "tokens": stats["tokenize"]["tokens"]}))


def bench_preprocessing(n: int, model: Path, work: Path) -> dict:
    from align.data.io import read_conversations, write_jsonl
    from align.data.synth import generate
    from align.data.tokenize import render_with_spans
    from align.models.load import load_tokenizer

    data = work / "chat.jsonl"
    t = time.perf_counter()
    write_jsonl(generate("chat", n, seed=0), data)
    print(f"wrote {n} conversations in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    out = subprocess.run([sys.executable, __file__, "--child", str(data), str(model), str(work / "cache")],
                         capture_output=True, text=True, check=True)
    ours = json.loads(out.stdout.strip().splitlines()[-1])

    tok = load_tokenizer(model)
    sample = [r["messages"] for _, r in zip(range(min(n, 50_000)), read_conversations(data))]
    texts = []
    t = time.perf_counter()
    for i in range(0, len(sample), 1000):
        texts += render_with_spans(tok, sample[i:i + 1000])[0]
    render_s = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(0, len(texts), 1000):
        tok(texts[i:i + 1000], add_special_tokens=False)
    raw_s = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(0, len(sample), 1000):
        tok.apply_chat_template(sample[i:i + 1000], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    hf_s = time.perf_counter() - t
    ours_rate = ours["rows"] / ours["build_s"]
    raw_rate, hf_rate = len(texts) / raw_s, len(sample) / hf_s
    return {"rows": n, "ours_conv_per_s": ours_rate, "raw_encode_conv_per_s": raw_rate,
            "render_only_conv_per_s": len(sample) / render_s, "apply_chat_template_mask_conv_per_s": hf_rate,
            "ratio_vs_raw_encode": ours_rate / raw_rate, "ratio_vs_apply_chat_template": ours_rate / hf_rate,
            "peak_rss_gib": ours["peak_rss_gib"], "cache_reload_s": ours["reload_s"], "tokens": ours["tokens"]}


# TRL's legs: SFTConfig defaults (gradient checkpointing on) except bf16 (SFTConfig turns it on; on a
# CPU transformers refuses it, and align's `bf16: auto` is float32 there too) and no saving/reporting.
TRL_LEGS = {"trl_defaults": {}, "trl_no_checkpointing": {"gradient_checkpointing": False},
            "trl_padding_free_packing": {"packing": True, "padding_free": True, "gradient_checkpointing": False}}
ALIGN_LEGS = {"align_padded": False, "align_packed": True}
PHASES = ("data", "forward", "backward", "optimizer", "other")


def bench_training(args, work: Path) -> dict:
    """Every leg in its own process with the same torch threads, batch, max length and data;
    tokens/s = non-padding tokens / wall time over the steps after the first (a warm-up)."""
    from align.data.io import write_jsonl
    from align.data.synth import generate
    from align.models.tiny import build_tiny

    model = Path(args.model) if args.model else build_tiny(work / f"model-{args.size}", args.size)
    data = work / "train.jsonl"
    write_jsonl(generate("chat", args.train_rows, seed=1), data)
    results = {"rows": args.train_rows, "model": args.model or args.size, "threads": args.threads,
               "batch": args.batch, "max_seq_len": args.max_seq_len, "max_steps": args.max_steps}
    for leg in [*TRL_LEGS, *ALIGN_LEGS]:
        out = work / f"{leg}.json"
        subprocess.run([sys.executable, __file__, "--leg", leg, str(model), str(data), str(work / leg), str(out),
                        *sys.argv[1:]], check=True)
        results[leg] = json.loads(out.read_text())
        print(leg, json.dumps(results[leg]), file=sys.stderr, flush=True)
    for ours, peer in (("align_padded", "trl_no_checkpointing"), ("align_packed", "trl_padding_free_packing"),
                       ("align_padded", "trl_defaults")):
        results[f"{ours}_vs_{peer}"] = results[ours]["tokens_per_s"] / results[peer]["tokens_per_s"]
    results["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    return results


def run_leg(leg: str, model: Path, data: Path, out: Path, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    steps = (_trl_steps(out, model, data, TRL_LEGS[leg], args) if leg in TRL_LEGS
             else _align_steps(out, model, data, ALIGN_LEGS[leg], args))
    timed = steps[1:]  # the first step warms up
    seconds, tokens = sum(s["s"] for s in timed), sum(s["tokens"] for s in timed)
    return {"tokens_per_s": tokens / seconds, "steps": len(timed), "tokens": tokens, "s": seconds,
            "s_per_step": seconds / len(timed), "threads": torch.get_num_threads(),
            **{p: sum(s[p] for s in timed) / len(timed) for p in PHASES if p in timed[0]}}


def _align_steps(out: Path, model: Path, data: Path, packed: bool, args) -> list[dict]:
    """align's SFT trainer driven step by step: one `train_step` (batch building included) per row."""
    from align.recipe.load import load_recipe
    from align.sft import SFTTrainer
    from align.stage import StageContext
    from align.train_utils import NonFiniteGuard, make_accelerator

    root = Path(__file__).resolve().parents[1]
    recipe = load_recipe(root / "recipes" / "tests" / "sft_tiny.yaml", check_files=False, overrides=[
        f"output_dir={out}", f"model.path={model}", "model.tiny=null", "synth=[]", f"stages.0.data={data}",
        "stages.0.eval_split=0", f"stages.0.max_steps={args.max_steps or 'null'}", "stages.0.epochs=1",
        "stages.0.save_steps=null", f"stages.0.per_device_batch_size={args.batch}",
        "stages.0.gradient_accumulation_steps=1", f"stages.0.max_seq_len={args.max_seq_len}",
        f"stages.0.packing={str(packed).lower()}", "stages.0.logging_steps=1", "stages.0.lr=2e-5"])
    stage = recipe.stages[0]
    trainer = SFTTrainer(StageContext(recipe=recipe, stage=stage, stage_dir=out / "sft", init_model=model),
                         make_accelerator(stage), NonFiniteGuard())
    steps = []
    for step in range(trainer.total_steps):
        before, start = trainer.tokens, time.perf_counter()
        trainer.train_step(step, log=True)
        steps.append({"s": time.perf_counter() - start, "tokens": trainer.tokens - before})
    return steps


def _trl_steps(out: Path, model_dir: Path, data: Path, extra: dict, args) -> list[dict]:
    """TRL's SFTTrainer, each step split by timers around its data loader, `compute_loss`,
    `accelerator.backward` and optimizer (bench/phase_timers.py)."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from phase_timers import ExclusiveTimers, trl_step_profile

    ds = load_dataset("json", data_files=str(data), split="train").select_columns(["messages"])
    config = SFTConfig(output_dir=str(out), report_to="none", save_strategy="no", logging_steps=1,
                       num_train_epochs=1, max_steps=args.max_steps or -1, per_device_train_batch_size=args.batch,
                       max_length=args.max_seq_len, learning_rate=2e-5, disable_tqdm=True,
                       bf16=torch.cuda.is_available(), **extra)
    timers, steps, tokens = ExclusiveTimers(), [], []

    def step_tokens() -> int:
        n = sum(tokens)
        tokens.clear()
        return n

    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), args=config,
                         train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(model_dir),
                         callbacks=[trl_step_profile(timers, PHASES, steps, step_tokens)])
    loss_inner = trainer.compute_loss

    def compute_loss(model, inputs, *a, **k):  # non-padding tokens: padding-free batches have no mask
        mask = inputs.get("attention_mask")
        tokens.append(int(mask.sum()) if mask is not None else inputs["input_ids"].numel())
        return loss_inner(model, inputs, *a, **k)

    trainer.compute_loss = compute_loss
    timers.wrap(trainer, "get_batch_samples", "data")
    timers.wrap(trainer, "compute_loss", "forward")
    timers.wrap(trainer.accelerator, "backward", "backward")
    timers.wrap(trainer, "_clip_grad_norm", "optimizer")
    trainer.train()
    return steps


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=300_000, help="conversations for the preprocessing bench")
    p.add_argument("--train-rows", type=int, default=2000, help="conversations for the training bench")
    p.add_argument("--size", default="tiny", help="tiny model size for the training bench (without --model)")
    p.add_argument("--model", help="a Hugging Face model directory for the training bench")
    p.add_argument("--batch", type=int, default=8, help="rows per step (TRL's default 8), every leg")
    p.add_argument("--max-seq-len", type=int, default=1024, help="max length / packed row length (TRL's default)")
    p.add_argument("--max-steps", type=int, default=None, help="steps per leg (default: one epoch)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of every leg")
    p.add_argument("--skip", choices=["preprocess", "train"], default=None)
    return p.parse_args(argv)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        _child_cache_build(*sys.argv[2:5])
        return
    if sys.argv[1:2] == ["--leg"]:
        leg, model, data, out, result = sys.argv[2:7]
        Path(result).write_text(json.dumps(run_leg(leg, Path(model), Path(data), Path(out), parse_args(sys.argv[7:]))))
        return
    args = parse_args(sys.argv[1:])
    from align.models.tiny import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report = {}
        if args.skip != "preprocess":
            report["preprocess"] = bench_preprocessing(args.rows, build_tiny(work / "tok-model", "tiny"), work)
            print(json.dumps(report["preprocess"], indent=1), flush=True)
        if args.skip != "train":
            report["train"] = bench_training(args, work)
            print(json.dumps(report["train"], indent=1), flush=True)


if __name__ == "__main__":
    main()
