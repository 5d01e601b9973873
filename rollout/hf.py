"""Rollout with Hugging Face `generate`: the engine that always works (any device, any model).

Group sampling: the prompt batch is prefilled once and its KV cache expanded `n` times
(`DynamicCache.batch_repeat_interleave`), so a GRPO group of `n` completions costs one prompt
encoding, not `n`.

Logprobs: `Sample.logprobs[t]` is log softmax(logits / T) of the sampled token, from the model's
*unprocessed* logits, i.e. the full-vocabulary policy at temperature T before top-p/top-k
truncation. That is exactly what the GRPO trainer recomputes for π_old, so the two agree up to
numerics. At temperature 0 (greedy) T is taken as 1. They are gathered step by step
(`LogprobRecorder`) rather than from `output_logits`, which would keep rows × steps × vocab floats.

Sharded policy (FSDP2, several ranks): every forward all-gathers the parameters, so all ranks run
in lock-step: `generate(synced_gpus=True)` keeps a rank that finished decoding in the loop until
every rank has (transformers all-reduces a "still running" flag each token), the ranks agree on
the number of generate calls (all-reduce max; a rank with fewer prompts or chunks runs stand-in
calls whose output is discarded), and a chunk with nothing to prefill runs a stand-in forward.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch

from align.errors import AlignError
from align.weights import live_weights
from rollout.base import Sample, SamplingParams
from rollout.sync_check import token_logprobs


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


# `generate` fills every field left None from the model's generation_config.json (Qwen ships
# top_k=20, top_p=0.8, repetition_penalty=1.05) and then from global defaults (top_k=50): pin every
# logits-changing field to "off", so only SamplingParams shapes the distribution.
NEUTRAL_PROCESSING = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0,
                          epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0,
                          no_repeat_ngram_size=0, bad_words_ids=None, suppress_tokens=[],
                          begin_suppress_tokens=[], forced_bos_token_id=None, forced_eos_token_id=None)


class LogprobRecorder:
    """Gathers each sampled token's logprob during `generate` in O(rows) memory per step.

    `generate` runs our logits processor (`see`) first, since temperature/top-k/top-p are passed
    as our own warpers after it, so it sees the raw logits; the stopping criterion (`take`) runs
    once the sampled token is appended and gathers its logprob. It never stops generation."""

    def __init__(self, temperature: float):
        from transformers import LogitsProcessor, StoppingCriteria

        recorder = self

        class See(LogitsProcessor):
            def __call__(self, input_ids, scores):
                recorder.logits = scores.clone()
                return scores

        class Take(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                recorder.columns.append(
                    sampled_logprobs(recorder.logits[:, None], input_ids[:, -1:], temperature)[:, 0])
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        self.logits: torch.Tensor | None = None
        self.columns: list[torch.Tensor] = []
        self.processor, self.criterion = See(), Take()

    def logprobs(self) -> list[list[float]]:
        return torch.stack(self.columns, 1).tolist()


def sampling_warpers(sampling: SamplingParams) -> list:
    """HF's temperature/top-k/top-p warpers, applied after the LogprobRecorder has seen the logits."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if sampling.temperature <= 0:
        return []
    warpers = [TemperatureLogitsWarper(sampling.temperature)]
    if sampling.top_k > 0:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    return warpers


def lockstep_ranks(model) -> bool:
    """True when `model` is sharded (FSDP2) over several ranks: each of its forwards all-gathers
    the parameters, so every rank must run as many forwards as the others, in lock-step."""
    import torch.distributed as dist

    from align.sharding import is_sharded

    return dist.is_initialized() and dist.get_world_size() > 1 and is_sharded(model)


