"""Corpus -> Megatron `.bin/.idx` preprocessing (library behind tools/preprocess_data.py).

Pipeline: the main process cuts the inputs (readers.py: JSON lines plain/.gz/.zst, plain text, Parquet) into
~1 MiB chunks of whole records; workers decode (orjson), validate and tokenize a chunk each and return one flat
token array per key plus document lengths (eod appended with numpy, no per-token Python); the main process
writes the documents in input order, one C++ call per chunk (preprocess_outputs.py: one output, one per input,
or resumable parts). At most `2 * workers + 2` chunks are in flight, so memory is constant in the corpus size.
(`Pool.imap` would not do: its feeder thread drains the whole input iterator into the task queue as fast as
it can read, so memory grows with the corpus.)

The tokenizer backend is chosen per run (fast_tokenizer.py): gigatoken when it reproduces the HF ids on the
check texts, HF `tokenizers` otherwise; the output bytes are the same either way.

Bad input records (invalid UTF-8, malformed JSON, a non-object, a missing key, a non-string or null value, text
with lone surrogates) are skipped and counted; the summary names the first ten by file and line number. Blank
lines are ignored. A record whose text tokenizes to nothing is skipped for every key (counted as `empty`), so
the outputs of several `--json-keys` stay aligned document for document, as Megatron's are.

No torch import here: start-up is interpreter + numpy + the tokenizer (~0.5 s).
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from megagpt.data.fast_tokenizer import DEFAULT_MAX_CACHE_BYTES, TOKENIZER_BACKENDS, choose_backend
from megagpt.data.indexed_dataset import best_dtype
from megagpt.data.preprocess_outputs import Outputs, output_prefix_for  # noqa: F401 (output_prefix_for: API)
from megagpt.data.preprocess_report import MAX_REPORTED_BAD_LINES, BadLine, PreprocessSummary
from megagpt.data.readers import (CHUNK_BYTES, COMPRESSED_SUFFIXES, INPUT_FORMATS, TEXT_SPLITS, Chunk,
                                  check_inputs, iter_chunks, parse_json_line, records, resolve_inputs)
from megagpt.data.tokenizer import Tokenizer, build_tokenizer

__all__ = ["BadLine", "MAX_REPORTED_BAD_LINES", "PreprocessConfig", "PreprocessSummary", "iter_chunks",
           "parse_json_line", "preprocess", "resolve_inputs"]

_SURROGATES = "text has lone surrogates (not valid Unicode)"


@dataclass
class PreprocessConfig:
    """Options of tools/preprocess_data.py (Megatron flag names, underscores for dashes)."""

    input: Union[str, Sequence[str]]  # files and/or globs (each glob's matches sorted), processed in this order
    output_prefix: str  # outputs are <output_prefix>_<key>_document.{bin,idx}
    json_keys: Sequence[str] = ("text",)  # keys (Parquet: columns) to tokenize; each gets its own output pair
    tokenizer_type: str = "GPT2BPETokenizer"  # GPT2BPETokenizer | HuggingFaceTokenizer | ByteTokenizer
    vocab_file: Optional[str] = None  # GPT-2 encoder.json / vocab.json (bundled GPT-2 files if None)
    merge_file: Optional[str] = None  # GPT-2 vocab.bpe / merges.txt
    tokenizer_model: Optional[str] = None  # tokenizer.json for HuggingFaceTokenizer
    tokenizer_backend: str = "auto"  # auto | gigatoken | hf: who computes the (identical) ids
    append_eod: bool = False  # append the tokenizer's eod to every document
    input_format: str = "auto"  # auto (by extension) | jsonl | text | parquet
    text_split: str = "blank-line"  # plain text: a document per blank-line-separated block, or per file
    output_per_input: bool = False  # one output per input file instead of one for all
    resume: bool = False  # skip inputs a previous run finished (recorded in <output_prefix>.progress.jsonl)
    workers: int = 1  # tokenizer processes; 1 tokenizes in the main process (no IPC)
    log_interval: int = 1000  # log a line every this many documents (0: never)
    progress: bool = True  # tqdm bar on stderr (shown only when stderr is a terminal)
    chunk_bytes: int = CHUNK_BYTES  # input bytes per work item
    max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES  # gigatoken: growth per process before its cache is dropped

    def validate(self) -> None:
        """Flag problems found without reading any input; ValueError names the flag."""
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if not self.json_keys:
            raise ValueError("--json-keys needs at least one key")
        if self.chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {self.chunk_bytes}")
        for flag, value, valid in (("--tokenizer-backend", self.tokenizer_backend, TOKENIZER_BACKENDS),
                                   ("--input-format", self.input_format, INPUT_FORMATS),
                                   ("--text-split", self.text_split, TEXT_SPLITS)):
            if value not in valid:
                raise ValueError(f"{flag} {value!r} is not one of {', '.join(valid)}")

    def settings(self) -> dict:
        """What decides the bytes written (a resumed run must match): not workers, backend or logging."""
        return {"json_keys": list(self.json_keys), "tokenizer_type": self.tokenizer_type,
                "vocab_file": self.vocab_file, "merge_file": self.merge_file, "tokenizer_model": self.tokenizer_model,
                "append_eod": self.append_eod, "input_format": self.input_format, "text_split": self.text_split,
                "output_per_input": self.output_per_input}


@dataclass
class _ChunkResult:
    tokens: list  # per key: 1-D array, documents concatenated (eod included)
    lengths: np.ndarray  # [docs, keys] tokens per document
    bad: list  # (line, reason), by line
    empty: int
    lines: int
    nbytes: int
    path_index: int
    last: bool


@dataclass(frozen=True)
class _TokenizerSpec:
    """Picklable recipe so each worker builds its own HF tokenizer once (gigatoken ones pickle themselves)."""

    tokenizer_type: str
    vocab_file: Optional[str]
    merge_file: Optional[str]
    tokenizer_model: Optional[str]

    def build(self) -> Tokenizer:
        return build_tokenizer(self.tokenizer_type, self.vocab_file, self.merge_file, self.tokenizer_model)


def _with_eod(flat: np.ndarray, lengths: np.ndarray, eod: int) -> tuple[np.ndarray, np.ndarray]:
    """`eod` appended to every document of a flat batch, in one vectorized pass."""
    ends = np.cumsum(lengths + 1) - 1
    out = np.empty(flat.size + lengths.size, dtype=np.promote_types(flat.dtype, np.min_scalar_type(eod)))
    keep = np.ones(out.size, dtype=bool)
    keep[ends] = False
    out[keep] = flat
    out[ends] = eod
    return out, lengths + 1


def _narrow(flat: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`flat` in the output dtype when every id fits (half the bytes back to the main process, nothing left to
    convert there); otherwise unchanged, so the builder's range check names the id that does not fit."""
    if flat.dtype == dtype:
        return flat
    info = np.iinfo(dtype)
    return flat.astype(dtype) if not flat.size or (flat.min() >= info.min and flat.max() <= info.max) else flat


