"""`align data check`, `align data convert`, `align data synth` and `align data pairs`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True)

PathArg = Annotated[Path, typer.Argument(help="JSON Lines / JSON array / Parquet file, a directory of them, or a "
                                              "`datasets` save_to_disk directory.")]
FormatOpt = Annotated[str, typer.Option("--format", help="Conversation rows: auto | messages | sharegpt | alpaca.")]
RoleOpt = Annotated[list[str], typer.Option("--role", help="Extra role name, NAME=user|assistant|system "
                                                           "(repeatable), as the data source's `roles:`.")]
DefectOpt = Annotated[list[str], typer.Option("--on-defect", help="repair | skip | fail, or KIND=ACTION for one "
                                                                  "defect kind (repeatable), as `on_defect:`.")]
ExamplesOpt = Annotated[int, typer.Option(help="How many defects to list in full, and locations per defect kind.")]


def _conversation_format(form: str, roles: list[str], on_defect: list[str]):
    """The `ConversationFormat` the options describe; a bad value is a usage error naming it."""
    from align.data.formats import conversation_format

    def pairs(values: list[str], option: str) -> dict[str, str]:
        bad = [v for v in values if v.count("=") != 1]
        if bad:
            raise typer.BadParameter(f"{bad[0]!r}: write NAME=VALUE", param_hint=option)
        return dict(v.split("=") for v in values)

    policy: dict[str, str] = {"default": "repair"}
    for value in on_defect:
        policy.update(pairs([value], "--on-defect") if "=" in value else {"default": value})
    try:
        return conversation_format(form, pairs(roles, "--role"), policy)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command("check")
def check_cmd(
    path: PathArg,
    kind: Annotated[str, typer.Option(help="auto | conversations | prompts | preferences.")] = "auto",
    form: FormatOpt = "auto",
    role: RoleOpt = [],
    on_defect: DefectOpt = [],
    tokenizer: Annotated[Optional[Path], typer.Option(help="Tokenizer directory: adds token-length percentiles.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    examples: ExamplesOpt = 10,
) -> None:
    """Validate every row and report counts, defects per kind with their locations (file:line, or
    record / row index), roles, turns, categories and token lengths. Conversations are read as SFT
    reads them (format, role map, defect policy). Exits 1 if any row is dropped or there are no rows."""
    from rich.console import Console

    from align.data.check import check, render

    console = Console()
    report = check(path, kind, tokenizer, max_examples=examples, show_progress=console.is_terminal and not as_json,
                   fmt=_conversation_format(form, role, on_defect))
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        render(report, console)
    if not report.stats.good + report.stats.bad:
        typer.echo(f"{path}: no rows", err=True)
    if report.stats.bad or not report.stats.good:
        raise typer.Exit(1)


@app.command("convert")
def convert_cmd(
    path: PathArg,
    out: Annotated[Path, typer.Option(help="Output file of `messages` rows: .jsonl, .jsonl.gz or .parquet.")],
    form: FormatOpt = "auto",
    role: RoleOpt = [],
    on_defect: DefectOpt = [],
    as_json: Annotated[bool, typer.Option("--json", help="Print the read statistics as JSON.")] = False,
    examples: ExamplesOpt = 10,
) -> None:
    """Rewrite ShareGPT / Alpaca / messages rows as `messages` rows (other columns kept), streaming,
    with the same repairs and defect policy as SFT; prints what was repaired and dropped, and where.
    Exits 1 if no row was written."""
    from rich.console import Console

    from align.data.check import render_stats
    from align.data.io import ReadStats, data_files, read_conversations, write_rows
    from align.errors import AlignError

    fmt = _conversation_format(form, role, on_defect)
    if out.resolve() in {f.resolve() for f in data_files(path)}:
        raise AlignError(f"--out {out} is one of the input files; write to a new file")
    stats = ReadStats(max_examples=examples)
    partial = out.with_name(f".partial-{out.name}")  # same suffix, so the same writer; renamed when complete
    try:
        count = write_rows(read_conversations(path, fmt, stats), partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(out)
    if as_json:
        typer.echo(json.dumps({"written": count, "out": str(out), **stats.as_dict()}, indent=2))
    else:
        render_stats(stats, Console())
        typer.echo(f"wrote {count:,} conversations to {out}")
    if not count:
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
    worked_share: Annotated[float, typer.Option(help="Math conversations: share of answers that show their work; "
                                                     "the rest give only 'The answer is N.'")] = 1.0,
) -> None:
    """Write deterministic synthetic data with known right answers, streaming to disk."""
    from align.data.io import write_rows
    from align.data.synth import generate

    count = write_rows(generate(kind, n, seed, form=form, safety_share=safety_share, max_operand=max_operand,
                                worked_share=worked_share), out)
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
                            top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size, stats=stats,
                            progress=True), out)
    typer.echo(f"wrote {stats.pairs:,} pairs to {out} from {stats.prompts:,} prompts ({stats.samples_generated:,} "
               f"samples; skipped {stats.ties} all-tied, {stats.unusable} identical or empty)")
    if not stats.pairs:
        raise typer.Exit(1)
