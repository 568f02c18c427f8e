"""JSONL -> Megatron `.bin/.idx` preprocessing (library behind tools/preprocess_data.py).

Pipeline: the main process reads input lines lazily in ~256 KiB chunks, workers decode/parse/tokenize a chunk
each and return one flat token array per JSON key, the main process writes documents in input order through
`IndexedDatasetBuilder` (temp names, atomic rename). At most `2 * workers + 2` chunks are in flight, so memory
is constant in the input size. (`Pool.imap` would not do: its feeder thread drains the whole input iterator
into the task queue as fast as it can read, so memory grows with the corpus.)

Bad input lines (invalid UTF-8, malformed JSON, a non-object, a missing key, a non-string value, text with
lone surrogates) are skipped and counted; the summary names the first ten by file and line number. Blank lines
are ignored. A line whose text tokenizes to nothing is skipped for every key (counted as `empty`), so the
outputs of several `--json-keys` stay aligned document for document, as Megatron's are.

No torch import here: start-up is interpreter + numpy + tokenizers + building the tokenizer (~0.5 s).
"""
from __future__ import annotations

import contextlib
import glob
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np

from megagpt.data.indexed_dataset import IndexedDatasetBuilder, best_dtype
from megagpt.data.tokenizer import Tokenizer, build_tokenizer

_CHUNK_BYTES = 256 * 1024
MAX_REPORTED_BAD_LINES = 10  # bad lines named in a report (all are counted)


@dataclass
class PreprocessConfig:
    """Options of tools/preprocess_data.py (Megatron flag names, underscores for dashes)."""

    input: str  # a JSONL file or a glob of them (sorted), one JSON object per line
    output_prefix: str  # outputs are <output_prefix>_<key>_document.{bin,idx}
    json_keys: Sequence[str] = ("text",)  # keys to tokenize; each gets its own output pair
    tokenizer_type: str = "GPT2BPETokenizer"  # GPT2BPETokenizer | HuggingFaceTokenizer | ByteTokenizer
    vocab_file: Optional[str] = None  # GPT-2 encoder.json / vocab.json (bundled GPT-2 files if None)
    merge_file: Optional[str] = None  # GPT-2 vocab.bpe / merges.txt
    tokenizer_model: Optional[str] = None  # tokenizer.json for HuggingFaceTokenizer
    append_eod: bool = False  # append the tokenizer's eod to every document
    workers: int = 1  # tokenizer processes; 1 tokenizes in the main process (no IPC)
    log_interval: int = 1000  # log a line every this many documents (0: never)
    progress: bool = True  # tqdm bar on stderr (shown only when stderr is a terminal)
    chunk_bytes: int = _CHUNK_BYTES  # input bytes per work item

    def validate(self) -> None:
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if not self.json_keys:
            raise ValueError("--json-keys needs at least one key")
        if self.chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {self.chunk_bytes}")


@dataclass(frozen=True)
class BadLine:
    """One skipped input line: where it is and why it was skipped."""

    path: str
    line: int  # 1-based line number within `path`
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class PreprocessSummary:
    """Counts and timings of one run; `report()` is the closing log line."""

    documents: int = 0  # documents written (per key; all keys get the same count)
    tokens: int = 0  # tokens written, summed over keys, eod included
    bytes_read: int = 0  # input bytes consumed
    lines: int = 0  # non-blank input lines seen
    skipped: int = 0  # bad lines skipped
    empty: int = 0  # good lines whose text tokenized to nothing
    skipped_by_reason: dict = field(default_factory=dict)
    first_bad: list = field(default_factory=list)  # first 10 BadLine
    seconds: float = 0.0  # wall time of the whole call
    first_write_seconds: float = 0.0  # call start -> first document written (start-up cost)
    outputs: dict = field(default_factory=dict)  # json key -> output prefix

    @property
    def mb_per_s(self) -> float:
        return self.bytes_read / 1e6 / max(self.seconds, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def report(self) -> str:
        text = (f"Done: {self.documents} documents, {self.tokens} tokens, {self.bytes_read / 1e6:.2f} MB in "
                f"{self.seconds:.2f} s ({self.mb_per_s:.2f} MB/s, {self.tokens_per_s:.0f} tokens/s); "
                f"skipped {self.skipped} bad lines, {self.empty} empty documents")
        if self.skipped:
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.skipped_by_reason.items()))
            text += f" ({reasons}); first {len(self.first_bad)}:\n" + "\n".join(f"  {b}" for b in self.first_bad)
        return text


@dataclass(frozen=True)
class _Chunk:
    path_index: int
    first_line: int  # 1-based number of lines[0]
    lines: list  # raw bytes per line
    nbytes: int


