"""Reading labelled text from the files people have: CSV, TSV (any delimiter), JSON Lines, Parquet.

:func:`read_rows` reads one file into a :class:`DataFile`: its columns and one :class:`Row` per
example (the text, the optional second text of a sentence pair, the label *as written*, and the
line it came from). Labels stay raw strings here; a :class:`~edge_sdk.training._labels.LabelMap`
turns them into class indices (:meth:`LabelMap.examples`), so one map decides what ``1`` or
``"World"`` means for the coordinator and every device alike.

:class:`DataFormat` says how to read a file:

- ``format``: ``"csv"``, ``"tsv"``, ``"jsonl"`` or ``"parquet"``; by default from the suffix
  (``.csv``, ``.tsv``/``.tab``, ``.jsonl``/``.ndjson``, ``.parquet``/``.pq``), and a delimited
  file with any other suffix (``.txt``) has its delimiter sniffed from the header line;
- ``delimiter``: one character for csv/tsv (default ``,`` and tab). Tab-separated files are read
  without quoting (as GLUE ships them: sentences hold bare ``"``); other delimiters honour quotes;
- ``text_column``: one column, or several joined with ``text_separator`` (AG News: title and
  description); ``text_pair_column``: the second text of a pair; ``label_column``.
  Unset columns are found by their usual names: ``label``/``labels``/``Quality``/``Class Index``;
  ``sentence``/``text``/``content``; pairs ``sentence1``+``sentence2``, ``#1 String``+``#2 String``
  (GLUE MRPC), ``question1``+``question2``, ``premise``+``hypothesis``, ``question``+``sentence``.

A UTF-8 byte-order mark is dropped (``utf-8-sig``). Every problem is a
:class:`~edge_sdk.ConfigError` naming the file and, where there is one, the line and the columns found.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_sdk._errors import ConfigError

__all__ = ["FORMATS", "DataFile", "DataFormat", "Record", "Row", "find_column", "read_records", "read_rows"]

FORMATS = ("csv", "tsv", "jsonl", "parquet")
_SUFFIXES = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_SNIFFED = "\t,;|"  # delimiters tried for a delimited file whose suffix says nothing
MAX_TEXT_COLUMNS = 16
_LABELS = ("label", "labels", "Quality", "Class Index", "class")
_TEXTS = ("sentence", "text", "content")
_PAIRS = (
    ("sentence1", "sentence2"),
    ("#1 String", "#2 String"),
    ("question1", "question2"),
    ("premise", "hypothesis"),
    ("question", "sentence"),
)


@dataclass(frozen=True)
class DataFormat:
    """How a data file is read: its format, delimiter, and which columns hold the text and the label."""

    format: str | None = None  # "csv" | "tsv" | "jsonl" | "parquet"; None: from the file's suffix
    delimiter: str | None = None  # csv/tsv only; None: the format's ("," or tab), sniffed for other suffixes
    text_column: tuple[str, ...] = ()  # () : found by name; several: joined with text_separator
    text_pair_column: str | None = None  # the second text of a sentence pair
    label_column: str | None = None  # None: found by name
    text_separator: str = " "
    # Prompt/response records (the "causal-lm" task, :func:`edge_sdk.training._prompts.read_prompts`):
    # None: found by name (prompt/instruction/input/question; response/completion/output/answer)
    prompt_column: str | None = None
    response_column: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.text_column, str):
            object.__setattr__(self, "text_column", (self.text_column,))
        if self.format is not None and self.format not in FORMATS:
            raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.delimiter is not None:
            if len(self.delimiter) != 1 or self.delimiter in "\r\n\"'":
                raise ConfigError(f"delimiter must be one character (not a quote or newline), got {self.delimiter!r}")
            if self.format in ("jsonl", "parquet"):
                raise ConfigError(f"delimiter does not apply to {self.format} files")
        names = [*self.text_column, self.text_pair_column, self.label_column, self.prompt_column, self.response_column]
        if len(self.text_column) > MAX_TEXT_COLUMNS:
            raise ConfigError(f"at most {MAX_TEXT_COLUMNS} text columns, got {len(self.text_column)}")
        for name in names:
            if name is not None and (not isinstance(name, str) or not name.strip()):
                raise ConfigError(f"column names must be non-empty strings, got {name!r}")
        if len(set(self.text_column)) != len(self.text_column):
            raise ConfigError(f"text_column names a column twice: {list(self.text_column)}")

    def format_of(self, path: Path) -> str:
        """The format of ``path``: the explicit one, else its suffix's ("tsv" for other delimited files)."""
        return self.format or _SUFFIXES.get(path.suffix.lower(), "tsv")


