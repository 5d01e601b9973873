"""Dataset files in and out, one row at a time, with validation and an error policy.

Reading never holds a whole file: JSONL is read line by line, Parquet in record batches, and a
`datasets` directory (``save_to_disk``) is memory-mapped Arrow read in batches. A path may also be a
directory of ``.jsonl``/``.jsonl.gz``/``.json``/``.parquet`` files, read in sorted order.

Each row carries its position so defects point at it: the 1-based line of a JSONL file
(``data.jsonl:12``), the 0-based row index elsewhere (``data.parquet row 12``, as ``ds[12]``).

`read_conversations`, `read_prompts` and `read_preferences` yield valid rows only. With
``on_error="skip"`` bad rows are counted per defect kind in a `ReadStats`; with ``on_error="fail"``
the first bad row stops the stream and an `AlignError` lists the defects (up to `max_defects`).
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from align.data.schema import VALIDATORS, Defect, Validator
from align.errors import AlignError

Row = dict
Progress = Callable[[int], None]
_JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_BATCH = 1024
ON_ERROR = ("skip", "fail")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in (*_JSONL_SUFFIXES, ".parquet") if name.endswith(s)), path.suffix)


def _is_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("state.json", "dataset_dict.json"))


def data_files(path: str | Path) -> list[Path]:
    """The files (or `datasets` directory) behind `path`, in reading order."""
    path = Path(path)
    if not path.exists():
        raise AlignError(f"{path}: no such file or directory")
    if path.is_file() or _is_dataset_dir(path):
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in (*_JSONL_SUFFIXES, ".parquet"))
    if not files:
        raise AlignError(f"{path}: directory holds no .jsonl, .json, .parquet files and is not a "
                         "`datasets` save_to_disk directory")
    return files


def _jsonl_rows(path: Path, progress: Progress | None) -> Iterator[tuple[int, Row | Exception]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    pending = 0
    with opener(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            pending += len(line)
            if progress is not None and pending >= 1 << 20:
                progress(pending)
                pending = 0
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                yield lineno, _json_error(exc, line, lineno)
    if progress is not None:
        progress(pending)


def _json_error(exc: ValueError, line: bytes, lineno: int) -> ValueError:
    if lineno == 1 and line.strip() == b"[":
        return ValueError("the file is one JSON array; write JSON Lines instead (one object per line)")
    if isinstance(exc, json.JSONDecodeError):
        return ValueError(f"invalid JSON: {exc.msg} at column {exc.pos + 1}")
    return ValueError(f"invalid JSON: {exc}")


def _parquet_rows(path: Path, progress: Progress | None) -> Iterator[tuple[int, Row | Exception]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=_BATCH)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise AlignError(f"{path}: not a readable Parquet file ({exc})") from exc
    index = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield index, row
            index += 1
        if progress is not None:
            progress(batch.num_rows)


def _load_dataset_dir(path: Path):
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        splits = list(dataset)
        raise AlignError(f"{path} is a DatasetDict with splits {splits}; pass one split's "
                         f"directory, e.g. {path / splits[0]}")
    return dataset


def _dataset_rows(path: Path, progress: Progress | None) -> Iterator[tuple[int, Row | Exception]]:
    index = 0
    for batch in _load_dataset_dir(path).iter(batch_size=_BATCH):
        columns = list(batch)
        for values in zip(*batch.values()):
            yield index, dict(zip(columns, values))
            index += 1
        if progress is not None:
            progress(len(batch[columns[0]]) if columns else 0)


def iter_rows(path: str | Path, progress: Progress | None = None) -> Iterator[tuple[int, Row | Exception]]:
    """Yield (position, row) for one file or `datasets` directory; a row that is not valid JSON
    comes as a ValueError saying why. `progress(n)` is called now and then with the units read
    (bytes for JSONL, rows otherwise; see `size_hint`)."""
    path = Path(path)
    if _is_dataset_dir(path):
        return _dataset_rows(path, progress)
    suffix = _suffix(path)
    if suffix in _JSONL_SUFFIXES:
        return _jsonl_rows(path, progress)
    if suffix == ".parquet":
        return _parquet_rows(path, progress)
    raise AlignError(f"{path}: unknown data format {suffix!r}; use .jsonl, .json (JSON Lines), "
                     ".parquet or a `datasets` save_to_disk directory")


def size_hint(path: str | Path) -> int | None:
    """Total units `iter_rows` reports to `progress` for this file, or None if unknown."""
    path = Path(path)
    if _is_dataset_dir(path):
        return _load_dataset_dir(path).num_rows
    suffix = _suffix(path)
    if suffix in (".jsonl", ".json"):
        return path.stat().st_size
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return None


def locate(path: str | Path, position: int) -> str:
    """Where a row is, as a person looks for it: `file:line` for JSONL, `file row i` otherwise."""
    path = Path(path)
    if not _is_dataset_dir(path) and _suffix(path) in _JSONL_SUFFIXES:
        return f"{path}:{position}"
    return f"{path} row {position}"


class Scanned(NamedTuple):
    file: Path
    position: int
    row: Row | None  # None when the line was not JSON
    defects: list[Defect]


def scan(path: str | Path, validate: Validator, progress: Progress | None = None) -> Iterator[Scanned]:
    """Every row of every file under `path` with its defects (empty when the row is valid)."""
    for file in data_files(path):
        for position, row in iter_rows(file, progress):
            if isinstance(row, Exception):
                yield Scanned(file, position, None, [Defect("bad_json", str(row))])
            else:
                yield Scanned(file, position, row, validate(row))


@dataclass
class ReadStats:
    """What a read saw: good rows, bad rows per defect kind, and the first defects with locations."""

    good: int = 0
    bad: int = 0
    defect_counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 20

    def add_bad(self, where: str, defects: list[Defect]) -> None:
        self.bad += 1
        self.defect_counts.update({d.kind for d in defects})
        for defect in defects:
            if len(self.examples) < self.max_examples:
                self.examples.append(f"{where}: {defect}")

    def as_dict(self) -> dict:
        return {"good": self.good, "bad": self.bad, "defects": dict(self.defect_counts.most_common()),
                "examples": list(self.examples)}


def read_rows(path: str | Path, kind: str, on_error: str = "skip", stats: ReadStats | None = None,
              max_defects: int = 20) -> Iterator[Row]:
    """Yield the valid rows of a `kind` dataset ("conversations" | "prompts" | "preferences").

    on_error="skip" drops bad rows and counts them in `stats`; on_error="fail" stops at the first
    bad row, collects up to `max_defects` bad rows from the rest of the data, and raises AlignError.
    """
    if on_error not in ON_ERROR:
        raise AlignError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    if kind not in VALIDATORS:
        raise AlignError(f"unknown dataset kind {kind!r}; choose one of {', '.join(VALIDATORS)}")
    stats = stats if stats is not None else ReadStats(max_examples=max_defects)
    failing = False
    for item in scan(path, VALIDATORS[kind]):
        if not item.defects:
            stats.good += 1
            if not failing:
                yield item.row
            continue
        stats.add_bad(locate(item.file, item.position), item.defects)
        failing = on_error == "fail"
        if failing and stats.bad >= max_defects:
            break
    if failing:
        shown = "\n  ".join(stats.examples)
        raise AlignError(f"{path}: {stats.bad} bad {kind} row(s) found (reading stopped at the first; "
                         f"up to {max_defects} listed):\n  {shown}\nFix these rows, or set "
                         f"on_error: skip to drop them; `align data check {path}` reports every defect.")


def read_conversations(path: str | Path, on_error: str = "skip", stats: ReadStats | None = None) -> Iterator[Row]:
    """Valid SFT conversation rows (``messages`` plus extra columns) of `path`."""
    return read_rows(path, "conversations", on_error, stats)


def read_prompts(path: str | Path, on_error: str = "skip", stats: ReadStats | None = None) -> Iterator[Row]:
    """Valid GRPO prompt rows (``prompt`` plus columns such as ``answer``) of `path`."""
    return read_rows(path, "prompts", on_error, stats)


def read_preferences(path: str | Path, on_error: str = "skip", stats: ReadStats | None = None) -> Iterator[Row]:
    """Valid preference rows (``prompt``, ``chosen``, ``rejected``) of `path`."""
    return read_rows(path, "preferences", on_error, stats)


def write_jsonl(rows: Iterable[Row], path: str | Path) -> int:
    """Stream `rows` to a JSON Lines file (gzip if it ends in .gz); returns the row count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.name.endswith(".gz") else open
    count = 0
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False))
            f.write("\n")
            count += 1
    return count


def write_parquet(rows: Iterable[Row], path: str | Path, batch_size: int = 10_000) -> int:
    """Stream `rows` to Parquet in row groups of `batch_size`; the first batch fixes the schema."""
    import itertools

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = iter(rows)
    writer = None
    count = 0
    try:
        while batch := list(itertools.islice(rows, batch_size)):
            table = pa.Table.from_pylist(batch, schema=writer.schema if writer else None)
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
            count += len(batch)
    finally:
        if writer is not None:
            writer.close()
    return count


def write_rows(rows: Iterable[Row], path: str | Path) -> int:
    """Write rows in the format `path`'s suffix names (.jsonl[.gz] or .parquet)."""
    suffix = _suffix(Path(path))
    if suffix == ".parquet":
        return write_parquet(rows, path)
    if suffix in _JSONL_SUFFIXES:
        return write_jsonl(rows, path)
    raise AlignError(f"{path}: cannot write {suffix!r}; use .jsonl, .jsonl.gz or .parquet")
