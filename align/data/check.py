"""`align data check`: what a dataset holds and what is wrong with it, in one streaming pass.

Conversations are read as SFT reads them (`align.data.formats`: any format, the same role map and
defect policy), so the counts say what training will get: rows kept clean, kept repaired, dropped,
and per defect kind how many rows and where. The check never stops early: under `fail` the failing
rows are counted as bad like skipped ones.

Everything is accumulated in bounded memory, whatever the row count: counters of roles, categories
and turns, and a histogram of token lengths (lengths take few distinct values, so exact percentiles
come from the histogram instead of a list with one entry per row).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from align.data.formats import ConversationFormat, ConversationReader
from align.data.io import ReadStats, data_files, open_rows, scan, size_hint, validated
from align.data.policy import KEPT, Policy
from align.data.schema import KINDS, VALIDATORS, detect_kind
from align.errors import AlignError

QUANTILES = (50, 90, 99)
_MAX_CATEGORIES = 50  # more distinct values than this is an id column, not a category
_TOKEN_BATCH = 256


def percentiles(hist: Counter, quantiles: Iterable[int] = QUANTILES) -> dict[str, float]:
    """Nearest-rank percentiles, max and mean of the values a histogram {value: count} holds."""
    total = sum(hist.values())
    if total == 0:
        return {}
    values = sorted(hist)
    out: dict[str, float] = {}
    for q in quantiles:
        rank, seen = math.ceil(q / 100 * total), 0
        out[f"p{q}"] = next(v for v in values if (seen := seen + hist[v]) >= rank)
    out["max"] = values[-1]
    out["mean"] = round(sum(v * c for v, c in hist.items()) / total, 2)
    return out


def _main_messages(kind: str, row: dict) -> list | str:
    return row["messages"] if kind == "conversations" else row["prompt"]


def _sequences(kind: str, row: dict) -> list[list | str]:
    """What the model will see for a row: one conversation, or prompt+chosen and prompt+rejected."""
    if kind != "preferences":
        return [_main_messages(kind, row)]
    prompt = row["prompt"]
    out: list[list | str] = []
    for response in (row["chosen"], row["rejected"]):
        if isinstance(prompt, list) and isinstance(response, list):
            out.append(prompt + response)
        else:  # string prompt or string response: the plain-text form TRL also accepts
            out.append(_as_text(prompt) + _as_text(response))
    return out


def _as_text(value: list | str) -> str:
    if isinstance(value, str):
        return value
    return "".join(f"{m['role']}: {m['content']}\n" for m in value)


class TokenCounter:
    """Token lengths via the tokenizer's chat template (plain text if it has none), in batches."""

    def __init__(self, tokenizer_dir: str | Path, generation_prompt: bool):
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise AlignError(f"--tokenizer {tokenizer_dir}: cannot load a tokenizer ({exc})") from exc
        self.templated = self.tokenizer.chat_template is not None
        self.generation_prompt = generation_prompt
        self.hist: Counter = Counter()
        self._chats: list[list] = []
        self._texts: list[str] = []

    def add(self, sequence: list | str) -> None:
        if isinstance(sequence, list) and self.templated:
            self._chats.append(sequence)
        else:
            self._texts.append(_as_text(sequence))
        if len(self._chats) + len(self._texts) >= _TOKEN_BATCH:
            self.flush()

    def flush(self) -> None:
        if self._chats:
            ids = self.tokenizer.apply_chat_template(
                self._chats, tokenize=True, return_dict=True,
                add_generation_prompt=self.generation_prompt)["input_ids"]
            self.hist.update(map(len, ids))
        if self._texts:
            self.hist.update(map(len, self.tokenizer(self._texts)["input_ids"]))
        self._chats, self._texts = [], []


@dataclass
class CheckReport:
    """Counts from one pass over a dataset; `bad` rows are what make the check fail."""

    path: str
    kind: str
    stats: ReadStats
    roles: Counter = field(default_factory=Counter)
    turns: Counter = field(default_factory=Counter)
    categories: Counter = field(default_factory=Counter)
    tokens: Counter | None = None
    formats: dict[str, str | None] = field(default_factory=dict)  # conversations: file -> format read

    def observe(self, row: dict) -> None:
        main = _main_messages(self.kind, row)
        messages = main if isinstance(main, list) else [{"role": "user"}]
        self.turns[sum(m["role"] != "system" for m in messages)] += 1
        for key in ("messages", "prompt", "chosen", "rejected"):
            if isinstance(row.get(key), list):
                self.roles.update(m["role"] for m in row[key])
        if "category" in row:
            label = str(row["category"])
            known = label in self.categories or len(self.categories) < _MAX_CATEGORIES
            self.categories[label if known else "(other)"] += 1

    def as_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "formats": self.formats, "rows": self.stats.as_dict(),
                "roles": dict(self.roles.most_common()), "turns": percentiles(self.turns),
                "categories": dict(self.categories.most_common()),
                "tokens": percentiles(self.tokens) if self.tokens is not None else None}