@dataclass
class _ChunkResult:
    tokens: list  # per key: 1-D array, documents concatenated
    lengths: np.ndarray  # [docs, keys] tokens per document
    bad: list  # (path_index, line, reason)
    empty: int
    lines: int
    nbytes: int


@dataclass(frozen=True)
class _TokenizerSpec:
    """Picklable recipe so each worker builds its own tokenizer once."""

    tokenizer_type: str
    vocab_file: Optional[str]
    merge_file: Optional[str]
    tokenizer_model: Optional[str]

    def build(self) -> Tokenizer:
        return build_tokenizer(self.tokenizer_type, self.vocab_file, self.merge_file, self.tokenizer_model)


def parse_json_line(raw: bytes, keys: Sequence[str]) -> tuple[list[str], Optional[str]]:
    """The string values of `keys` in one JSON-lines record, or ([], why the line is unusable)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return [], "invalid UTF-8"
    except ValueError:
        return [], "malformed JSON"
    if not isinstance(obj, dict):
        return [], f"not a JSON object ({type(obj).__name__})"
    for key in keys:
        if key not in obj:
            return [], f"missing key {key!r}"
        if not isinstance(obj[key], str):
            return [], f"key {key!r} is not a string ({type(obj[key]).__name__})"
    return [obj[key] for key in keys], None


class _Encoder:
    """Turns a chunk of raw lines into token arrays; one per worker process (or the main one)."""

    def __init__(self, tokenizer: Tokenizer, keys: Sequence[str], append_eod: bool, dtype: np.dtype) -> None:
        self.tokenizer, self.keys, self.append_eod, self.dtype = tokenizer, tuple(keys), append_eod, dtype

    def _tokenize_all(self, texts: list, bad_at: list) -> list:
        """Tokenize texts; a text the tokenizer rejects (lone surrogates) yields None and a reason."""
        try:
            return self.tokenizer.tokenize_batch(texts)
        except (UnicodeError, TypeError, ValueError):
            out = []
            for i, text in enumerate(texts):
                try:
                    out.append(self.tokenizer.tokenize(text))
                except (UnicodeError, TypeError, ValueError):
                    out.append(None)
                    bad_at.append(i)
            return out

    def __call__(self, chunk: _Chunk) -> _ChunkResult:
        bad: list = []
        line_nos: list = []
        texts: list = [[] for _ in self.keys]
        n_lines = 0
        for offset, raw in enumerate(chunk.lines):
            if not raw.strip():
                continue
            n_lines += 1
            line_no = chunk.first_line + offset
            values, reason = parse_json_line(raw, self.keys)
            if reason:
                bad.append((chunk.path_index, line_no, reason))
                continue
            line_nos.append(line_no)
            for k, value in enumerate(values):
                texts[k].append(value)

        keep = [True] * len(line_nos)
        ids_per_key = []
        for k in range(len(self.keys)):
            bad_at: list = []
            ids = self._tokenize_all(texts[k], bad_at)
            for i in bad_at:
                if keep[i]:
                    keep[i] = False
                    bad.append((chunk.path_index, line_nos[i], "text has lone surrogates (not valid Unicode)"))
            ids_per_key.append(ids)
        empty = 0
        for i in range(len(line_nos)):
            if keep[i] and any(not ids[i] for ids in ids_per_key):
                keep[i], empty = False, empty + 1
        bad.sort(key=lambda b: b[1])

        rows = [i for i in range(len(line_nos)) if keep[i]]
        eod = [self.tokenizer.eod] if self.append_eod else []
        lengths = np.zeros((len(rows), len(self.keys)), dtype=np.int64)
        flat = []
        for k, ids in enumerate(ids_per_key):
            docs = [ids[i] + eod if eod else ids[i] for i in rows]
            lengths[:, k] = [len(d) for d in docs]
            total = int(lengths[:, k].sum())
            flat.append(np.fromiter(itertools.chain.from_iterable(docs), dtype=self.dtype, count=total))
        return _ChunkResult(flat, lengths, bad, empty, n_lines, chunk.nbytes)


_WORKER_ENCODER: Optional[_Encoder] = None  # per worker process, set once by _init_worker


def _init_worker(spec: _TokenizerSpec, keys: Sequence[str], append_eod: bool, dtype: np.dtype) -> None:
    global _WORKER_ENCODER
    # The processes are the parallelism; Rust thread pools in each would only oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_ENCODER = _Encoder(spec.build(), keys, append_eod, dtype)


def _encode_in_worker(chunk: _Chunk) -> _ChunkResult:
    return _WORKER_ENCODER(chunk)


def resolve_inputs(pattern: str) -> list[str]:
    """The input file, or the sorted files matching a glob; FileNotFoundError when there are none."""
    if os.path.isfile(pattern):
        return [pattern]
    paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"no input file matches {pattern!r}")
    return paths


def iter_chunks(paths: Sequence[str], chunk_bytes: int = _CHUNK_BYTES) -> Iterator[_Chunk]:
    """Lazily yield runs of whole lines of about `chunk_bytes` each (never more than one file per chunk)."""
    for index, path in enumerate(paths):
        with open(path, "rb") as f:
            lines: list = []
            size, first = 0, 1
            for line_no, line in enumerate(f, start=1):
                lines.append(line)
                size += len(line)
                if size >= chunk_bytes:
                    yield _Chunk(index, first, lines, size)
                    lines, size, first = [], 0, line_no + 1
            if lines:
                yield _Chunk(index, first, lines, size)


def _ordered_results(encode, pool, chunks: Iterator[_Chunk], in_flight: int) -> Iterator[_ChunkResult]:
    """Results in input order, with at most `in_flight` chunks read but not yet consumed."""
    if pool is None:
        for chunk in chunks:
            yield encode(chunk)
        return
    pending: deque = deque()
    for chunk in chunks:
        pending.append(pool.submit(_encode_in_worker, chunk))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron's naming: <output-prefix>_<json-key>_document."""
    return f"{output_prefix}_{key}_document"


