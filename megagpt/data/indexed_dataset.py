"""Megatron-compatible ``.bin/.idx`` token datasets: a memory-mapped reader and a C++-backed writer.

The byte layout is specified in DESIGN.md ("Indexed dataset"). The reader maps both files and hands out
views, so opening a terabyte corpus costs a few page faults and every DataLoader worker shares the page
cache. The writer (``IndexedDatasetBuilder``) streams tokens straight to disk from C++ with constant
memory, writes under temporary names and renames on ``finalize()``, so a crash never leaves a
half-written file under the final name.
"""
from __future__ import annotations

import mmap
import os
import struct
from typing import Iterable, Optional, Union

import numpy as np

from megagpt.data import _builder_cpp

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = 34  # magic 9 + version 8 + dtype code 1 + S 8 + D 8

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
CODE_OF_DTYPE: dict[np.dtype, int] = {dtype: code for code, dtype in DTYPE_CODES.items()}

# Validation walks the index in blocks so a huge .idx never needs a full-size temporary.
_VALIDATE_BLOCK = 1 << 20


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair that does not follow the format; the message names the file and the problem."""


def best_dtype(vocab_size: int) -> np.dtype:
    """Smallest token dtype Megatron uses for a vocabulary: uint16 below 65500 ids, int32 otherwise."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def data_file_path(prefix: str) -> str:
    """The token file of a dataset prefix."""
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    """The index file of a dataset prefix."""
    return prefix + ".idx"


def _dtype_code(dtype) -> int:
    dt = np.dtype(dtype)
    if dt not in CODE_OF_DTYPE:
        names = ", ".join(str(d) for d in DTYPE_CODES.values())
        raise ValueError(f"unsupported token dtype {dt}; supported: {names}")
    return CODE_OF_DTYPE[dt]


class IndexedDatasetBuilder:
    """Streams documents into ``<prefix>.bin/.idx`` (see module docstring for why C++ and temp names).

    Use as a context manager: a clean exit finalizes (if ``finalize()`` was not called), an exception
    deletes the temporary files and leaves any existing ``<prefix>.bin/.idx`` untouched.
    One builder is fed by one thread (the C++ writer drops the GIL but takes no lock of its own).
    """

    def __init__(self, output_prefix: str, dtype) -> None:
        self.output_prefix = output_prefix
        self.dtype = np.dtype(dtype)
        code = _dtype_code(self.dtype)
        suffix = f".tmp-{os.getpid()}"
        self._bin_tmp = data_file_path(output_prefix) + suffix
        self._idx_tmp = index_file_path(output_prefix) + suffix
        self._writer = _builder_cpp.Builder(self._bin_tmp, code)
        self._state = "open"  # open -> finalized | aborted

    @property
    def documents(self) -> int:
        """Documents added so far."""
        return self._writer.documents

    @property
    def tokens(self) -> int:
        """Tokens added so far."""
        return self._writer.tokens

    def add_document(self, tokens: Union[np.ndarray, Iterable[int]]) -> None:
        """Append one document (1-D integer ids; ValueError names any id the dtype cannot hold)."""
        self._check_open()
        arr = np.asarray(tokens)
        if arr.size == 0:
            arr = np.zeros(0, dtype=np.int64)  # np.asarray([]) is float64
        self._writer.add_document(arr)

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append len(lengths) documents stored back to back in `tokens`: one C++ call for a whole batch, so
        preprocessing writes at disk speed however short the documents are."""
        self._check_open()
        self._writer.add_documents(np.asarray(tokens), np.ascontiguousarray(lengths, dtype=np.int64))

    def add_index(self, other_prefix: str) -> None:
        """Append every document of another dataset with the same dtype (copies its .bin bytes)."""
        self._check_open()
        other = IndexedDataset(other_prefix)
        if other.dtype != self.dtype:
            raise ValueError(
                f"cannot append {other_prefix} (dtype {other.dtype}) to {self.output_prefix} (dtype {self.dtype})"
            )
        if len(other.document_indices) != len(other) + 1 or not np.array_equal(
            other.document_indices, np.arange(len(other) + 1)
        ):
            raise ValueError(
                f"cannot append {other_prefix}: it groups several sequences per document, "
                "and this builder writes one sequence per document"
            )
        self._writer.add_index(data_file_path(other_prefix), np.ascontiguousarray(other.sequence_lengths))

    def finalize(self) -> None:
        """Write the index, then rename .bin and .idx (the .idx last, so its presence means complete)."""
        self._check_open()
        try:
            self._writer.finalize(self._idx_tmp)
            os.replace(self._bin_tmp, data_file_path(self.output_prefix))
            os.replace(self._idx_tmp, index_file_path(self.output_prefix))
        except BaseException:
            self.abort()
            raise
        self._state = "finalized"

    def abort(self) -> None:
        """Close the writer and delete the temporary files; the final names are never touched."""
        if self._state == "finalized":
            return
        self._writer.abort()
        for path in (self._bin_tmp, self._idx_tmp):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        self._state = "aborted"

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"builder for {self.output_prefix} is {self._state}")

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.finalize()

    def __del__(self) -> None:
        if getattr(self, "_state", None) == "open":
            self.abort()


def _map_file(path: str) -> Optional[mmap.mmap]:
    """Read-only map of a whole file; None for an empty file (mmap cannot map zero bytes)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _read_file(path: str) -> Optional[bytes]:
    """A whole file in memory; None for an empty file (as _map_file)."""
    with open(path, "rb") as f:
        return f.read() or None


