"""GRPO step time: align's trainer vs TRL's GRPOTrainer, same model, prompts, G, batch and length,
both generating with HF generate, measured in one run.

    python bench/bench_grpo.py [--size tiny] [--steps 6] [--prompts 4] [--group 8] [--new-tokens 64]

Prints the median seconds per optimizer step of each and the ratio (ours / TRL; lower is better).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def make_inputs(root: Path, size: str, n_prompts: int):
    from align.data.io import write_jsonl
    from align.data.synth import generate
    from align.models.tiny import build_tiny

    model = build_tiny(root / "model", size=size)
    write_jsonl(generate("math", n_prompts, seed=4, form="prompts"), root / "prompts.jsonl")
    return model, root / "prompts.jsonl"


def diversity(prompts, completions, **kwargs):
    """Distinct characters: varies on an untrained model, so both trainers do real updates."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [len(set(t)) / 10.0 for t in texts]


def bench_ours(root: Path, model: Path, prompts: Path, args) -> list[float]:
    import torch

    from align.grpo.trainer import GRPOTrainer
    from align.recipe.load import load_recipe
    from align.stage import StageContext
    from align.train_utils import NonFiniteGuard, make_accelerator

    recipe_path = root / "ours.yaml"
    recipe_path.write_text(json.dumps({
        "output_dir": str(root / "ours"), "model": {"path": str(model)}, "logging": {"report_to": ["none"]},
        "stages": [{"name": "rl", "kind": "grpo", "prompts": str(prompts),
                    "rewards": [{"name": f"{Path(__file__).resolve()}:diversity"}],
                    "group_size": args.group, "prompts_per_step": args.prompts,
                    "per_device_batch_size": args.prompts * args.group, "max_steps": args.steps + 1,
                    "lr": 1e-5, "beta": args.beta, "sampling": {"max_new_tokens": args.new_tokens}}]}))
    recipe = load_recipe(recipe_path)
    stage = recipe.stages[0]
    torch.manual_seed(recipe.stage_seed(stage))  # as the stage loop seeds before building
    ctx = StageContext(recipe=recipe, stage=stage, stage_dir=root / "ours/rl", init_model=model)
    trainer = GRPOTrainer(ctx, make_accelerator(stage), NonFiniteGuard())
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        trainer.train_step(step, log=True)
        times.append(time.perf_counter() - start)
    return times[1:]  # first step warms up


def bench_trl(root: Path, model: Path, prompts: Path, args) -> list[float]:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

    config = GRPOConfig(output_dir=str(root / "trl"), per_device_train_batch_size=args.prompts * args.group,
                        num_generations=args.group, max_completion_length=args.new_tokens,
                        gradient_accumulation_steps=1, learning_rate=1e-5, beta=args.beta,
                        max_steps=args.steps + 1, logging_steps=1, report_to="none", save_strategy="no",
                        use_cpu=True, bf16=False, seed=0, dataloader_num_workers=0)
    data = load_dataset("json", data_files=str(prompts), split="train")
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model), reward_funcs=[diversity],
                          args=config, train_dataset=data,
                          processing_class=AutoTokenizer.from_pretrained(model), callbacks=[StepTimer()])
    trainer.train()
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, prompts = make_inputs(root, args.size, max(64, args.prompts * (args.steps + 2)))
        ours = statistics.median(bench_ours(root, model, prompts, args))
        trl = statistics.median(bench_trl(root, model, prompts, args))
    print(f"model {args.size}, {args.prompts} prompts × G {args.group}, {args.new_tokens} new tokens, "
          f"beta {args.beta}, median of {args.steps} steps")
    print(f"align  {ours:.3f} s/step")
    print(f"TRL    {trl:.3f} s/step")
    print(f"ratio  {ours / trl:.2f}× (align / TRL; goal ≤ 0.5)")


if __name__ == "__main__":
    main()