def _log(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def preprocess(config: PreprocessConfig) -> PreprocessSummary:
    """Tokenize `config.input` into one indexed dataset per JSON key; returns counts and timings.

    On any exception no file appears under the output names (builders delete their temp files).
    """
    from tqdm import tqdm

    start = time.perf_counter()
    config.validate()
    paths = resolve_inputs(config.input)
    total_bytes = sum(os.path.getsize(p) for p in paths)
    spec = _TokenizerSpec(config.tokenizer_type, config.vocab_file, config.merge_file, config.tokenizer_model)
    summary = PreprocessSummary(outputs={k: output_prefix_for(config.output_prefix, k) for k in config.json_keys})
    reasons: Counter = Counter()
    with contextlib.ExitStack() as stack:
        tokenizer = spec.build()  # fails fast on a bad tokenizer before any worker starts
        dtype = best_dtype(tokenizer.vocab_size)
        pool = None
        if config.workers > 1:
            # spawn: workers never inherit threads (tqdm monitor, Rust pools) or open builder files by fork.
            # ProcessPoolExecutor rather than Pool: a worker that dies (OOM kill) raises BrokenProcessPool
            # here instead of leaving the main process waiting forever for a lost task.
            pool = ProcessPoolExecutor(config.workers, multiprocessing.get_context("spawn"), _init_worker,
                                       (spec, tuple(config.json_keys), config.append_eod, dtype))
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)
        encoder = _Encoder(tokenizer, config.json_keys, config.append_eod, dtype)
        builders = [stack.enter_context(IndexedDatasetBuilder(summary.outputs[k], dtype)) for k in config.json_keys]
        bar = stack.enter_context(tqdm(total=total_bytes, unit="B", unit_scale=True, file=sys.stderr,
                                       disable=None if config.progress else True, desc="preprocess"))
        chunks = iter_chunks(paths, config.chunk_bytes)
        for result in _ordered_results(encoder, pool, chunks, 2 * config.workers + 2):
            offsets = np.zeros(len(builders), dtype=np.int64)
            for row in result.lengths:
                for k, builder in enumerate(builders):
                    end = offsets[k] + row[k]
                    builder.add_document(result.tokens[k][offsets[k]:end])
                    offsets[k] = end
                if summary.documents == 0:
                    summary.first_write_seconds = time.perf_counter() - start
                    _log(f"first document written after {summary.first_write_seconds:.2f} s")
                summary.documents += 1
                if config.log_interval and summary.documents % config.log_interval == 0:
                    elapsed = time.perf_counter() - start
                    _log(f"Processed {summary.documents} documents ({summary.documents / elapsed:.1f} docs/s, "
                         f"{(summary.bytes_read + result.nbytes) / 1e6 / elapsed:.2f} MB/s).")
            summary.tokens += int(result.lengths.sum())
            summary.bytes_read += result.nbytes
            summary.lines += result.lines
            summary.empty += result.empty
            for path_index, line, reason in result.bad:
                reasons[reason] += 1
                if len(summary.first_bad) < MAX_REPORTED_BAD_LINES:
                    summary.first_bad.append(BadLine(paths[path_index], line, reason))
            bar.update(result.nbytes)
        for builder in builders:
            builder.finalize()
    summary.skipped = sum(reasons.values())
    summary.skipped_by_reason = dict(reasons)
    summary.seconds = time.perf_counter() - start
    return summary
