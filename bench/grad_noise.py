"""How much signal is in one GRPO step? The gradient noise scale of a checkpoint's GRPO objective,
against its SFT objective measured the same way in the same run.

    python bench/grad_noise.py CKPT --prompts math_prompts.jsonl --conversations math_sft.jsonl \
        --heldout math_prompts_eval.jsonl [--batches 8 --batch 64 --group-size 8 --steps 0.01,0.03,0.1]

Why: a GRPO step is an estimate of the policy gradient from a few prompts. McCandlish et al. 2018
("An Empirical Model of Large-Batch Training", appendix A) give the batch size at which a step stops
being mostly noise: B_simple = tr(Σ) / |G|², with G the true gradient and Σ the per-example
covariance. Both come from K batches of b examples each: |g_small|² (mean over the batches) and
|g_big|² (their mean, K·b examples). A recipe whose `prompts_per_step` is far below B_simple takes
steps that are mostly noise, and Adam turns noise into full-size moves.

The GRPO gradient is taken at ratio 1 (the first pass over a rollout): per batch, b prompts × G
samples from `rollout.hf.HFEngine` at --temperature, `rewards.accuracy.MathAccuracy` (strict)
scores them, `align.grpo.advantages.group_scaled` gives A, and the loss is
−mean_i A_i · mean_t log π(y_it). The unit is the prompt (its group of G samples). The SFT
gradient is the mean assistant-token log-likelihood, one conversation as the unit. Also printed:
the mean cosine between two batches' gradients, and, with --steps, the held-out greedy accuracy
after moving the weights along the K-batch GRPO gradient (unit direction × each step size; the
parameters' own norm is printed for scale).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.data.io import read_conversations, read_prompts
from align.data.tokenize import TokenizeStats, tokenize_batch
from align.grpo.advantages import group_scaled
from align.grpo.batch import build_batch
from align.grpo.logprobs import completion_logprobs
from rewards.accuracy import MathAccuracy
from rollout.base import SamplingParams
from rollout.hf import HFEngine


def noise_scale(small_sq: float, big_sq: float, b_small: int, b_big: int) -> dict[str, float]:
    """McCandlish et al. (appendix A): unbiased |G|², tr(Σ) and B_simple from two batch sizes."""
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1 / b_small - 1 / b_big)
    return {"true_grad_sq": g2, "trace_cov": trace, "b_simple": trace / g2 if g2 > 0 else float("inf")}


class Probe:
    """A model, its tokenizer and engine, and the flat gradients of both objectives."""

    def __init__(self, ckpt: str, temperature: float, max_new_tokens: int, group_size: int):
        self.tok = AutoTokenizer.from_pretrained(ckpt)
        self.model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        self.engine = HFEngine(self.model, self.tok)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.sampling = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens)
        self.group_size = group_size
        self.accuracy = MathAccuracy()

    def _prompt_ids(self, batch: list[dict]) -> list[list[int]]:
        return [self.tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True,
                                             return_dict=False) for r in batch]

    def _flat_grad(self) -> torch.Tensor:
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in self.params])
        self.model.zero_grad(set_to_none=True)
        return grad

    def grpo_grad(self, batch: list[dict], seed: int) -> tuple[torch.Tensor, float]:
        """Gradient of the GRPO surrogate on `batch` (ascent direction) and the batch's mean reward."""
        ids = self._prompt_ids(batch)
        sampling = SamplingParams(**{**self.sampling.__dict__, "seed": seed})
        samples = [s for group in self.engine.generate(ids, self.group_size, sampling) for s in group]
        texts = self.tok.batch_decode([s.completion_ids for s in samples], skip_special_tokens=True)
        answers = [r["answer"] for r in batch for _ in range(self.group_size)]
        reward = torch.tensor([float("nan") if x is None else x
                               for x in self.accuracy(prompts=texts, completions=texts, answer=answers)])
        adv, _ = group_scaled(reward, group_size=self.group_size)
        b = build_batch([p for p in ids for _ in range(self.group_size)], samples, self.tok.pad_token_id,
                        mask_truncated=False)
        mask = b["completion_mask"].float()
        logp, _ = completion_logprobs(self.model, b["input_ids"], b["attention_mask"],
                                      completion_length=mask.shape[1], temperature=sampling.temperature,
                                      with_entropy=False)
        per_seq = (logp * mask).sum(1) / mask.sum(1).clamp(min=1)
        (per_seq * torch.nan_to_num(adv)).mean().backward()
        return self._flat_grad(), reward.nanmean().item()

    def sft_grad(self, batch: list[dict]) -> torch.Tensor:
        """Gradient of the mean (per conversation) log-likelihood of its assistant tokens, masked as SFT masks them."""
        encoded = tokenize_batch(self.tok, [r["messages"] for r in batch], max_seq_len=4096, overlong="truncate",
                                 assistant_only=True, stats=TokenizeStats())
        for row in encoded:
            ids = torch.tensor([row["input_ids"]])
            target = torch.tensor(row["assistant_mask"][1:], dtype=torch.bool)
            logp = torch.log_softmax(self.model(input_ids=ids).logits[0, :-1], -1)
            (logp.gather(-1, ids[0, 1:, None]).squeeze(-1)[target].mean() / len(encoded)).backward()
        return self._flat_grad()

    def greedy_accuracy(self, prompts: list[dict]) -> float:
        greedy = SamplingParams(temperature=0.0, max_new_tokens=self.sampling.max_new_tokens, logprobs=False)
        samples = [g[0] for g in self.engine.generate(self._prompt_ids(prompts), 1, greedy)]
        texts = self.tok.batch_decode([s.completion_ids for s in samples], skip_special_tokens=True)
        scores = self.accuracy(prompts=texts, completions=texts, answer=[r["answer"] for r in prompts])
        return sum(s or 0.0 for s in scores) / len(scores)

    def shift(self, direction: torch.Tensor) -> None:
        with torch.no_grad():
            vector_to_parameters(parameters_to_vector(self.params) + direction, self.params)