@dataclass(frozen=True)
class Row:
    """One example as read: its text(s) and its label as written in the file."""

    text: str
    label: str
    text_pair: str | None = None
    line: int = 0  # the file's line (row number for Parquet) the example ends on


@dataclass(frozen=True)
class DataFile:
    """The labelled rows of one file (or a subset of them), with the columns the file has."""

    path: Path
    columns: tuple[str, ...]
    rows: tuple[Row, ...] = field(repr=False)
    where: str = "line"  # what Row.line counts: "line" (text files) or "row" (Parquet)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def labels(self) -> list[str]:
        """Each row's label as written."""
        return [r.label for r in self.rows]

    def subset(self, indices: Sequence[int]) -> DataFile:
        """The rows at ``indices`` (in that order), from the same file."""
        return DataFile(self.path, self.columns, tuple(self.rows[int(i)] for i in indices), self.where)


def read_rows(path: str | Path, fmt: DataFormat | None = None, *, limit: int | None = None) -> DataFile:
    """The labelled rows of ``path`` read as ``fmt`` says (at most ``limit`` of them)."""
    path = Path(path)
    fmt = fmt or DataFormat()
    records, where = read_records(path, fmt)
    return _collect(path, fmt, records, limit, where)


Record = tuple[int, dict[str, Any]]  # (line, column -> value); the first one yielded is (0, {name: name})


def read_records(path: Path, fmt: DataFormat) -> tuple[Iterator[Record], str]:
    """The raw records of ``path`` (the first one names the columns) and what their number counts
    (``"line"``, or ``"row"`` for Parquet); every reader of a data file starts here."""
    if not path.is_file():
        raise ConfigError(f"data file {path} does not exist")
    kind = fmt.format_of(path)
    if kind == "jsonl":
        return _jsonl_records(path), "line"
    if kind == "parquet":
        return _parquet_records(path, fmt), "row"
    return _delimited_records(path, fmt, kind), "line"


def _collect(path: Path, fmt: DataFormat, records: Iterator[Record], limit: int | None, where: str) -> DataFile:
    try:
        _, header = next(records)
    except StopIteration:
        raise ConfigError(f"{path} is empty: expected a header (or a first record) naming the columns") from None
    columns = tuple(header)
    texts, pair, label = _resolve(path, fmt, columns)
    rows: list[Row] = []
    for line, record in records:
        if limit is not None and len(rows) >= limit:
            break
        place = f"{path}: {where} {line}"
        missing = [c for c in (*texts, pair, label) if c is not None and c not in record]
        if missing:
            raise ConfigError(f"{place}: no value for column(s) {missing} (the row has {sorted(record)})")
        text = fmt.text_separator.join(_text(place, c, record[c]) for c in texts)
        second = _text(place, pair, record[pair]) if pair is not None else None
        rows.append(Row(text, _label(place, label, record[label]), second, line))
    return DataFile(path, columns, tuple(rows), where)


def find_column(columns: Sequence[str], name: str) -> str | None:
    """``name`` among ``columns``: exactly, else the one column equal to it ignoring case and spaces."""
    if name in columns:
        return name
    near = [c for c in columns if c.strip().casefold() == name.strip().casefold()]
    return near[0] if len(near) == 1 else None


def _resolve(path: Path, fmt: DataFormat, columns: tuple[str, ...]) -> tuple[tuple[str, ...], str | None, str]:
    """The text columns, the pair column and the label column of a file with ``columns``."""

    def named(name: str, key: str) -> str:
        found = find_column(columns, name)
        if found is None:
            raise ConfigError(f"{path}: {key} {name!r} is not a column; the file has {list(columns)}")
        return found

    label = named(fmt.label_column, "label_column") if fmt.label_column else _first(columns, _LABELS)
    if label is None:
        raise ConfigError(
            f"{path}: no label column: the file has {list(columns)}; name it with label_column (--label-column)"
        )
    pair = named(fmt.text_pair_column, "text_pair_column") if fmt.text_pair_column else None
    texts = tuple(named(c, "text_column") for c in fmt.text_column)
    if not texts and pair is None:
        for first, second in _PAIRS:
            if find_column(columns, first) and find_column(columns, second):
                texts, pair = (named(first, "text_column"),), named(second, "text_pair_column")
                break
    if not texts:
        single = _first(columns, _TEXTS)
        if single is None:
            raise ConfigError(
                f"{path}: no text column: the file has {list(columns)}; name it with text_column (--text-column)"
            )
        texts = (single,)
    if label in texts or label == pair or (pair is not None and pair in texts):
        raise ConfigError(f"{path}: a column is used twice: text {list(texts)}, pair {pair!r}, label {label!r}")
    return texts, pair, label


