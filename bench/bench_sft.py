"""SFT benchmarks, each against a peer measured in the same run.

(a) preprocessing: conversations/s of align's streaming tokenise-to-Arrow-cache path
    (`align.data.cache.tokenized_source`: read + validate + render + batch-encode + mask + write)
    against the raw fast tokenizer's batch encode of the same, already rendered texts, and against
    `apply_chat_template(..., return_assistant_tokens_mask=True)` (what TRL calls); peak RSS of the
    cache build, measured in a child process.
(b) training tokens/s on the same data and model: align's loop (padded, and packed) against TRL's
    SFTTrainer with its defaults (batch 8, no packing).

    python bench/bench_sft.py --rows 300000 --train-rows 2000 --size tiny
"""

from __future__ import annotations

import argparse
import json
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


def bench_training(rows: int, size: str, work: Path) -> dict:
    from align.data.io import write_jsonl
    from align.data.synth import generate
    from align.models.tiny import build_tiny

    model = build_tiny(work / f"model-{size}", size)
    data = work / "train.jsonl"
    write_jsonl(generate("chat", rows, seed=1), data)
    results = {"rows": rows, "model": size}
    results["trl_sfttrainer_defaults"] = _trl_tokens_per_s(work / "trl", model, data)
    for label, packed in (("align_padded", False), ("align_packed", True)):
        results[label] = _align_tokens_per_s(work / label, model, data, packed)
        print(label, results[label], file=sys.stderr, flush=True)
    for label in ("align_padded", "align_packed"):
        results[f"{label}_vs_trl"] = results[label] / results["trl_sfttrainer_defaults"]
    return results


def _align_tokens_per_s(out: Path, model: Path, data: Path, packed: bool) -> float:
    from align.recipe.load import load_recipe
    from align.sft import run
    from align.stage import StageContext

    root = Path(__file__).resolve().parents[1]
    recipe = load_recipe(root / "recipes" / "tests" / "sft_tiny.yaml", check_files=False, overrides=[
        f"output_dir={out}", f"model.path={model}", "model.tiny=null", "synth=[]", f"stages.0.data={data}",
        "stages.0.eval_split=0", "stages.0.max_steps=null", "stages.0.epochs=1", "stages.0.save_steps=null",
        "stages.0.per_device_batch_size=8", "stages.0.gradient_accumulation_steps=1", "stages.0.max_seq_len=1024",
        f"stages.0.packing={str(packed).lower()}", "stages.0.logging_steps=50"])
    stage = recipe.stages[0]
    summary = run(StageContext(recipe=recipe, stage=stage, stage_dir=out / "sft", init_model=model)).summary
    return summary["tokens"] / summary["time_s"]


def _trl_tokens_per_s(out: Path, model_dir: Path, data: Path) -> float:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    ds = load_dataset("json", data_files=str(data), split="train").select_columns(["messages"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    # Defaults except bf16 (SFTConfig turns it on; on a CPU transformers refuses it, and align's
    # `bf16: auto` is float32 there too) and no saving/reporting.
    args = SFTConfig(output_dir=str(out), report_to="none", save_strategy="no", logging_steps=50,
                     num_train_epochs=1, per_device_train_batch_size=8, disable_tqdm=True,
                     bf16=torch.cuda.is_available())
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
    t = time.perf_counter()
    trainer.train()
    return tokens / (time.perf_counter() - t)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        _child_cache_build(*sys.argv[2:5])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=300_000, help="conversations for the preprocessing bench")
    p.add_argument("--train-rows", type=int, default=2000, help="conversations for the training bench")
    p.add_argument("--size", default="tiny", help="tiny model size for the training bench")
    p.add_argument("--skip", choices=["preprocess", "train"], default=None)
    args = p.parse_args()
    from align.models.tiny import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report = {}
        if args.skip != "preprocess":
            report["preprocess"] = bench_preprocessing(args.rows, build_tiny(work / "tok-model", "tiny"), work)
            print(json.dumps(report["preprocess"], indent=1), flush=True)
        if args.skip != "train":
            report["train"] = bench_training(args.train_rows, args.size, work)
            print(json.dumps(report["train"], indent=1), flush=True)


if __name__ == "__main__":
    main()
