"""The tokenizer backend of a preprocessing run: gigatoken where it gives the same ids, HF `tokenizers` otherwise.

gigatoken (MIT, Rust, SIMD pre-tokenizer plus pretoken caches) encodes GPT-2 BPE 5-20x faster per core than our
HF-based path. It is trusted per tokenizer, never in general: `choose_backend` encodes CHECK_TEXTS (the places
where byte-level BPE implementations diverge) with both and uses gigatoken only when every id agrees; otherwise
the run keeps the HF tokenizer and the returned note says why. Whatever the backend, outputs are byte-identical.

gigatoken 0.10.0 keeps its pretoken caches without bound (later releases cap them); `GigatokenTokenizer`
rebuilds its encoder when the process grows by more than `max_cache_bytes`, so memory stays constant on any
corpus. A rebuild drops only the cache, never changes ids.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from megagpt.data.tokenizer import FixedVocabTokenizer, Tokenizer

TOKENIZER_BACKENDS = ("auto", "gigatoken", "hf")
DEFAULT_MAX_CACHE_BYTES = 256 << 20  # per process; the cache of a few GB of web text fits in it
_BATCH_BELOW_CHARS = 1024  # mean text length under which one encode_batch call beats one encode() per text

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MIXED = ("The quick brown fox's 3 jumps, naïve café — 日本語 🤖🎉 <|endoftext|>\n\n\t  x  \r\n"
          "It'll cost $1,000.50 (approx.) ... ÅngströmE\u0301 \u00a0\u2003nbsp\u200b zero-width ")
# Unicode classes, emoji (incl. ZWJ sequences and flags), whitespace runs of every kind and length, special
# tokens inside text, contractions, digits, empty and whitespace-only strings, and long documents.
CHECK_TEXTS: tuple[str, ...] = (
    "", " ", "  ", "\n", "\n\n\n", "\t", "a", " a", "a ", "Hello world", " Hello world",
    "<|endoftext|>", "a<|endoftext|>b", "text <|endoftext|> more\n<|endoftext|><|endoftext|>",
    "<|endoftext", "<|", "|>", "<s></s><pad><unk>[CLS]",
    "It's they'll we've I'm you'd she's don't IT'S 'S 's's",
    "numbers 1234567 3.14159 -42 1,000,000 ٣٤٥ ①②③ ⅷ",
    "naïve café résumé e\u0301 Ångström ǅ ß ẞ ﬁ ΣΑΣ ς",
    "日本語のテキスト 中文 한국어 ไทย العربية עברית हिन्दी",
    "emoji 🤖🎉 👨‍👩‍👧‍👦 🇺🇸🇩🇪 ❤️ 1️⃣ 🏳️‍🌈 and symbols ©®™ — “quotes” …",
    "!!!??? ... ---- ((())) ;;; \\\\ // <> {} [] @#$%^&*_+=~`|",
    " " * 300, "\n" * 200, "\t" * 50 + "x", "x" + " " * 1000 + "y", " \n \n\t \r\n  \u3000\u00a0 ",
    "word" + "\u00a0" * 10 + "word", "a\rb\r\nc\u2028d\u2029e\x0bf\x0cg\x1ch\x85i",
    "\x00\x01\x7f control \ufeff bom \ufffd replacement",
    "lower UPPER MiXeD café's CAFÉ'S",
    "a" * 5000, "ab" * 3000 + " " + "😀" * 500,
    _MIXED * 800,  # ~100 KB: a long document
)


def _rss_bytes() -> int:
    """Resident set size of this process (0 where /proc is missing, which disables cache rebuilds)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def gigatoken_version() -> Optional[str]:
    """The installed gigatoken version, or None when it is not installed."""
    try:
        from importlib.metadata import version

        return version("gigatoken")
    except Exception:
        return None