class _Encoder:
    """Turns a chunk into token arrays; one per worker process (or the main one)."""

    def __init__(self, tokenizer: Tokenizer, keys: Sequence[str], append_eod: bool, dtype: np.dtype) -> None:
        self.tokenizer, self.keys, self.append_eod, self.dtype = tokenizer, tuple(keys), append_eod, dtype

    def _tokenize(self, texts: list) -> tuple[np.ndarray, np.ndarray, list]:
        """Flat ids and lengths; a text the tokenizer rejects (lone surrogates) gets length 0 and is listed."""
        try:
            flat, lengths = self.tokenizer.tokenize_flat(texts)
            return flat, lengths, []
        except (UnicodeError, TypeError, ValueError):
            pieces, lengths, rejected = [], np.zeros(len(texts), dtype=np.int64), []
            for i, text in enumerate(texts):
                try:
                    piece = self.tokenizer.tokenize_flat([text])[0]
                except (UnicodeError, TypeError, ValueError):
                    rejected.append(i)
                    continue
                pieces.append(piece)
                lengths[i] = piece.size
            return (np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)), lengths, rejected

    def __call__(self, chunk: Chunk) -> _ChunkResult:
        line_nos, texts, bad, seen = records(chunk, self.keys)
        keep = np.ones(len(line_nos), dtype=bool)
        per_key = []
        for k in range(len(self.keys)):
            flat, lengths, rejected = self._tokenize(texts[k])
            for i in rejected:
                if keep[i]:
                    keep[i] = False
                    bad.append((line_nos[i], _SURROGATES))
            per_key.append((flat, lengths))
        nonempty = np.logical_and.reduce([lengths > 0 for _, lengths in per_key])
        empty = int((keep & ~nonempty).sum())
        keep &= nonempty
        bad.sort(key=lambda b: b[0])
        tokens, columns = [], []
        for flat, lengths in per_key:
            if not keep.all():
                flat, lengths = flat[np.repeat(keep, lengths)], lengths[keep]
            if self.append_eod:
                flat, lengths = _with_eod(flat, lengths, self.tokenizer.eod)
            tokens.append(_narrow(flat, self.dtype))
            columns.append(lengths)
        return _ChunkResult(tokens, np.stack(columns, axis=1), bad, empty, seen, chunk.nbytes, chunk.path_index,
                            chunk.last)


