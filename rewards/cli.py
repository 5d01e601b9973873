"""`align rewards ...`: list the built-ins; try rewards on a JSONL file of samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from align.errors import AlignError

app = typer.Typer(no_args_is_help=True)


@app.command("list")
def list_rewards() -> None:
    """Built-in reward functions, one line each."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from rewards.registry import builtin_docs

    table = Table("name", "what it scores")
    for name, doc in builtin_docs().items():
        table.add_row(name, escape(doc))
    Console().print(table)
    Console().print("Your own: --reward package.module:function or path/to/file.py:function; "
                    "a reward model: --reward path/to/rm-dir", highlight=False)


@app.command("test")
def test_rewards(
    reward: list[str] = typer.Option(..., "--reward", "-r", help="Built-in name, module:function, file.py:function or RM directory; repeat for several."),
    samples: Path = typer.Option(..., "--samples", "-s", help="JSONL rows with `prompt`, `completion` and any extra columns."),
    weight: Optional[list[float]] = typer.Option(None, "--weight", "-w", help="One per --reward, in order (default 1.0 each)."),
    kwargs: Optional[list[str]] = typer.Option(None, "--kwargs", help="JSON object of factory kwargs, one per --reward, in order."),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer directory to compute completion_ids when rows lack them."),
    chat: bool = typer.Option(False, help="Wrap plain-string prompts/completions as chat messages, as a conversational dataset would."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per sample: {\"rewards\": {...}, \"total\": x}."),
) -> None:
    """Score samples with one or more rewards and print each component and the combined reward."""
    from rewards.reward_set import RewardSet

    specs = _specs(reward, weight or [], kwargs or [])
    rows = read_samples(samples)
    batch = columns_of(rows, chat)
    if tokenizer and batch.get("completion_ids") is None:
        batch["completion_ids"] = _token_ids(tokenizer, batch["completions"])
    scored = RewardSet(specs)(**batch)
    _print(scored, [s.key for s in specs], as_json)


def _specs(names: list[str], weights: list[float], kwargs: list[str]) -> list:
    from rewards.config import RewardSpec

    for option, values in (("--weight", weights), ("--kwargs", kwargs)):
        if values and len(values) != len(names):
            raise AlignError(f"{option} given {len(values)} times for {len(names)} --reward; give one per --reward")
    specs = []
    for i, name in enumerate(names):
        try:
            extra = json.loads(kwargs[i]) if kwargs else {}
        except json.JSONDecodeError as exc:
            raise AlignError(f"--kwargs for {name}: not JSON ({exc})") from None
        source = {"model": name} if Path(name, "config.json").is_file() else {"name": name}
        specs.append(RewardSpec(**source, weight=weights[i] if weights else 1.0, kwargs=extra))
    return specs


def read_samples(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; each must be an object with `prompt` and `completion`."""
    if not path.is_file():
        raise AlignError(f"{path}: no such file")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AlignError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not {"prompt", "completion"} <= row.keys():
            raise AlignError(f"{path}:{number}: each line must be an object with `prompt` and `completion`")
        rows.append(row)
    if not rows:
        raise AlignError(f"{path}: no samples")
    return rows


def columns_of(rows: list[dict[str, Any]], chat: bool) -> dict[str, Any]:
    """Rows to GRPOTrainer's call shape: prompts, completions and one list per extra column."""
    keys = [k for k in rows[0] if k not in ("prompt", "completion")]
    batch: dict[str, Any] = {k: [row.get(k) for row in rows] for k in keys}
    batch["prompts"] = [_as_chat(r["prompt"], "user") if chat else r["prompt"] for r in rows]
    batch["completions"] = [_as_chat(r["completion"], "assistant") if chat else r["completion"] for r in rows]
    return batch


def _as_chat(value: Any, role: str) -> Any:
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def _token_ids(path: str, completions: list[Any]) -> list[list[int]]:
    from transformers import AutoTokenizer

    from rewards.contract import text_of

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return [tok(text_of(c), add_special_tokens=False)["input_ids"] for c in completions]


def _print(scored: Any, keys: list[str], as_json: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    if as_json:
        for i, total in enumerate(scored.total):
            print(json.dumps({"rewards": {k: scored.components[k][i] for k in keys}, "total": total}))
        return
    console = Console()
    table = Table("#", *keys, "total")
    for i, total in enumerate(scored.total):
        table.add_row(str(i), *(_fmt(scored.components[k][i]) for k in keys), _fmt(total))
    console.print(table)
    for key, error in scored.errors.items():
        console.print(f"[yellow]{key} failed (fallback used):[/]\n{error}", highlight=False)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"