def measure(grads: list[torch.Tensor], unit: int) -> dict[str, float]:
    """Noise scale (in units: prompts or conversations) and mean pairwise cosine of per-batch gradients."""
    stack = torch.stack(grads)
    small_sq = (stack ** 2).sum(1).mean().item()
    big_sq = (stack.mean(0) ** 2).sum().item()
    cos = [torch.nn.functional.cosine_similarity(a, b, 0).item() for a, b in itertools.combinations(grads, 2)]
    return {**noise_scale(small_sq, big_sq, unit, unit * len(grads)), "cosine_between_batches": sum(cos) / len(cos)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--prompts", required=True, help="GRPO prompt rows with an `answer` column")
    ap.add_argument("--conversations", required=True, help="SFT conversation rows of the same task")
    ap.add_argument("--heldout", help="prompt rows for the greedy accuracy along the GRPO gradient")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64, help="prompts (and conversations) per batch")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--steps", default="", help="comma-separated step sizes along the K-batch GRPO gradient")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args()
    torch.manual_seed(0)
    probe = Probe(args.checkpoint, args.temperature, args.max_new_tokens, args.group_size)
    prompts, convs = list(read_prompts(args.prompts, on_error="fail")), list(read_conversations(args.conversations))
    need = args.batches * args.batch
    if len(prompts) < need or len(convs) < need:
        raise SystemExit(f"need {need} prompts and conversations ({args.batches} batches of {args.batch}); "
                         f"got {len(prompts)} and {len(convs)}: lower --batches or --batch")
    chunks = [slice(i * args.batch, (i + 1) * args.batch) for i in range(args.batches)]
    rl, rewards = zip(*(probe.grpo_grad(prompts[c], seed=i) for i, c in enumerate(chunks)))
    sft = [probe.sft_grad(convs[c]) for c in chunks]
    report = {"checkpoint": args.checkpoint, "batches": args.batches, "batch": args.batch,
              "group_size": args.group_size, "sampled_reward": sum(rewards) / len(rewards),
              "grpo": measure(list(rl), args.batch), "sft": measure(sft, args.batch)}
    direction = torch.stack(rl).mean(0)
    if args.heldout and args.steps and direction.norm() == 0:
        print("every group's rewards were equal, so the GRPO gradient is zero: no steps to take along it")
    elif args.heldout and args.steps:
        heldout = list(read_prompts(args.heldout, on_error="fail"))
        direction /= direction.norm()
        report["param_norm"] = parameters_to_vector(probe.params).norm().item()
        report["greedy_along_grpo_gradient"] = {}
        done = 0.0
        for step in [0.0, *map(float, args.steps.split(","))]:
            probe.shift((step - done) * direction)
            done = step
            report["greedy_along_grpo_gradient"][str(step)] = probe.greedy_accuracy(heldout)
        probe.shift(-done * direction)
    for name in ("grpo", "sft"):
        m = report[name]
        print(f"{name:>4}: B_simple {m['b_simple']:10.1f} {'prompts' if name == 'grpo' else 'conversations'}"
              f"  |G|^2 {m['true_grad_sq']:.3e}  tr(cov) {m['trace_cov']:.3e}"
              f"  cosine between batches {m['cosine_between_batches']:.3f}")
    print(f"GRPO noise scale / SFT noise scale: {report['grpo']['b_simple'] / report['sft']['b_simple']:.0f}x"
          f"  (sampled reward {report['sampled_reward']:.3f})")
    for step, acc in report.get("greedy_along_grpo_gradient", {}).items():
        print(f"step {step:>6} along the GRPO gradient (param norm {report['param_norm']:.1f}): held-out greedy {acc:.3f}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
