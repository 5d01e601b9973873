"""`align data check` and `align data synth`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True)


@app.command("check")
def check_cmd(
    path: Annotated[Path, typer.Argument(help="JSONL/Parquet file, directory of them, or a `datasets` save_to_disk directory.")],
    kind: Annotated[str, typer.Option(help="auto | conversations | prompts | preferences.")] = "auto",
    tokenizer: Annotated[Optional[Path], typer.Option(help="Tokenizer directory: adds token-length percentiles.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    examples: Annotated[int, typer.Option(help="How many defects to list with their file:line.")] = 10,
) -> None:
    """Validate every row and report counts, defects (file:line), roles, turns, categories and token
    lengths. Exits 1 if any row is bad or there are no rows."""
    from rich.console import Console

    from align.data.check import check, render

    console = Console()
    report = check(path, kind, tokenizer, max_examples=examples,
                   show_progress=console.is_terminal and not as_json)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        render(report, console)
    if not report.stats.good + report.stats.bad:
        typer.echo(f"{path}: no rows", err=True)
    if report.stats.bad or not report.stats.good:
        raise typer.Exit(1)


@app.command("synth")
def synth_cmd(
    kind: Annotated[str, typer.Option(help="math | chat | preference.")],
    out: Annotated[Path, typer.Option(help="Output file: .jsonl, .jsonl.gz or .parquet.")],
    n: Annotated[int, typer.Option(help="Number of rows.")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed writes the same bytes.")] = 0,
    form: Annotated[Optional[str], typer.Option("--format", help="conversations (SFT) | prompts (GRPO); preference rows are always pairs.")] = None,
    safety_share: Annotated[float, typer.Option(help="Fraction of chat/preference rows in the safety category.")] = 0.2,
    max_operand: Annotated[int, typer.Option(help="Math: largest operand of the easy a ± b problems.")] = 49,
) -> None:
    """Write deterministic synthetic data with known right answers, streaming to disk."""
    from align.data.io import write_rows
    from align.data.synth import generate

    count = write_rows(generate(kind, n, seed, form=form, safety_share=safety_share, max_operand=max_operand), out)
    typer.echo(f"wrote {count:,} {kind} rows to {out}")
