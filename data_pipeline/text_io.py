"""Reading raw text documents from .jsonl, .jsonl.gz, .parquet and .txt files.

Every record carries where it came from (file and line, or parquet row) so that a bad input
fails with a message a person can act on. A .txt file is one document per file.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import zlib
from typing import Iterator

SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".parquet", ".txt")


class InputError(ValueError):
    """Bad input data; the message names the file and line or row."""


@dataclasses.dataclass(frozen=True)
class Record:
    text: str
    file: str
    line: int          # 1-based line (jsonl), row (parquet, 1-based) or 1 (txt)


def expand_inputs(patterns: list[str]) -> list[str]:
    """Sorted, de-duplicated files matching the globs; raises if a glob matches nothing."""
    files = []
    for pattern in patterns:
        matched = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matched:
            raise InputError(f"--input={pattern}: matches no file")
        for path in matched:
            if not path.endswith(SUFFIXES):
                raise InputError(f"{path}: unsupported input type; expected one of {SUFFIXES}")
        files.extend(matched)
    return sorted(dict.fromkeys(files))


def _check_encodable(text: str, where: str):
    """JSON may spell a lone surrogate ("\\ud800"), which no UTF-8 writer or tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{where}: invalid unicode ({e.reason}: {text[e.start]!r} at "
                         f"character {e.start})") from None


def _jsonl_records(path: str, text_field: str) -> Iterator[Record]:
    opener = gzip.open if path.endswith(".gz") else open
    line_no = 0
    try:
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                where = f"{path}:{line_no}"
                try:
                    # utf-8-sig: a byte-order mark may open the file
                    line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise InputError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{where}: malformed JSON ({e.msg} at column "
                                     f"{e.colno})") from None
                if not isinstance(obj, dict) or text_field not in obj:
                    raise InputError(f"{where}: no {text_field!r} field (use "
                                     f"--text_field to name the field holding the text)")
                text = obj[text_field]
                if not isinstance(text, str):
                    raise InputError(f"{where}: field {text_field!r} is "
                                     f"{type(text).__name__}, not a string")
                _check_encodable(text, where)
                yield Record(text, path, line_no)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise InputError(f"{path}: cannot read as gzip after line {line_no} ({e})") from None


def _parquet_records(path: str, text_field: str) -> Iterator[Record]:
    import pyarrow.parquet as pq  # heavy import, only when parquet is read
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError variants
        raise InputError(f"{path}: not a readable parquet file ({e})") from None
    if text_field not in pf.schema_arrow.names:
        raise InputError(f"{path}: no {text_field!r} column (columns: {pf.schema_arrow.names})")
    row = 0
    batches = pf.iter_batches(columns=[text_field], batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # a corrupt page: pyarrow's ArrowInvalid/OSError variants
            raise InputError(f"{path}: cannot read the rows after row {row} ({e})") from None
        if batch is None:
            return
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                raise InputError(f"{path}: row {row}: {text_field!r} is {text!r}, not a string")
            _check_encodable(text, f"{path}: row {row}")
            yield Record(text, path, row)


def _txt_records(path: str) -> Iterator[Record]:
    try:
        # newline="": line endings as stored (normalize turns CRLF into LF, --no_normalize not)
        with open(path, encoding="utf-8-sig", newline="") as f:
            yield Record(f.read(), path, 1)
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e})") from None


def iter_file(path: str, *, text_field: str = "text") -> Iterator[Record]:
    """Records of one file; an empty file is an error (it is almost always a failed download)."""
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: empty file")
    if path.endswith(".parquet"):
        yield from _parquet_records(path, text_field)
    elif path.endswith(".txt"):
        yield from _txt_records(path)
    else:
        yield from _jsonl_records(path, text_field)


def iter_records(paths: list[str], *, text_field: str = "text") -> Iterator[Record]:
    for path in paths:
        yield from iter_file(path, text_field=text_field)