class IndexedDataset:
    """Memory-mapped reader for ``<prefix>.bin/.idx``; items are read-only views into the .bin.

    ``validate=False`` skips the O(S) consistency walk (pointers vs lengths, monotone document
    indices) for huge corpora; the header, sizes and last-pointer checks always run. ``mmap_bin=False``
    (Megatron's --no-mmap-bin-files) reads the .bin into memory instead, for file systems where mapping is slow.
    """

    def __init__(self, prefix: str, validate: bool = True, mmap_bin: bool = True) -> None:
        self.prefix = prefix
        self._validate_all = validate
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"indexed dataset {prefix!r} not found: expected {bin_path} and {idx_path}; missing {path}"
                )
        self._idx_map = _map_file(idx_path)
        self._bin_map = _map_file(bin_path) if mmap_bin else _read_file(bin_path)
        self._parse_index(idx_path)
        self._check_bin(bin_path)

    def _parse_index(self, path: str) -> None:
        buf = self._idx_map if self._idx_map is not None else b""
        size = len(buf)

        def fail(problem: str) -> None:
            raise IndexedDatasetError(f"corrupt index {path}: {problem}")

        if size < HEADER_BYTES:
            fail(f"truncated header: {size} bytes, need at least {HEADER_BYTES}")
        magic = bytes(buf[:9])
        if magic != MAGIC:
            fail(f"bad magic {magic!r}; expected {MAGIC!r}")
        version, code, num_seqs, num_docs = struct.unpack("<QBQQ", buf[9:HEADER_BYTES])
        if version != VERSION:
            fail(f"unsupported version {version}; expected {VERSION}")
        if code not in DTYPE_CODES:
            fail(f"unknown dtype code {code}; expected one of {sorted(DTYPE_CODES)}")
        expected = HEADER_BYTES + 12 * num_seqs + 8 * num_docs
        if size != expected:
            fail(f"file is {size} bytes but S={num_seqs}, D={num_docs} need 34 + 12*S + 8*D = {expected}")
        if num_docs < 1:
            fail("D = 0; the document index must hold at least the leading 0")
        self._dtype = DTYPE_CODES[code]
        off = HEADER_BYTES
        self._lengths = np.frombuffer(buf, dtype="<i4", count=num_seqs, offset=off)
        off += 4 * num_seqs
        self._pointers = np.frombuffer(buf, dtype="<i8", count=num_seqs, offset=off)
        off += 8 * num_seqs
        self._doc_idx = np.frombuffer(buf, dtype="<i8", count=num_docs, offset=off)
        if self._doc_idx[0] != 0 or self._doc_idx[-1] != num_seqs:
            fail(f"document indices run {self._doc_idx[0]}..{self._doc_idx[-1]}; expected 0..{num_seqs}")
        if not self._validate_all:
            return
        itemsize = self._dtype.itemsize
        expected_ptr = 0
        for start in range(0, num_seqs, _VALIDATE_BLOCK):
            lengths = self._lengths[start : start + _VALIDATE_BLOCK].astype(np.int64)
            if (lengths < 0).any():
                fail(f"negative sequence length at sequence {start + int(np.argmax(lengths < 0))}")
            want = expected_ptr + np.concatenate(([0], np.cumsum(lengths[:-1] * itemsize)))
            bad = np.nonzero(self._pointers[start : start + _VALIDATE_BLOCK] != want)[0]
            if len(bad):
                i = start + int(bad[0])
                fail(f"sequence {i} starts at byte {self._pointers[i]}, expected {want[bad[0]]} from the lengths")
            expected_ptr = int(want[-1] + lengths[-1] * itemsize)
        for start in range(0, num_docs - 1, _VALIDATE_BLOCK):
            block = self._doc_idx[start : start + _VALIDATE_BLOCK + 1]
            if (np.diff(block) < 0).any():
                fail(f"document indices decrease after position {start + int(np.argmax(np.diff(block) < 0))}")

    def _check_bin(self, path: str) -> None:
        bin_size = len(self._bin_map) if self._bin_map is not None else 0
        num_seqs = len(self._lengths)
        itemsize = self._dtype.itemsize
        need = int(self._pointers[-1]) + int(self._lengths[-1]) * itemsize if num_seqs else 0
        if bin_size != need:
            raise IndexedDatasetError(
                f"data file {path} is {bin_size} bytes but its index {index_file_path(self.prefix)} "
                f"needs {need} (last pointer + last length x {itemsize})"
            )
        if self._bin_map is None:
            self._tokens = np.zeros(0, dtype=self._dtype)
        else:
            self._tokens = np.frombuffer(self._bin_map, dtype=self._dtype.newbyteorder("<"))

    def __len__(self) -> int:
        return len(self._lengths)

    def __getitem__(self, i: Union[int, slice]) -> Union[np.ndarray, list[np.ndarray]]:
        if isinstance(i, slice):
            return [self.get(j) for j in range(*i.indices(len(self)))]
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``i`` as a read-only view (no copy)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {self.prefix} ({n} sequences)")
        i = int(i) % n
        seq_len = int(self._lengths[i])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(f"tokens [{offset}, {offset + length}) outside sequence {i} of length {seq_len}")
        start = int(self._pointers[i]) // self._dtype.itemsize + offset
        return self._tokens[start : start + length]

    @property
    def sequence_lengths(self) -> np.ndarray:
        """int32 [S] tokens per sequence (a view of the .idx)."""
        return self._lengths

    @property
    def sequence_pointers(self) -> np.ndarray:
        """int64 [S] byte offset of each sequence in the .bin."""
        return self._pointers

    @property
    def document_indices(self) -> np.ndarray:
        """int64 [D] sequence index where each document ends; 0..S for GPT data."""
        return self._doc_idx

    @property
    def dtype(self) -> np.dtype:
        """Token dtype stored in the .bin."""
        return self._dtype

    @staticmethod
    def exists(prefix: str) -> bool:
        """True when both ``<prefix>.bin`` and ``<prefix>.idx`` exist."""
        return os.path.isfile(data_file_path(prefix)) and os.path.isfile(index_file_path(prefix))

    # DataLoader workers started with spawn receive the prefix and re-map; maps do not pickle.
    def __getstate__(self) -> dict:
        return {"prefix": self.prefix, "validate": self._validate_all}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"], validate=state["validate"])

    def __repr__(self) -> str:
        return f"IndexedDataset({self.prefix!r}, sequences={len(self)}, dtype={self.dtype})"


