"""`align model ...` commands."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True)


@app.command("tiny")
def tiny(out: Path = typer.Argument(..., help="Output directory (a Hugging Face model dir)."),
         size: str = typer.Option("tiny", help="nano | tiny | small | medium"),
         arch: str = typer.Option("qwen2", help="qwen2 (dense) | deepseek_v2 (MLA + MoE)"),
         seed: int = typer.Option(0, help="Seeds the tokenizer corpus and the weights.")) -> None:
    """Build a tiny offline tokenizer + model (safetensors) for tests, demos and benchmarks."""
    from rich.console import Console
    from transformers import AutoModelForCausalLM

    from align.models.tiny import build_tiny, count_parameters

    path = build_tiny(out, size=size, arch=arch, seed=seed)
    n = count_parameters(AutoModelForCausalLM.from_pretrained(path))
    Console().print(f"wrote {arch} model ({n / 1e6:.2f}M parameters) and tokenizer to {path}")
