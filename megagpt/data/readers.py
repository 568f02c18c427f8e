"""Input formats of preprocessing: which files, how they are cut into chunks, and how a chunk becomes records.

The main process only cuts (bounded reads, split at record boundaries, line counting); workers turn chunks
into records, so parsing runs in parallel. Every record carries the 1-based line number (row number for
Parquet) where it starts, so bad input is reported exactly where it is.

  jsonl    one JSON object per line; plain, `.gz` or `.zst`. Blank lines are ignored.
  text     plain text (also `.gz`/`.zst`): one document per file, or per block of lines separated by blank
           (whitespace-only) lines; the separating lines are not part of any document.
  parquet  one document per row, text from the `--json-keys` columns (string columns; pyarrow is imported
           only for Parquet input).
"""
from __future__ import annotations

import glob
import io
import json
import os
import re
from dataclasses import dataclass, replace
from typing import Any, BinaryIO, Callable, Iterator, Optional, Sequence, Union

import orjson

INPUT_FORMATS = ("auto", "jsonl", "text", "parquet")
TEXT_SPLITS = ("blank-line", "file")
CHUNK_BYTES = 1 << 20  # input bytes per work item: large enough that per-chunk costs vanish
COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")


@dataclass(frozen=True)
class Chunk:
    """A run of whole records of one input file; `data` is raw bytes (jsonl, text) or Arrow columns (parquet),
    so turning records into Python strings happens in the workers."""

    path_index: int
    first_line: int  # 1-based line (Parquet: row) number where `data` starts
    data: Any
    nbytes: int  # input bytes this chunk accounts for
    kind: str = "jsonl"  # jsonl | text | text-file | parquet
    last: bool = False  # the last chunk of its file (files with no records yield one empty last chunk)

    @property
    def lines(self) -> list[bytes]:
        """The raw lines (newline kept) of a jsonl/text chunk."""
        parts = self.data.split(b"\n")
        lines = [p + b"\n" for p in parts[:-1]]
        if parts[-1]:
            lines.append(parts[-1])
        return lines


def resolve_inputs(patterns: Union[str, Sequence[str]]) -> list[str]:
    """Each pattern is a file or a glob (its matches sorted); FileNotFoundError names a pattern matching nothing."""
    paths = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        if os.path.isfile(pattern):
            paths.append(pattern)
            continue
        matches = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(f"no input file matches {pattern!r}")
        paths.extend(matches)
    return paths


def strip_compression(path: str) -> str:
    """The name without a compression suffix (`a.jsonl.gz` -> `a.jsonl`)."""
    for ext in COMPRESSED_SUFFIXES:
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def format_of(path: str, input_format: str = "auto") -> str:
    """The format of one input: `input_format` unless "auto", then by extension (default jsonl)."""
    if input_format != "auto":
        return input_format
    ext = os.path.splitext(strip_compression(path))[1].lower()
    return {".parquet": "parquet", ".pq": "parquet", ".txt": "text", ".text": "text", ".md": "text"}.get(ext, "jsonl")


def check_inputs(paths: Sequence[str], input_format: str, keys: Sequence[str]) -> None:
    """Problems found from names and metadata alone (before any worker starts): ValueError saying which."""
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"unknown input format {input_format!r}; valid: {', '.join(INPUT_FORMATS)}")
    for path in paths:
        fmt = format_of(path, input_format)
        if fmt == "parquet":
            schema = _parquet_file(path).schema_arrow
            for key in keys:
                if key not in schema.names:
                    raise ValueError(f"{path}: no column {key!r} (columns: {', '.join(schema.names)})")
                kind = str(schema.field(key).type)
                if kind not in ("string", "large_string", "string_view"):
                    raise ValueError(f"{path}: column {key!r} has type {kind}; text must be a string column")
        elif fmt == "text" and len(keys) != 1:
            raise ValueError(f"{path}: plain text has one document per record; give one --json-keys name")
        if path.endswith((".zst", ".zstd")):
            import zstandard  # noqa: F401  (a missing package is reported here, not mid-run)