class GigatokenTokenizer(FixedVocabTokenizer):
    """gigatoken encoder built from a `tokenizer.json` string; vocab_size and eod are those of its source.

    Pickles as its recipe (json, eod, vocab size), so worker processes rebuild it without loading HF files.
    """

    def __init__(self, tokenizer_json: str, eod: int, vocab_size: int, name: str = "gigatoken",
                 max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES) -> None:
        super().__init__(vocab_size, eod)
        self._json, self.name = tokenizer_json, name
        self.max_cache_bytes = max_cache_bytes
        self.rebuilds = 0  # cache drops so far (for tests and logs)
        self._batch_agrees: Optional[bool] = None  # checked on first use, in each process
        self._build()

    def _build(self) -> None:
        import gigatoken

        self._gt = None  # free the old caches before the new encoder allocates
        self._gt = gigatoken.Tokenizer.from_json(self._json)
        self._encode = self._gt.backend.encode
        self._base_rss = _rss_bytes()

    def __reduce__(self):
        return type(self), (self._json, self._eod, self._vocab_size, self.name, self.max_cache_bytes)

    def tokenize(self, text: str) -> list[int]:
        return self._encode(text).tolist()

    def tokenize_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        # Short texts go through one encode_batch call (2-3x faster on tweet-sized documents); longer ones one
        # encode() each, as fast and without importing `awkward` for encode_batch's results (0.17 s, ~30 MB).
        short = bool(texts) and sum(map(len, texts)) < _BATCH_BELOW_CHARS * len(texts)
        if short and self._batch_agrees is None:
            self._batch_agrees = self._check_batch_path()
        flat, lengths = self.encode_batched(texts) if short and self._batch_agrees else self.encode_each(texts)
        self._bound_cache()
        return flat, lengths

    def encode_each(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """One single-document encode per text (the path choose_backend checks against HF)."""
        pieces = [self._encode(text) for text in texts]
        if not pieces:
            return np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.int64)
        return np.concatenate(pieces), np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))

    def encode_batched(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """One encode_batch call on this thread (worker processes are the parallelism)."""
        out = self._gt.encode_batch(list(texts), parallel=False)
        layout = out.layout  # ListOffsetArray of uint32: offsets [n+1] and the flat ids, both zero-copy
        if hasattr(layout, "offsets") and hasattr(layout.content, "data"):
            offsets = np.asarray(layout.offsets.data)
            return np.asarray(layout.content.data)[offsets[0]:offsets[-1]], np.diff(offsets).astype(np.int64)
        import awkward as ak  # another layout in some awkward version: the generic (slower) conversion

        return ak.to_numpy(ak.flatten(out, axis=1)), ak.to_numpy(ak.num(out, axis=1)).astype(np.int64)

    def _check_batch_path(self) -> bool:
        """Whether encode_batch gives encode()'s ids on CHECK_TEXTS (encode() was checked against HF; so, by
        transitivity, is the batch path). Checked once per process before first use; if not, it is never used."""
        flat, lengths = self.encode_batched(CHECK_TEXTS)
        each_flat, each_lengths = self.encode_each(CHECK_TEXTS)
        return np.array_equal(flat, each_flat) and np.array_equal(lengths, each_lengths)

    def _bound_cache(self) -> None:
        if self._base_rss and _rss_bytes() - self._base_rss > self.max_cache_bytes:
            self.rebuilds += 1
            self._build()

    def detokenize(self, ids) -> str:
        return self._gt.decode(np.asarray(list(ids), dtype=np.uint32)).decode("utf-8", errors="replace")


def _first_difference(expected: Sequence[list[int]], flat: np.ndarray, lengths: np.ndarray,
                      texts: Sequence[str]) -> Optional[str]:
    """None when the flat ids split by `lengths` equal `expected` for every text, else the first miss."""
    bounds = np.concatenate(([0], np.cumsum(lengths))).tolist()
    for i, (text, want) in enumerate(zip(texts, expected)):
        got = flat[bounds[i]:bounds[i + 1]].tolist()
        if got != want:
            at = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            return (f"text {i} {text[:40]!r}{'...' if len(text) > 40 else ''} ({len(text)} chars): "
                    f"ids differ from token {at}: {got[at:at + 5]} vs HF {want[at:at + 5]}")
    return None


def choose_backend(tokenizer: Tokenizer, backend: str = "auto",
                   extra_texts: Sequence[str] = ()) -> tuple[Tokenizer, str]:
    """The tokenizer a run encodes with, and a line saying which backend and why.

    `backend`: "hf" keeps `tokenizer`; "gigatoken" requires gigatoken to load and agree (ValueError with the
    reason otherwise); "auto" uses gigatoken when it does, else keeps `tokenizer`. Tokenizers not backed by HF
    `tokenizers` (ByteTokenizer) have no faster backend and are returned as they are.
    """
    if backend not in TOKENIZER_BACKENDS:
        raise ValueError(f"unknown tokenizer backend {backend!r}; valid: {', '.join(TOKENIZER_BACKENDS)}")
    hf = getattr(tokenizer, "_hf", None)
    if backend == "hf" or hf is None:
        why = "requested" if backend == "hf" else f"{tokenizer.name} has no other backend"
        return tokenizer, f"tokenizer backend: {'hf' if hf is not None else 'python'} ({why})"
    version = gigatoken_version()
    texts = tuple(CHECK_TEXTS) + tuple(extra_texts)
    if version is None:
        reason = "gigatoken is not installed"
    else:
        try:
            fast = GigatokenTokenizer(hf.to_str(), tokenizer.eod, tokenizer.vocab_size, f"{tokenizer.name}[gigatoken]")
            difference = _first_difference(tokenizer.tokenize_batch(texts), *fast.encode_each(texts), texts)
        except Exception as e:  # an unsupported tokenizer.json or a crash: either way, do not use it
            difference = None
            reason = f"gigatoken {version} fails on this tokenizer ({type(e).__name__}: {e})"
        else:
            if difference is None:
                return fast, (f"tokenizer backend: gigatoken {version} "
                              f"(ids equal to HF tokenizers on {len(texts)} check texts)")
            reason = f"gigatoken {version} disagrees with HF tokenizers on {difference}"
    if backend == "gigatoken":
        raise ValueError(f"--tokenizer-backend gigatoken is unusable for {tokenizer.name}: {reason}")
    return tokenizer, f"tokenizer backend: hf (gigatoken not used: {reason})"