_WORKER_ENCODER: Optional[_Encoder] = None  # per worker process, set once by _init_worker


def _init_worker(recipes, keys: Sequence[str], append_eod: bool) -> None:
    """Warm up (imports), then wait for the tokenizer recipe the main process sends once it has chosen one.

    Workers start before the main process has built and checked its tokenizer, so their interpreter start and
    imports overlap that work; a None recipe means the run was abandoned before any chunk was sent.
    """
    global _WORKER_ENCODER
    # The processes are the parallelism; Rust thread pools in each would only oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    sent = recipes.get()
    if sent is None:
        return
    recipe, dtype = sent
    tokenizer = recipe.build() if isinstance(recipe, _TokenizerSpec) else recipe
    _WORKER_ENCODER = _Encoder(tokenizer, keys, append_eod, dtype)


def _encode_in_worker(chunk: Chunk) -> _ChunkResult:
    return _WORKER_ENCODER(chunk)


def _noop() -> None:
    """Submitted once per worker at pool creation: ProcessPoolExecutor starts processes only on submit."""


def _ordered_results(encode, pool, chunks: Iterator[Chunk], in_flight: int) -> Iterator[_ChunkResult]:
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


def _log(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def _start_pool(stack: contextlib.ExitStack, config: PreprocessConfig):
    """Worker processes, started now and handed their tokenizer later (see _init_worker); None at 1 worker."""
    if config.workers == 1:
        return None, None
    context = multiprocessing.get_context("spawn")  # never inherit threads (tqdm, Rust pools) or open files
    recipes = context.Queue()
    recipes.cancel_join_thread()  # a worker that died before reading its recipe must not hang our exit
    # ProcessPoolExecutor rather than Pool: a worker that dies (OOM kill) raises BrokenProcessPool here
    # instead of leaving the main process waiting forever for a lost task.
    pool = ProcessPoolExecutor(config.workers, context, _init_worker,
                               (recipes, tuple(config.json_keys), config.append_eod))
    sent = []
    stack.callback(pool.shutdown, wait=True, cancel_futures=True)
    stack.callback(lambda: [recipes.put(None) for _ in range(config.workers - len(sent))])
    for _ in range(config.workers):
        pool.submit(_noop)

    def send(recipe, dtype: np.dtype) -> None:
        for _ in range(config.workers):
            recipes.put((recipe, dtype))
            sent.append(1)

    return pool, send


def preprocess(config: PreprocessConfig) -> PreprocessSummary:
    """Tokenize `config.input` into indexed datasets, one per JSON key (and per input with output_per_input).

    Every problem found without tokenizing (flags, missing inputs or columns, resume conflicts, a bad
    tokenizer) raises before any chunk is read. On any exception no file appears under an output name that
    was not finished (builders delete their temp files); finished per-input outputs stay, for --resume.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    config.validate()
    all_paths = resolve_inputs(config.input)
    check_inputs(all_paths, config.input_format, config.json_keys)
    with contextlib.ExitStack() as stack:
        pool, send_recipe = _start_pool(stack, config)
        tokenizer = build_tokenizer(config.tokenizer_type, config.vocab_file, config.merge_file,
                                    config.tokenizer_model)
        outputs = Outputs(config.output_prefix, all_paths, config.json_keys, best_dtype(tokenizer.vocab_size),
                          config.settings(), config.output_per_input, config.resume)
        stack.callback(outputs.abort)
        summary = PreprocessSummary(outputs=outputs.outputs(), inputs=len(all_paths),
                                    resumed_inputs=len(outputs.done))
        for e in outputs.done.values():
            summary.add(e["documents"], e["tokens"], e["bytes"], e["lines"], e["empty"], e["reasons"],
                        [BadLine(e["input"], n, r) for n, r in e["first_bad"]])
        todo = [i for i, p in enumerate(all_paths) if p not in outputs.done]
        paths = [all_paths[i] for i in todo]
        encoding, summary.backend = choose_backend(tokenizer, config.tokenizer_backend)
        if hasattr(encoding, "max_cache_bytes"):
            encoding.max_cache_bytes = config.max_cache_bytes
        _log(summary.backend)
        if pool is not None:
            send_recipe(encoding if encoding is not tokenizer else _TokenizerSpec(
                config.tokenizer_type, config.vocab_file, config.merge_file, config.tokenizer_model), outputs.dtype)
        # The main process keeps a tokenizer only if it tokenizes itself (~50-100 MB it need not hold).
        encoder = _Encoder(encoding, config.json_keys, config.append_eod, outputs.dtype) if pool is None else None
        del tokenizer, encoding
        plain = not any(p.endswith(COMPRESSED_SUFFIXES) for p in paths)  # else the total (decompressed) is unknown
        bar = stack.enter_context(tqdm(total=sum(os.path.getsize(p) for p in paths) if plain else None, unit="B",
                                       unit_scale=True, file=sys.stderr, disable=None if config.progress else True,
                                       desc="preprocess"))
        chunks = iter_chunks(paths, config.chunk_bytes, config.input_format, config.text_split, config.json_keys)
        per_input = PreprocessSummary()
        for result in _ordered_results(encoder, pool, chunks, 2 * config.workers + 2):
            index, docs = todo[result.path_index], len(result.lengths)
            if docs:
                for k, builder in enumerate(outputs.builders(index)):
                    builder.add_documents(result.tokens[k], result.lengths[:, k])
                if summary.first_write_seconds == 0.0:
                    summary.first_write_seconds = time.perf_counter() - start
                    _log(f"first document written after {summary.first_write_seconds:.2f} s")
            crossed = (summary.documents + docs) // config.log_interval * config.log_interval \
                if config.log_interval else 0
            if crossed > summary.documents:  # one line per chunk, naming the last multiple of the interval
                elapsed = time.perf_counter() - start
                _log(f"Processed {crossed} documents ({(summary.documents + docs) / elapsed:.1f} docs/s, "
                     f"{(summary.bytes_read + result.nbytes) / 1e6 / elapsed:.2f} MB/s).")
            bad = [BadLine(all_paths[index], line, reason) for line, reason in result.bad]
            reasons = Counter(reason for _, reason in result.bad)
            for counts in (summary, per_input):
                counts.add(docs, int(result.lengths.sum()), result.nbytes, result.lines, result.empty, reasons, bad)
            if result.last:
                outputs.finish_input(index, per_input.ledger_entry())
                per_input = PreprocessSummary()
            bar.update(result.nbytes)
        outputs.finish_run()
    summary.seconds = time.perf_counter() - start
    return summary