def _parquet_file(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ValueError(f"{path}: Parquet input needs pyarrow (pip install pyarrow)") from e
    return pq.ParquetFile(path)


def open_input(path: str) -> BinaryIO:
    """A binary stream of the decompressed bytes of `path` (by suffix: .gz, .zst/.zstd, else plain)."""
    if path.endswith(".gz"):
        import gzip

        return gzip.open(path, "rb")
    if path.endswith((".zst", ".zstd")):
        return io.BufferedReader(_ZstdReader(path), buffer_size=1 << 20)
    return open(path, "rb")


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of a .zst file, across concatenated frames. Unlike zstandard's stream_reader, a file
    that ends inside a frame raises EOFError (as gzip does) instead of ending quietly with data lost."""

    def __init__(self, path: str) -> None:
        import zstandard

        self._file = open(path, "rb")
        self._new = zstandard.ZstdDecompressor().decompressobj
        self._frame, self._in_frame = self._new(), False
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._pos == len(self._out):
            raw = self._file.read(1 << 20)
            if not raw:
                if self._in_frame:
                    raise EOFError("compressed file ended before the end of a zstd frame")
                return 0
            pieces = []
            while raw:
                if self._frame.eof:
                    self._frame = self._new()
                pieces.append(self._frame.decompress(raw))
                raw = self._frame.unused_data if self._frame.eof else b""
            self._in_frame = not self._frame.eof
            self._out, self._pos = b"".join(pieces), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")


def _after_last_newline(block: bytes) -> int:
    return block.rfind(b"\n") + 1


def _after_last_blank_line(block: bytes) -> int:
    end = 0
    for match in _BLANK_LINE.finditer(block):
        end = match.end()
    return end


def _cut_blocks(f: BinaryIO, chunk_bytes: int, find_cut: Callable[[bytes], int]) -> Iterator[bytes]:
    """Blocks of about `chunk_bytes` that end where `find_cut` says a record ends (the tail where the file does)."""
    pieces: list[bytes] = []
    while True:
        block = f.read(chunk_bytes)
        if not block:
            if pieces:
                yield b"".join(pieces)
            return
        cut = find_cut(block)
        if cut <= 0:  # a record longer than a block: keep reading (join once, not once per block)
            pieces.append(block)
            continue
        yield b"".join(pieces + [block[:cut]])
        pieces = [block[cut:]] if cut < len(block) else []


def iter_chunks(paths: Sequence[str], chunk_bytes: int = CHUNK_BYTES, input_format: str = "jsonl",
                text_split: str = "blank-line", keys: Sequence[str] = ("text",)) -> Iterator[Chunk]:
    """Lazily cut every input into chunks of whole records, files in order; memory is one chunk at a time.

    A file that cannot be read to its end (truncated or corrupt compression, I/O error) raises ValueError naming it.
    """
    for index, path in enumerate(paths):
        try:
            yield from _file_chunks(index, path, format_of(path, input_format), chunk_bytes, text_split, keys)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: cannot read: {e}") from e
        except Exception as e:
            if type(e).__name__ != "ZstdError":  # corrupt .zst data (zstandard is imported only for .zst input)
                raise
            raise ValueError(f"{path}: cannot read: {e}") from e


def _file_chunks(index: int, path: str, fmt: str, chunk_bytes: int, text_split: str,
                 keys: Sequence[str]) -> Iterator[Chunk]:
    if fmt == "parquet":
        yield from _parquet_chunks(index, path, keys, chunk_bytes)
        return
    with open_input(path) as f:
        if fmt == "text" and text_split == "file":
            data = f.read()
            yield Chunk(index, 1, data, len(data), "text-file", last=True)
            return
        line, previous = 1, None
        cutter = _after_last_newline if fmt == "jsonl" else _after_last_blank_line
        for block in _cut_blocks(f, chunk_bytes, cutter):
            if previous is not None:
                yield previous
            previous = Chunk(index, line, block, len(block), fmt)
            line += block.count(b"\n")
        yield Chunk(index, line, b"", 0, fmt, last=True) if previous is None else replace(previous, last=True)


def _parquet_chunks(index: int, path: str, keys: Sequence[str], chunk_bytes: int) -> Iterator[Chunk]:
    pf = _parquet_file(path)
    meta = pf.metadata
    rows = max(meta.num_rows, 1)
    size = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
    batch_rows = max(1, int(chunk_bytes // max(size / rows, 1)))
    row, previous = 1, None
    for batch in pf.iter_batches(batch_size=batch_rows, columns=list(keys)):
        if previous is not None:
            yield previous
        previous = Chunk(index, row, tuple(batch.column(k) for k in keys), int(batch.nbytes), "parquet")
        row += batch.num_rows
    yield Chunk(index, 1, (), 0, "parquet", last=True) if previous is None else replace(previous, last=True)


def _problem(obj: Any, keys: Sequence[str]) -> str:
    """Why a decoded JSON value cannot give the texts of `keys` (called only when it cannot)."""
    if not isinstance(obj, dict):
        return f"not a JSON object ({type(obj).__name__})"
    for key in keys:
        if key not in obj:
            return f"missing key {key!r}"
        if not isinstance(obj[key], str):
            return f"key {key!r} is not a string ({type(obj[key]).__name__})"
    raise AssertionError("no problem found")


def parse_json_line(raw: bytes, keys: Sequence[str]) -> tuple[list[str], Optional[str]]:
    """The string values of `keys` in one JSON-lines record, or ([], why the line is unusable).

    orjson decodes; a line it rejects is decoded again by the standard library, which accepts a little more
    (NaN, lone-surrogate escapes, ints beyond 64 bits), so the verdict is always the standard library's.
    """
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return [], "invalid UTF-8"
        except ValueError:
            return [], "malformed JSON"
    if type(obj) is dict:
        values = [obj.get(key) for key in keys]
        if all(type(v) is str for v in values):
            return values, None
    return [], _problem(obj, keys)


def records(chunk: Chunk, keys: Sequence[str]) -> tuple[list[int], list[list[str]], list[tuple[int, str]], int]:
    """(line numbers, texts per key, bad (line, reason), non-blank records seen) of one chunk."""
    line_nos: list[int] = []
    texts: list[list[str]] = [[] for _ in keys]
    bad: list[tuple[int, str]] = []
    seen = 0
    if chunk.kind == "parquet":
        for offset, values in enumerate(zip(*(column.to_pylist() for column in chunk.data))):
            seen += 1
            missing = next((k for k, v in zip(keys, values) if v is None), None)
            if missing is not None:
                bad.append((chunk.first_line + offset, f"key {missing!r} is null"))
                continue
            line_nos.append(chunk.first_line + offset)
            for k, v in enumerate(values):
                texts[k].append(v)
        return line_nos, texts, bad, seen
    if chunk.kind == "text-file":
        blocks = [(1, chunk.data)] if chunk.data else []
    elif chunk.kind == "text":
        blocks = _text_blocks(chunk.data, chunk.first_line)
    else:
        blocks = None
    if blocks is not None:
        for line_no, raw in blocks:
            seen += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                bad.append((line_no, "invalid UTF-8"))
                continue
            line_nos.append(line_no)
            for k in range(len(keys)):
                texts[k].append(text)
        return line_nos, texts, bad, seen
    # The common case (one key, a valid object holding a string) costs one orjson call and two type checks per
    # line; anything else, blank lines included, takes parse_json_line's full path.
    loads, decode_error, key, first_texts = orjson.loads, orjson.JSONDecodeError, keys[0], texts[0]
    single = len(keys) == 1
    for line_no, raw in enumerate(chunk.data.split(b"\n"), start=chunk.first_line):
        if single:
            try:
                obj = loads(raw)
            except decode_error:
                obj = None
            if type(obj) is dict and type(obj.get(key)) is str:
                seen += 1
                line_nos.append(line_no)
                first_texts.append(obj[key])
                continue
        if not raw or raw.isspace():
            continue
        seen += 1
        values, reason = parse_json_line(raw, keys)
        if reason:
            bad.append((line_no, reason))
            continue
        line_nos.append(line_no)
        for k, value in enumerate(values):
            texts[k].append(value)
    return line_nos, texts, bad, seen


def _text_blocks(data: bytes, first_line: int) -> list[tuple[int, bytes]]:
    """Documents of a text chunk: runs of non-blank lines, joined by newlines, with their first line number."""
    out: list[tuple[int, bytes]] = []
    current: list[bytes] = []
    start = first_line
    for offset, line in enumerate(data.split(b"\n")):
        if line and not line.isspace():
            if not current:
                start = first_line + offset
            current.append(line)
        elif current:
            out.append((start, b"\n".join(current)))
            current = []
    if current:
        out.append((start, b"\n".join(current)))
    return out
