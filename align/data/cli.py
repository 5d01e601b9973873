"""`align data check`, `align data synth` and `align data pairs`."""

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


@app.command("pairs")
def pairs_cmd(
    model: Annotated[Path, typer.Option(help="Policy checkpoint to sample from (e.g. the SFT stage's final/).")],
    prompts: Annotated[Path, typer.Option(help="Prompt file (the format a GRPO stage reads).")],
    reward_model: Annotated[Path, typer.Option(help="Reward-model directory (a reward_model stage's final/).")],
    out: Annotated[Path, typer.Option(help="Preference file to write: .jsonl, .jsonl.gz or .parquet.")],
    n_samples: Annotated[int, typer.Option(help="Samples per prompt; chosen = highest score, rejected = lowest.")] = 2,
    seed: Annotated[int, typer.Option(help="Sampling seed: the same seed writes the same file.")] = 0,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="Longest completion, in tokens.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Prompts per generate call (and reward-model batch).")] = 16,
) -> None:
    """Sample completions from a checkpoint and label them with a reward model, writing a
    preference file (prompt, chosen, rejected) for a dpo or reward_model stage."""
    from align.data.io import write_rows
    from align.data.pairs import PairStats, sample_pairs

    stats = PairStats()
    write_rows(sample_pairs(model, prompts, reward_model, n_samples=n_samples, seed=seed, temperature=temperature,
                            top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size, stats=stats), out)
    typer.echo(f"wrote {stats.pairs:,} pairs to {out} from {stats.prompts:,} prompts ({stats.samples_generated:,} "
               f"samples; skipped {stats.ties} all-tied, {stats.unusable} identical or empty)")
    if not stats.pairs:
        raise typer.Exit(1)