def _first(columns: Sequence[str], candidates: Sequence[str]) -> str | None:
    for name in candidates:
        found = find_column(columns, name)
        if found is not None:
            return found
    return None


def _text(place: str, column: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{place}: column {column!r} holds {value!r}, not text")


def _label(place: str, column: str, value: Any) -> str:
    """A label as its canonical text: strings stripped, integers (and integral floats) in decimal."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return str(int(value))
    raise ConfigError(f"{place}: label column {column!r} holds {value!r}: a label is a name or an integer")


def _delimited_records(path: Path, fmt: DataFormat, kind: str) -> Iterator[Record]:
    delimiter = fmt.delimiter
    reader: Any = None
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            if delimiter is None:
                delimiter = _sniff(path, fh.readline(), kind)
                fh.seek(0)  # (the utf-8-sig decoder is reset: the byte-order mark is dropped again)
            if delimiter == "\t":  # GLUE's TSVs hold bare quotes: no quoting
                reader = csv.reader(fh, delimiter=delimiter, quoting=csv.QUOTE_NONE)
            else:
                reader = csv.reader(fh, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL, strict=True)
            header = [h.strip() for h in next(reader, [])]
            if not header:
                return
            repeated = sorted({h for h in header if header.count(h) > 1})
            if repeated:
                raise ConfigError(f"{path}: line 1: the header names {repeated} more than once ({header})")
            yield 0, {h: h for h in header}
            for fields in reader:
                if not fields or fields == [""]:
                    continue
                if len(fields) != len(header):
                    raise ConfigError(
                        f"{path}: line {reader.line_num}: {len(fields)} field(s) separated by {delimiter!r}; the"
                        f" header has {len(header)} ({header})"
                    )
                yield reader.line_num, dict(zip(header, fields, strict=True))
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except csv.Error as exc:
        line = reader.line_num if reader is not None else 1
        raise ConfigError(f"{path}: line {line}: not valid {kind.upper()}: {exc}") from None


def _not_utf8(path: Path) -> ConfigError:
    """The error for a file that is not UTF-8, naming the line of its first bad byte."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return ConfigError(f"{path}: line {line}: not UTF-8 text ({exc.reason}): save the file as UTF-8")
    return ConfigError(f"{path} is not UTF-8 text: save it as UTF-8")


def _sniff(path: Path, header: str, kind: str) -> str:
    """The delimiter of a delimited file: the format's when its suffix names it, else the header's most
    frequent of tab, comma, semicolon and bar."""
    if path.suffix.lower() in _SUFFIXES:
        return "," if kind == "csv" else "\t"
    counts = {d: header.count(d) for d in _SNIFFED}
    best = max(counts, key=lambda d: counts[d])
    if counts[best] == 0:
        raise ConfigError(
            f"{path}: cannot tell the delimiter from the header {header.strip()[:80]!r}: set format or delimiter"
        )
    return best


def _jsonl_records(path: Path) -> Iterator[Record]:
    try:
        with path.open(encoding="utf-8-sig") as fh:
            first = True
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{path}: line {number}: not JSON: {exc.msg}") from None
                if not isinstance(record, dict):
                    raise ConfigError(f"{path}: line {number}: expected a JSON object, got {type(record).__name__}")
                if first:
                    yield 0, {k: k for k in record}
                    first = False
                yield number, record
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _parquet_records(path: Path, fmt: DataFormat) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            f"{path}: reading Parquet needs pyarrow: pip install 'edge-fm[parquet]' (or pyarrow)"
        ) from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid / OSError kinds
        raise ConfigError(f"{path}: not a readable Parquet file: {exc}") from None
    names = list(parquet.schema_arrow.names)
    yield 0, {n: n for n in names}
    number = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            number += 1
            yield number, record