def merge_datasets(prefixes: list[str], output_prefix: str) -> None:
    """Concatenate datasets of one dtype into ``output_prefix`` (documents in the order given)."""
    if not prefixes:
        raise ValueError("merge_datasets needs at least one input prefix")
    datasets = [IndexedDataset(p) for p in prefixes]
    dtypes = {str(d.dtype) for d in datasets}
    if len(dtypes) != 1:
        listing = ", ".join(f"{p} ({d.dtype})" for p, d in zip(prefixes, datasets))
        raise ValueError(f"cannot merge datasets of different dtypes: {listing}")
    with IndexedDatasetBuilder(output_prefix, datasets[0].dtype) as builder:
        for prefix in prefixes:
            builder.add_index(prefix)


def dataset_prefixes(directory: str) -> list[str]:
    """The prefixes of every .bin/.idx pair in `directory`, sorted by name (the order Megatron's merge uses);
    ValueError names a .bin or .idx without its partner, or a directory holding no pair."""
    if not os.path.isdir(directory):
        raise ValueError(f"{directory} is not a directory")
    names = os.listdir(directory)
    stems = {os.path.splitext(n)[0] for n in names if n.endswith((".bin", ".idx"))}
    for stem in sorted(stems):
        for ext in (".bin", ".idx"):
            if stem + ext not in names:
                raise ValueError(f"{os.path.join(directory, stem)}: {ext} file missing (datasets are .bin/.idx pairs)")
    if not stems:
        raise ValueError(f"no .bin/.idx pairs in {directory}")
    return [os.path.join(directory, stem) for stem in sorted(stems)]
