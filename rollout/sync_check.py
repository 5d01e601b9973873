"""Did the weight sync take effect? A cheap check after every sync, on by default.

A sync can fail silently: a worker that skipped the update, a transfer that loaded some tensors
into the wrong place, a reload whose post-processing did not run. Generation then goes on with
the old or broken weights and nothing says so. After every sync we score one fixed probe
sequence (`PROBE_LEN` token ids drawn from the vocabulary with a fixed seed) twice:

- with the weights just pushed, on the trainer's side, by a forward pass over a weightless copy
  of the architecture (`accelerate.init_empty_weights`: parameters on the meta device, so no
  second model is held) with the pushed tensors plugged in (`torch.func.functional_call`);
- by the engine, as prompt log-probabilities (vLLM's `prompt_logprobs`).

The mean absolute gap over the probe's tokens must stay under a tolerance set by the engine's
dtype (`TOLERANCE`): float32 engines reproduce the trainer to ~1e-6 per token (docs/rollout.md),
half-precision ones to bf16/fp16 rounding. A larger gap raises `SyncCheckError` naming the engine
(worker URL) and the gap. Cost: one forward of PROBE_LEN tokens on each side.

What it cannot see: a weight change too small to move the probe past the tolerance (a stale
engine after a tiny optimizer step in bf16); the weight version each worker reports covers the
protocol side of that.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from align.errors import AlignError

PROBE_LEN = 32
PROBE_SEED = 20240507
# mean |Δ log p| per probe token allowed between engine and trainer, by the engine's dtype
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 2e-2}


class SyncCheckError(AlignError):
    """The engine does not serve the weights the trainer just pushed."""


def probe_tokens(vocab_size: int, length: int = PROBE_LEN) -> list[int]:
    generator = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randint(0, vocab_size, (length,), generator=generator).tolist()


def tolerance(dtype: str) -> float:
    """`dtype` as a torch or vLLM name (`torch.bfloat16`, `bfloat16`)."""
    name = str(dtype).removeprefix("torch.")
    if name not in TOLERANCE:
        raise AlignError(f"sync check: no tolerance for engine dtype {dtype!r}; known: {', '.join(TOLERANCE)}")
    return TOLERANCE[name]


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> list[float]:
    """log p(ids[t] | ids[<t]) for t = 1 .. len-1 from one sequence's [len, vocab] logits, in
    float32: the one computation both sides of the sync check (ProbeReference, and align's HF
    worker) score the probe with."""
    return torch.log_softmax(logits[:-1].float(), -1).gather(-1, ids[1:, None])[:, 0].cpu().tolist()


class ProbeReference:
    """The probe's log-probabilities under pushed (name, tensor) pairs, for the architecture in
    `model_dir`, without allocating the model: only the pushed tensors are used."""

    def __init__(self, model_dir: str | Path, trust_remote_code: bool = False):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        with init_empty_weights(include_buffers=False):  # buffers (rotary tables) stay real
            self.skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        self.skeleton.eval()
        self.tokens = probe_tokens(config.vocab_size)

    @torch.no_grad()
    def logprobs(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[float]:
        """log p(token t | tokens < t) for t = 1 .. PROBE_LEN-1."""
        from torch.func import functional_call

        from align.weights import live_weights

        params = live_weights(self.skeleton, named_tensors)
        missing = [n for n, _ in self.skeleton.named_parameters() if n not in params]
        if missing:
            raise AlignError(f"sync check: the pushed weights lack {missing[:3]} ({len(missing)} in all); "
                             "push every weight of the model (merge LoRA first)")
        device = next(iter(params.values())).device
        state = {name: buffer.to(device) for name, buffer in self.skeleton.named_buffers()} | params
        ids = torch.tensor([self.tokens], device=device)
        return token_logprobs(functional_call(self.skeleton, state, (ids,), tie_weights=True).logits[0], ids[0])


def compare(engine: str, got: list[float], want: list[float], dtype: str, version: int | str) -> float:
    """Mean |got - want| over the probe; raises SyncCheckError past the dtype's tolerance."""
    if len(got) != len(want):
        raise SyncCheckError(f"sync check: {engine} scored {len(got)} probe tokens, the trainer {len(want)}")
    gaps = torch.tensor(got, dtype=torch.float64).sub(torch.tensor(want, dtype=torch.float64)).abs()
    mean, worst = float(gaps.mean()), int(gaps.argmax())
    limit, dtype = tolerance(dtype), str(dtype).removeprefix("torch.")
    if not mean <= limit:  # NaN fails too
        raise SyncCheckError(
            f"sync check failed after weight version {version}: {engine} does not serve the weights the "
            f"trainer pushed. Probe log-probabilities differ by {mean:.3g} per token on average (largest "
            f"{float(gaps[worst]):.3g} at token {worst + 1}; tolerance {limit:g} for {dtype}). The update "
            "was skipped or corrupted on that engine: check its log, restart it, and resume the run "
            "from the last checkpoint.")
    return mean
