"""Dataset files in and out, one row at a time, with validation and a defect policy.

Reading never holds a whole file: JSON Lines are read line by line, a JSON array file (a ``.json``
file whose first character is ``[``) record by record, Parquet in record batches, and a `datasets`
directory (``save_to_disk``) is memory-mapped Arrow read in batches. A path may also be a directory
of ``.jsonl``/``.jsonl.gz``/``.json``/``.json.gz``/``.parquet`` files, read in sorted order.

Each row carries its position so defects point at it: the 1-based line of a JSON Lines file
(``data.jsonl:12``), the 0-based record of a JSON array (``data.json record 12``), the 0-based row
elsewhere (``data.parquet row 12``, as ``ds[12]``). A file cut off mid-record (a last line without
its newline that is not valid JSON, a JSON array or gzip stream that ends early) is reported as
``truncated_record`` at the cut; the rows before it are read.

`read_conversations` reads any conversation format (`align.data.formats`) and applies the
source's `Policy` (`align.data.policy`); `read_prompts` and `read_preferences` take
``on_error="skip" | "fail"``. Kept rows are yielded; every defect is counted per kind in a
`ReadStats` with its location; under ``fail`` the first failing row stops the stream and an
`AlignError` lists the defects (up to `max_defects`).
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from align.data.formats import ConversationFormat, ConversationReader
from align.data.policy import KEPT, REPAIRS, Policy
from align.data.schema import KINDS, VALIDATORS, Defect, Validator
from align.errors import AlignError

Row = dict
Progress = Callable[[int], None]
RowFn = Callable[[object], tuple[Row | None, list[Defect]]]  # raw row → (row to use, defects)
RowReader = Callable[[Path], RowFn]  # one RowFn per file
Raw = tuple[int, "Row | Defect"]  # (position, parsed row or the defect that stopped parsing it)
_JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_BATCH = 1024
_CHUNK = 1 << 20  # characters of a JSON array file read at a time
_NEAR_END = 16  # a decode error this close to the end of what is read may only mean "read more"
_NON_SPACE = re.compile(r"\S")
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


def _open(path: Path, mode: str):
    opener = gzip.open if path.name.endswith(".gz") else open
    return opener(path, mode, encoding="utf-8-sig") if "t" in mode else opener(path, mode)


def _unreadable(exc: Exception) -> Defect:
    """A stream that breaks while reading: gzip cut short, or not gzip / not UTF-8 at all."""
    if isinstance(exc, EOFError):
        return Defect("truncated_record", "the compressed stream ends early: the file was cut off here")
    return Defect("bad_json", f"the rest of the file cannot be read ({exc})")


def _jsonl_rows(path: Path, progress: Progress | None) -> Iterator[Raw]:
    pending, lineno = 0, 0
    with _open(path, "rb") as f:
        try:
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
        except (EOFError, OSError, zlib.error) as exc:
            yield lineno + 1, _unreadable(exc)
    if progress is not None:
        progress(pending)


def _json_error(exc: ValueError, line: bytes, lineno: int) -> Defect:
    detail = f"{exc.msg} at column {exc.pos + 1}" if isinstance(exc, json.JSONDecodeError) else str(exc)
    if not line.endswith(b"\n"):
        return Defect("truncated_record", f"the last line is not complete JSON ({detail}) and the file does "
                                          "not end with a newline: it was cut off mid-record")
    if lineno == 1 and line.strip() in (b"[", b"{"):
        return Defect("bad_json", "the file is one JSON document spread over lines; name it .json if it is "
                                  "a JSON array, or write JSON Lines (one object per line)")
    return Defect("bad_json", f"invalid JSON: {detail}")


class _ArrayStream:
    """The records of a JSON array, decoded from a text stream a chunk at a time, with the line
    each starts on (one record plus one chunk in memory)."""

    def __init__(self, f, progress: Progress | None):
        self.f, self.progress = f, progress
        self.buf, self.pos, self.line, self.eof = "", 0, 1, False
        self.index = 0  # the record being read
        self.decoder = json.JSONDecoder()

    def _fill(self) -> bool:
        """Append a chunk, dropping what is consumed; False at the end of the file."""
        if self.eof:
            return False
        chunk = self.f.read(_CHUNK)
        if self.progress is not None:
            self.progress(len(chunk))
        self.buf, self.pos, self.eof = self.buf[self.pos:] + chunk, 0, not chunk
        return bool(chunk)

    def _advance(self, end: int) -> None:
        self.line += self.buf.count("\n", self.pos, end)
        self.pos = end

    def _peek(self) -> str:
        """The next non-space character (not consumed), or "" at the end of the file."""
        while not (match := _NON_SPACE.search(self.buf, self.pos)):
            self._advance(len(self.buf))
            if not self._fill():
                return ""
        self._advance(match.start())
        return self.buf[self.pos]

    def _value(self) -> tuple[object, json.JSONDecodeError | None]:
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                more = exc.msg.startswith("Unterminated string") or len(self.buf) - exc.pos <= _NEAR_END
                if more and self._fill():
                    continue
                return None, exc
            if end == len(self.buf) and self._fill():  # a number may go on in the next chunk
                continue
            self._advance(end)
            return value, None

    def records(self) -> Iterator[Raw]:
        self._peek()
        self._advance(self.pos + 1)  # the opening '['
        while True:
            char = self._peek()
            if char == "]":
                return
            if char and self.index:
                if char != ",":
                    yield self.index, Defect("bad_json", f"expected ',' or ']' after record {self.index - 1}, got "
                                                         f"{char!r} at line {self.line}; the rest of the file "
                                                         "cannot be read")
                    return
                self._advance(self.pos + 1)
                char = self._peek()
            if not char:
                yield self.index, Defect("truncated_record", f"the file ends at line {self.line} before the "
                                                             "array's closing ']': it was cut off")
                return
            start = self.line
            value, exc = self._value()
            yield self.index, value if exc is None else self._decode_defect(exc, start)
            if exc is not None:
                return
            self.index += 1

    def _decode_defect(self, exc: json.JSONDecodeError, start: int) -> Defect:
        at = self.line + self.buf.count("\n", self.pos, exc.pos)
        cut = self.eof and (exc.msg.startswith("Unterminated string") or len(self.buf) - exc.pos <= _NEAR_END) \
            and not self.buf.rstrip().endswith("]")
        if cut:
            return Defect("truncated_record", f"the record starting at line {start} is cut off: the file "
                                              f"ends inside it ({exc.msg} at line {at})")
        return Defect("bad_json", f"invalid JSON in the record starting at line {start}: {exc.msg} at line "
                                  f"{at}; the rest of the file cannot be read")


def _json_array_rows(path: Path, progress: Progress | None) -> Iterator[Raw]:
    with _open(path, "rt") as f:
        stream = _ArrayStream(f, progress)
        try:
            yield from stream.records()
        except (EOFError, OSError, zlib.error, UnicodeDecodeError) as exc:
            yield stream.index, _unreadable(exc)


def _is_json_array(path: Path) -> bool:
    """A .json file whose first character is '[' holds one JSON array (else it is JSON Lines)."""
    if _suffix(path) not in (".json", ".json.gz"):
        return False
    try:
        with _open(path, "rt") as f:
            while chunk := f.read(4096):
                if stripped := chunk.lstrip():
                    return stripped[0] == "["
    except (EOFError, OSError, zlib.error, UnicodeDecodeError):
        return False  # the JSON Lines reader reports it
    return False


def _parquet_rows(path: Path, progress: Progress | None) -> Iterator[Raw]:
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


def _dataset_rows(path: Path, progress: Progress | None) -> Iterator[Raw]:
    index = 0
    for batch in _load_dataset_dir(path).iter(batch_size=_BATCH):
        columns = list(batch)
        for values in zip(*batch.values()):
            yield index, dict(zip(columns, values))
            index += 1
        if progress is not None:
            progress(len(batch[columns[0]]) if columns else 0)


def open_rows(path: str | Path, progress: Progress | None = None) -> tuple[str, Iterator[Raw]]:
    """(unit, rows) for one file or `datasets` directory: rows are (position, row), or
    (position, Defect) where a row could not be parsed; unit is what a position counts ("line",
    "record" or "row"). `progress(n)` is called now and then with the units read (bytes for JSON,
    rows otherwise; see `size_hint`)."""
    path = Path(path)
    if _is_dataset_dir(path):
        return "row", _dataset_rows(path, progress)
    suffix = _suffix(path)
    if _is_json_array(path):
        return "record", _json_array_rows(path, progress)
    if suffix in _JSONL_SUFFIXES:
        return "line", _jsonl_rows(path, progress)
    if suffix == ".parquet":
        return "row", _parquet_rows(path, progress)
    raise AlignError(f"{path}: unknown data format {suffix!r}; use .jsonl (JSON Lines), .json (a JSON array "
                     "or JSON Lines), .parquet or a `datasets` save_to_disk directory")


def size_hint(path: str | Path) -> int | None:
    """Total units `open_rows` reports to `progress` for this file, or None if unknown."""
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


class Scanned(NamedTuple):
    file: Path
    unit: str  # "line" | "record" | "row"
    position: int
    row: Row | None  # the row to use (normalised, repaired); None when it cannot be used
    defects: list[Defect]

    @property
    def where(self) -> str:
        """Where the row is, as a person looks for it: `file:line`, `file record i`, `file row i`."""
        return f"{self.file}:{self.position}" if self.unit == "line" else f"{self.file} {self.unit} {self.position}"


def validated(validate: Validator) -> RowReader:
    """A `RowReader` for kinds whose rows are used as they are when `validate` finds nothing."""
    def row_fn(row: object) -> tuple[Row | None, list[Defect]]:
        defects = validate(row)
        return (None if defects else row), defects
    return lambda file: row_fn


def scan(path: str | Path, reader: RowReader, progress: Progress | None = None) -> Iterator[Scanned]:
    """Every row of every file under `path`, as `reader` makes it, with its defects."""
    for file in data_files(path):
        unit, rows = open_rows(file, progress)
        row_fn = reader(file)
        for position, raw in rows:
            if isinstance(raw, Defect):
                yield Scanned(file, unit, position, None, [raw])
            else:
                yield Scanned(file, unit, position, *row_fn(raw))


@dataclass
class ReadStats:
    """What a read saw: rows kept (`good`, of which `repaired`), rows dropped (`bad`), and per
    defect kind the rows that had it and the first `max_examples` locations."""

    good: int = 0
    repaired: int = 0
    bad: int = 0
    defect_counts: Counter = field(default_factory=Counter)
    locations: dict[str, list[str]] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 20

    def add(self, item: Scanned, outcome: str) -> None:
        """Count a row whose `Policy.outcome` is `outcome` ("ok" | "repair" | "skip" | "fail")."""
        if outcome in KEPT:
            self.good += 1
        else:
            self.bad += 1
        if outcome == "ok":
            return
        self.repaired += outcome == "repair"
        self.defect_counts.update({d.kind for d in item.defects})
        for defect in item.defects:
            seen = self.locations.setdefault(defect.kind, [])
            if len(seen) < self.max_examples and item.where not in seen[-1:]:
                seen.append(item.where)
            if len(self.examples) < self.max_examples:
                fix = f" (repaired: {REPAIRS[defect.kind]})" if outcome == "repair" else ""
                self.examples.append(f"{item.where}: {defect}{fix}")

    def as_dict(self) -> dict:
        return {"good": self.good, "repaired": self.repaired, "bad": self.bad,
                "defects": dict(self.defect_counts.most_common()),
                "locations": {k: self.locations[k] for k, _ in self.defect_counts.most_common()},
                "examples": list(self.examples)}


def read_with(path: str | Path, reader: RowReader, policy: Policy, what: str, fix_hint: str,
              stats: ReadStats | None = None, max_defects: int = 20) -> Iterator[Row]:
    """Yield the rows `reader` makes of `path` that `policy` keeps (clean or repaired).

    A row whose outcome is "fail" stops the yielding; up to `max_defects` failing rows are then
    collected from the rest of the data and an AlignError lists them.
    """
    stats = stats if stats is not None else ReadStats(max_examples=max_defects)
    failed = 0
    for item in scan(path, reader):
        outcome = policy.outcome([d.kind for d in item.defects])
        stats.add(item, outcome)
        if outcome in KEPT and not failed:
            yield item.row
        failed += outcome == "fail"
        if failed >= max_defects:
            break
    if failed:
        shown = "\n  ".join(stats.examples)
        raise AlignError(f"{path}: {failed} bad {what} row(s) found (reading stopped at the first; "
                         f"up to {max_defects} listed):\n  {shown}\n{fix_hint}; `align data check {path}` "
                         "reports every defect.")


def read_rows(path: str | Path, kind: str, on_error: str = "skip", stats: ReadStats | None = None,
              max_defects: int = 20) -> Iterator[Row]:
    """Yield the valid rows of a `kind` dataset ("conversations" | "prompts" | "preferences");
    on_error "skip" drops bad rows, "fail" raises AlignError (conversations: nothing is repaired;
    use `read_conversations` for a repairing policy)."""
    if on_error not in ON_ERROR:
        raise AlignError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    if kind not in KINDS:
        raise AlignError(f"unknown dataset kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "conversations":
        return read_conversations(path, ConversationFormat(policy=Policy(on_error)), stats, max_defects)
    return read_with(path, validated(VALIDATORS[kind]), Policy(on_error), kind,
                     "Fix these rows, or set on_error: skip to drop them", stats, max_defects)


def read_conversations(path: str | Path, fmt: ConversationFormat | None = None, stats: ReadStats | None = None,
                       max_defects: int = 20) -> Iterator[Row]:
    """SFT conversation rows of `path` as ``messages`` rows (plus their extra columns), in any
    format `fmt` allows (default: detected per file, default role map, policy `repair`)."""
    fmt = fmt or ConversationFormat()
    return read_with(path, ConversationReader(fmt), fmt.policy, "conversation",
                     "Fix these rows, or set `on_defect: skip` (or `repair` where the defect has one) on the "
                     "data source", stats, max_defects)


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