def most_over_ranks(count: int, device) -> int:
    """The largest `count` over all ranks (a collective)."""
    import torch.distributed as dist

    value = torch.tensor([count], dtype=torch.long, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


class HFEngine:
    """`RolloutEngine` over a transformers causal LM, in memory or loaded from a directory.

    Wrap the trainer's own policy (`HFEngine(policy, tokenizer)`) and no weight sync is needed:
    `update_weights` skips tensors that already are the model's storage and only bumps the version.
    """

    def __init__(self, model, tokenizer, batch_size: int | None = None, record_routes: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size  # prompts per generate call (whole groups); None = all
        # MoE routing replay: fill Sample.routes [completion_len, MoE layers, top_k]
        self.record_routes = record_routes
        if record_routes:
            from align.moe.gates import require_gates

            require_gates(model)
        self.weight_version = 0
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = set(eos) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        if not self.eos_ids:
            raise AlignError("model has no eos_token_id (generation_config.json or tokenizer); set one")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.lockstep = lockstep_ranks(model)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: str = "float32", device: str = "cpu",
                        batch_size: int | None = None, record_routes: bool = False) -> HFEngine:
        from align.models.load import load_causal_lm, load_tokenizer

        if not Path(model_dir, "config.json").is_file():
            raise AlignError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
        model = load_causal_lm(model_dir, dtype=dtype)  # safetensors only, no remote code
        return cls(model.to(device).eval(), load_tokenizer(model_dir), batch_size, record_routes)

    def sleep(self) -> None:
        """No-op: HF generate holds no state between calls."""

    def wake(self) -> None:
        """No-op: see sleep()."""

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Accepts the model's own names or checkpoint names (MoE experts unfused, as pushed to vLLM)."""
        self.load_weights(named_tensors)
        self.weight_version += 1

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy some or all weights in, version unchanged: a server worker loads one layer group at
        a time (a MoE layer's unfused experts all in one call) and the trainer sets the version."""
        state = self.model.state_dict()
        for name, tensor in live_weights(self.model, named_tensors).items():
            if name not in state:
                raise AlignError(f"update_weights: {name!r} is not a weight of "
                                 f"{type(self.model).__name__}; send HF parameter names (merge LoRA first)")
            if state[name].data_ptr() != tensor.data_ptr():
                state[name].copy_(tensor)

    def check_weights(self, specs: Iterable[tuple[str, torch.dtype, list[int]]]) -> None:
        """AlignError unless (name, dtype, shape) specs, as `load_weights` would get them, name
        weights of this model in their shapes. Runs on meta tensors: no memory, no data needed,
        so a server refuses a bad update before any tensor moves."""
        state = self.model.state_dict()
        meta = [(name, torch.empty(shape, dtype=dtype, device="meta")) for name, dtype, shape in specs]
        try:
            live = live_weights(self.model, meta)
        except (RuntimeError, ValueError) as exc:  # e.g. experts of unequal shapes cannot be fused
            raise AlignError(f"update_weights: the tensors sent do not convert to the model's weights: {exc}") from exc
        wrong = [f"{name!r} (sent {list(t.shape)}, model {list(state[name].shape)})" if name in state
                 else f"{name!r} (not a weight of {type(self.model).__name__})"
                 for name, t in live.items()
                 if name not in state or state[name].shape != t.shape]
        if wrong:
            raise AlignError(f"update_weights: {len(wrong)} tensors do not fit the model: {', '.join(wrong[:3])}; "
                             "send HF parameter names and full (unsharded) tensors, LoRA merged")

    @torch.no_grad()
    def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        """log p(token t | tokens < t) for t = 1 .. len-1, as the sync check's reference computes them."""
        ids = torch.tensor([token_ids], device=self.model.device)
        return token_logprobs(self.model(input_ids=ids, use_cache=False).logits[0], ids[0])

    @torch.no_grad()
    def generate(self, prompt_token_ids: list[list[int]], n: int,
                 sampling: SamplingParams) -> list[list[Sample]]:
        step = self.batch_size or max(1, len(prompt_token_ids))
        starts = range(0, len(prompt_token_ids), step)
        # lock-step: as many generate calls as the busiest rank, agreed before the first one; the
        # extra calls run on a stand-in prompt and are discarded
        calls = most_over_ranks(len(starts), self.model.device) if self.lockstep else len(starts)
        groups: list[list[Sample]] = []
        for start in starts:
            chunk = prompt_token_ids[start:start + step]
            groups += self._generate_chunk(chunk, n, sampling, seed=sampling.seed + start * n)
        for _ in range(calls - len(starts)):
            self._generate_chunk([[self.pad_id]], 1, sampling, seed=sampling.seed)
        return groups

    def _route_recorder(self):
        from align.moe.replay import RouteRecorder

        return RouteRecorder(self.model) if self.record_routes else nullcontext()

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
        elif self.lockstep:  # the other ranks prefill: run the same forward, on a stand-in, discarded
            self.model(input_ids=ids, attention_mask=mask, use_cache=False)
        return cache

    def _generate_chunk(self, prompts: list[list[int]], n: int, sampling: SamplingParams,
                        seed: int) -> list[list[Sample]]:
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        ids, mask = self._left_pad(prompts)
        cache = self._prefill_group_cache(ids, mask, n)
        recorder = LogprobRecorder(sampling.temperature)
        config = GenerationConfig(  # sampling warpers are ours (after the recorder), none from here
            do_sample=sampling.temperature > 0, max_new_tokens=sampling.max_new_tokens,
            eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id,
            stop_strings=list(sampling.stop) or None, **NEUTRAL_PROCESSING)
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        routes_rec = self._route_recorder()
        with torch.random.fork_rng(devices=devices), routes_rec:  # seeded without disturbing the trainer's RNG
            torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=ids.repeat_interleave(n, 0), attention_mask=mask.repeat_interleave(n, 0),
                past_key_values=cache, generation_config=config,
                logits_processor=LogitsProcessorList([recorder.processor, *sampling_warpers(sampling)]),
                stopping_criteria=StoppingCriteriaList([recorder.criterion]),
                tokenizer=self.tokenizer if sampling.stop else None, synced_gpus=self.lockstep)
        new = out[:, ids.shape[1]:]
        logps = recorder.logprobs() if sampling.logprobs else None
        # one decode step per new token: the last len(new) routed positions produced them
        routes = routes_rec.routes()[:, -new.shape[1]:] if self.record_routes else None
        samples = []
        for row, tokens in enumerate(new.tolist()):
            kept, reason = cut_completion(tokens, self.eos_ids, sampling.stop, self.tokenizer.decode)
            samples.append(Sample(kept, logps[row][:len(kept)] if logps else None, reason,
                                  weight_version=self.weight_version,
                                  routes=None if routes is None else routes[row, :len(kept)].clone()))
        return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]