def resolve_kind(path: str | Path, kind: str) -> str:
    """`kind`, or for "auto" the kind the first rows' columns show (conversations if none do)."""
    if kind != "auto":
        if kind not in KINDS:
            raise AlignError(f"unknown --kind {kind!r}; choose auto or one of {', '.join(KINDS)}")
        return kind
    _, rows = open_rows(data_files(path)[0])
    for _, row in itertools.islice(rows, 100):
        if found := detect_kind(row):
            return found
    return "conversations"


def check(path: str | Path, kind: str = "auto", tokenizer: str | Path | None = None,
          max_examples: int = 10, show_progress: bool = False, fmt: ConversationFormat | None = None) -> CheckReport:
    """Validate every row of `path` and gather its statistics in one streaming pass; conversations
    are read with `fmt` (default: format detected per file, default role map, policy `repair`)."""
    kind = resolve_kind(path, kind)
    if kind == "conversations":
        fmt = fmt or ConversationFormat()
        reader, policy = ConversationReader(fmt), fmt.policy
    elif fmt is not None and fmt != ConversationFormat():
        raise AlignError(f"--format, --role and --on-defect apply to conversation data; {path} holds {kind}")
    else:
        reader, policy = validated(VALIDATORS[kind]), Policy("skip")
    report = CheckReport(str(path), kind, ReadStats(max_examples=max_examples))
    counter = TokenCounter(tokenizer, generation_prompt=kind == "prompts") if tokenizer else None
    with _progress_bar(path, show_progress) as advance:
        for item in scan(path, reader, advance):
            outcome = policy.outcome([d.kind for d in item.defects])
            report.stats.add(item, outcome)
            if outcome not in KEPT:
                continue
            report.observe(item.row)
            if counter is not None:
                for sequence in _sequences(kind, item.row):
                    counter.add(sequence)
    if isinstance(reader, ConversationReader):
        report.formats = reader.formats
    if counter is not None:
        counter.flush()
        report.tokens = counter.hist
    return report


@contextmanager
def _progress_bar(path: str | Path, show: bool) -> Iterator[Callable[[int], None] | None]:
    """A rich progress bar over the bytes/rows read, as the callback `scan` takes; None if hidden."""
    if not show:
        yield None
        return
    from rich.progress import Progress

    hints = [size_hint(f) for f in data_files(path)]
    total = None if None in hints else sum(h for h in hints if h is not None)
    with Progress(transient=True) as bar:
        task = bar.add_task(f"checking {Path(path).name}", total=total)
        yield lambda n: bar.advance(task, n)


def render_stats(stats: ReadStats, console) -> None:
    """Rows kept (clean, repaired) and dropped, then per defect kind its row count and first
    locations, then the first defects in full."""
    from rich.table import Table

    rows = Table()
    rows.add_column("rows")
    rows.add_column("count", justify="right")
    rows.add_row("total", f"{stats.good + stats.bad:,}")
    rows.add_row("good", f"{stats.good:,}")
    rows.add_row("  of which repaired", f"{stats.repaired:,}")
    rows.add_row("[red]bad[/]" if stats.bad else "bad", f"{stats.bad:,}")
    console.print(rows)
    if stats.defect_counts:
        console.print("[bold]Defects[/] (rows with the defect: first locations):")
        for kind, count in stats.defect_counts.most_common():
            where = stats.locations.get(kind, [])
            more = ", ..." if count > len(where) else ""
            console.print(f"  {kind} ({count:,}): {', '.join(where)}{more}", highlight=False, markup=False,
                          soft_wrap=True)
    if stats.examples:
        console.print(f"[bold]First {len(stats.examples)} defect(s):[/]")
        for line in stats.examples:
            console.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)


def render(report: CheckReport, console) -> None:
    """Print the report as rich tables: rows and defects, roles, turns, categories, tokens."""
    from rich.table import Table

    formats = sorted({f for f in report.formats.values() if f})
    shown = f", {' + '.join(formats)} format" if formats else ""
    console.print(f"[bold]{report.path}[/] ({report.kind}{shown})", highlight=False)
    render_stats(report.stats, console)
    for title, counts in (("role", report.roles), ("category", report.categories)):
        if counts:
            console.print(_shares_table(title, counts))
    dists = Table(title="per row", title_justify="left")
    for column in ("", *(f"p{q}" for q in QUANTILES), "max", "mean"):
        dists.add_column(column, justify="right")
    for name, hist in (("turns (non-system)", report.turns), ("tokens (per sequence)", report.tokens)):
        if hist:
            stat = percentiles(hist)
            dists.add_row(name, *(f"{stat[k]:,}" for k in (*(f"p{q}" for q in QUANTILES), "max", "mean")))
    if report.turns:
        console.print(dists)


def _shares_table(title: str, counts: Counter):
    from rich.table import Table

    total = sum(counts.values())
    table = Table(title=f"{title} shares", title_justify="left")
    table.add_column(title)
    table.add_column("count", justify="right")
    table.add_column("share", justify="right")
    for label, count in counts.most_common():
        table.add_row(label, f"{count:,}", f"{count / total:.1%}")
    return table
