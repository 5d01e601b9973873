"""`align eval`: evaluate checkpoints (or a run directory's stages) on suites and write a report."""

from __future__ import annotations

from pathlib import Path

import typer

from align.errors import AlignError

DEFAULT_SUITES = ("math", "safety", "loss")


def parse_k(text: str) -> tuple[int, ...]:
    """'1,5' -> (1, 5); '' -> () (greedy metrics only)."""
    try:
        ks = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise AlignError(f"--k {text!r}: write comma-separated integers, e.g. --k 1,5") from None
    if any(k < 1 for k in ks):
        raise AlignError(f"--k {text!r}: every k must be >= 1")
    return ks


def parse_prompts(items: list[str]) -> dict[str, Path]:
    """['math=a.jsonl', 'loss=b.jsonl'] -> {suite: path}; each file must exist."""
    out = {}
    for item in items:
        suite, sep, path = item.partition("=")
        if not sep or not suite or not path:
            raise AlignError(f"--prompts {item!r}: write SUITE=FILE, e.g. --prompts math=data/gsm8k.jsonl")
        if not Path(path).exists():
            raise AlignError(f"--prompts {item!r}: {path} does not exist")
        out[suite] = Path(path)
    return out


def eval_command(
    checkpoints: list[Path] = typer.Argument(..., help="Model directories, or one run directory (with manifest.json)."),
    suite: list[str] = typer.Option([], "--suite", help="math | code | reward | safety | loss | path/to/suite.yaml; "
                                    "repeatable. Default: math, safety, loss (+ reward when there is a judge)."),
    out: Path | None = typer.Option(None, "--out", help="Report directory. Default: RUN_DIR/eval for a run directory."),
    engine: str = typer.Option("auto", "--engine", help="auto (vLLM when installed, else HF) | hf | vllm."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed; the same seed gives the same numbers."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Prompts (or conversations) per suite."),
    k: str = typer.Option("1,5", "--k", help="pass@k values for math/code, comma-separated; '' for greedy only."),
    samples: int | None = typer.Option(None, "--samples", min=1, help="Samples per prompt for pass@k (default: max k)."),
    temperature: float = typer.Option(0.8, "--temperature", min=0.0, help="Sampling temperature for pass@k."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Match the GRPO stage's to compare."),
    max_prompt_len: int = typer.Option(512, "--max-prompt-len", min=1, help="Longer prompts keep their last tokens."),
    prompts: list[str] = typer.Option([], "--prompts", help="SUITE=FILE: your data for a suite (repeatable)."),
    baseline: Path | None = typer.Option(None, "--baseline", help="Checkpoint the reward suite's win rate is against "
                                         "(default: the first checkpoint)."),
    judge: Path | None = typer.Option(None, "--judge", help="Reward-model directory for the reward suite "
                                      "(default: the run's reward_model stage)."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="HF engine: prompts per generate call."),
    math_strict: bool = typer.Option(True, "--math-strict/--math-lax", help="math: only an anchored value counts "
                                     "(\"The answer is 7.\", \\boxed{7}); lax = math-verify's default, the last "
                                     "expression anywhere, evaluated (docs/rewards.md)."),
) -> None:
    """Evaluate checkpoints on suites; write results.json, report.md and plots to --out."""
    from rich.console import Console

    from align.evaluate.checkpoints import resolve_checkpoints
    from align.evaluate.context import EvalOptions
    from align.evaluate.report import write_report
    from align.evaluate.runner import evaluate

    if engine not in ("auto", "hf", "vllm"):
        raise AlignError(f"--engine {engine!r}: choose auto, hf or vllm")
    resolved = resolve_checkpoints(checkpoints)
    if out is None:
        if not resolved.from_run:
            raise AlignError("--out DIR is required when evaluating model directories (where to write the report)")
        out = checkpoints[0] / "eval"
    judge = judge or resolved.judge
    suites = suite or [*DEFAULT_SUITES, *(["reward"] if judge else [])]
    base = None
    if baseline is not None:
        base = next((c for c in resolved.checkpoints if c.path.resolve() == baseline.resolve()), None) \
            or resolve_checkpoints([baseline]).checkpoints[0]
    options = EvalOptions(out=out, engine=engine, seed=seed, limit=limit, k=parse_k(k), samples=samples,
                          temperature=temperature, max_new_tokens=max_new_tokens, max_prompt_len=max_prompt_len,
                          batch_size=batch_size, prompts=parse_prompts(prompts), judge=judge, baseline=base,
                          math_strict=math_strict)
    console = Console()
    results, records = evaluate(resolved.checkpoints, suites, options,
                       progress=lambda c, s: console.print(f"[bold]{c.label}[/] · {s.name}", highlight=False))
    written = write_report(results, out, records, console)
    console.print(f"wrote {written['results']}, {written['report']} and {len(written['plots'])} plot(s) "
                  f"under {out / 'plots'}", highlight=False)
