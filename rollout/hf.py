"""Rollout with Hugging Face `generate`: the engine that always works (any device, any model).

Group sampling: the prompt batch is prefilled once and its KV cache expanded `n` times
(`DynamicCache.batch_repeat_interleave`), so a GRPO group of `n` completions costs one prompt
encoding, not `n`.

Logprobs: `Sample.logprobs[t]` is log softmax(logits / T) of the sampled token, from the model's
*unprocessed* logits (`output_logits`), i.e. the full-vocabulary policy at temperature T before
top-p/top-k truncation. That is exactly what the GRPO trainer recomputes for π_old, so the two
agree up to numerics. At temperature 0 (greedy) T is taken as 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from align.errors import AlignError
from rollout.base import Sample, SamplingParams


def sampled_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T)[token] per position. logits [B, L, V], tokens [B, L] -> [B, L]."""
    scale = temperature if temperature > 0 else 1.0
    logp = torch.log_softmax(logits.float() / scale, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def cut_completion(ids: Sequence[int], eos_ids: set[int], stop: Sequence[str],
                   decode) -> tuple[list[int], str]:
    """Cut generated ids at the first EOS (kept) or the first completed stop string (its tokens
    kept); returns (ids, finish_reason). Pads after a finished row are never part of a sample."""
    ids = list(ids)
    end = next((i + 1 for i, t in enumerate(ids) if t in eos_ids), None)
    if end is not None:
        ids = ids[:end]
    if stop:
        text = decode(ids)
        if any(s in text for s in stop):
            k = next(k for k in range(1, len(ids) + 1) if any(s in decode(ids[:k]) for s in stop))
            return ids[:k], "stop"
    return ids, ("stop" if end is not None else "length")


class HFEngine:
    """`RolloutEngine` over a transformers causal LM, in memory or loaded from a directory.

    Wrap the trainer's own policy (`HFEngine(policy, tokenizer)`) and no weight sync is needed:
    `update_weights` skips tensors that already are the model's storage and only bumps the version.
    """

    def __init__(self, model, tokenizer, batch_size: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size  # prompts per generate call (whole groups); None = all
        self.weight_version = 0
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = set(eos) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        if not self.eos_ids:
            raise AlignError("model has no eos_token_id (generation_config.json or tokenizer); set one")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: str = "float32", device: str = "cpu",
                        batch_size: int | None = None) -> HFEngine:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(model_dir, "config.json").is_file():
            raise AlignError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        return cls(model.to(device).eval(), AutoTokenizer.from_pretrained(model_dir), batch_size)

    supports_sleep = False  # the model is the trainer's (or tiny); nothing to release

    def sleep(self) -> None:
        """No-op: HF generate holds no state between calls."""

    def wake(self) -> None:
        """No-op: see sleep()."""

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        state = self.model.state_dict()
        for name, tensor in named_tensors:
            if name not in state:
                raise AlignError(f"update_weights: {name!r} is not a weight of "
                                 f"{type(self.model).__name__}; send HF parameter names (merge LoRA first)")
            if state[name].data_ptr() != tensor.data_ptr():
                state[name].copy_(tensor)
        self.weight_version += 1

    def generate(self, prompt_token_ids: list[list[int]], n: int,
                 sampling: SamplingParams) -> list[list[Sample]]:
        step = self.batch_size or max(1, len(prompt_token_ids))
        groups: list[list[Sample]] = []
        for start in range(0, len(prompt_token_ids), step):
            chunk = prompt_token_ids[start:start + step]
            groups += self._generate_chunk(chunk, n, sampling, seed=sampling.seed + start * n)
        return groups

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        if any(len(p) == 0 for p in prompts):
            raise AlignError("generate: empty prompt; every prompt needs at least one token")
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        return ids.to(self.model.device), mask.to(self.model.device)

    def _prefill_group_cache(self, ids: torch.Tensor, mask: torch.Tensor, n: int):
        """Encode all prompt tokens but the last once, then repeat the cache for the group."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if ids.shape[1] > 1:
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1],
                       position_ids=position_ids[:, :-1], past_key_values=cache, use_cache=True)
            cache.batch_repeat_interleave(n)
        return cache

    def _generate_chunk(self, prompts: list[list[int]], n: int, sampling: SamplingParams,
                        seed: int) -> list[list[Sample]]:
        from transformers import GenerationConfig

        ids, mask = self._left_pad(prompts)
        cache = self._prefill_group_cache(ids, mask, n)
        greedy = sampling.temperature <= 0
        config = GenerationConfig(
            do_sample=not greedy, max_new_tokens=sampling.max_new_tokens,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p, top_k=None if greedy else (sampling.top_k or None),
            eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id,
            stop_strings=list(sampling.stop) or None, return_dict_in_generate=True,
            output_logits=sampling.logprobs)
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # seeded without disturbing the trainer's RNG
            torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=ids.repeat_interleave(n, 0), attention_mask=mask.repeat_interleave(n, 0),
                past_key_values=cache, generation_config=config,
                tokenizer=self.tokenizer if sampling.stop else None)
        new = out.sequences[:, ids.shape[1]:]
        logps = (sampled_logprobs(torch.stack(out.logits, 1), new, sampling.temperature).tolist()
                 if sampling.logprobs else None)
        samples = []
        for row, tokens in enumerate(new.tolist()):
            kept, reason = cut_completion(tokens, self.eos_ids, sampling.stop, self.tokenizer.decode)
            samples.append(Sample(kept, logps[row][:len(kept)] if logps else None, reason,
                                  weight_version=self.weight_version))
        return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]
