"""GPT pre-training samples over an indexed dataset, with Megatron's index semantics (DESIGN.md).

A sample is ``seq_length + 1`` tokens packed across documents; consecutive samples overlap by one token
(``tokens = s[:-1]``, ``labels = s[1:]``). Three index arrays define the order:

1. doc index: the split's document ids tiled over enough epochs, shuffled with RandomState(seed);
2. sample index: where each sample starts, as (position in doc index, token offset) (C++ helper);
3. shuffle index: a permutation of the samples, from the same RandomState continued.

They are cached as ``.npy`` named by an md5 of their description and built by one process per node;
the others wait for the files (a file barrier, not a collective that can time out while one rank
spends minutes on a large corpus). This module knows nothing of process groups: ranks arrive as bools.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from typing import Optional, Sequence

import numpy as np
import torch.utils.data

from megagpt.data import _helpers_cpp
from megagpt.data.indexed_dataset import IndexedDataset, data_file_path, index_file_path
from megagpt.fileio import atomic_write

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")
CACHE_FORMAT_VERSION = 1
# Megatron inflates each blended dataset's sample count by 0.5% so the greedy blend never runs short.
BLEND_OVERSAMPLE = 1.005
# Megatron: a last partial epoch needing fewer than this fraction of an epoch's samples is shuffled
# separately, so those few samples are not drawn from a doc order mixed into the full epochs.
SEPARATE_LAST_EPOCH_THRESHOLD = 0.80


def parse_split(split: str) -> list[float]:
    """``"969,30,1"`` (or ``"969/30/1"``, missing parts = 0) -> three fractions summing to 1."""
    parts = [p.strip() for p in split.replace("/", ",").split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"bad split {split!r}: expected up to 3 comma-separated numbers like '969,30,1'") from None
    if len(values) > 3:
        raise ValueError(f"bad split {split!r}: at most 3 parts (train, valid, test), got {len(values)}")
    if any(v < 0 or not math.isfinite(v) for v in values) or sum(values) <= 0:
        raise ValueError(f"bad split {split!r}: parts must be finite, >= 0 and not all zero")
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return [v / total for v in values]


def split_document_ranges(fractions: Sequence[float], num_documents: int) -> list[tuple[int, int]]:
    """Contiguous [begin, end) document ranges per split, rounded as Megatron does (last end = total)."""
    bounds = [0]
    for fraction in fractions:
        bounds.append(bounds[-1] + int(round(fraction * float(num_documents))))
    diff = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - diff for b in bounds[1:]]
    return [(bounds[k], bounds[k + 1]) for k in range(len(fractions))]


def _num_epochs(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest epochs whose tokens give ``num_samples`` samples of seq_length (+1 shared token)."""
    epochs = 1
    while (epochs * tokens_per_epoch - 1) // seq_length < num_samples:
        epochs += 1
    return epochs


def _build_doc_idx(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate_last: bool):
    """Documents tiled num_epochs times and shuffled; with separate_last, the last epoch on its own."""
    if separate_last and num_epochs > 1:
        first = _build_doc_idx(documents, num_epochs - 1, rng, False)
        last = _build_doc_idx(documents, 1, rng, False)
        return np.concatenate((first, last))
    dtype = np.int32 if len(documents) == 0 or documents.max() < 2**31 - 1 else np.int64
    doc_idx = np.tile(documents.astype(dtype), num_epochs)
    rng.shuffle(doc_idx)
    return doc_idx


def _build_shuffle_idx(num_shuffled: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    """Permutation of [0, num_shuffled) followed by a separate permutation of [num_shuffled, total)."""
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_shuffled, dtype=dtype)
    rng.shuffle(first)
    if num_shuffled == total:
        return first
    last = np.arange(num_shuffled, total, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def _save_npy_atomic(path: str, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def wait_for_files(paths: Sequence[str], timeout_s: float, poll_s: float = 0.2) -> None:
    """File barrier: return once every path exists (they appear by atomic rename), else TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [p for p in paths if not os.path.exists(p)]
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"waited {timeout_s:.0f}s for dataset index files that the builder process "
                f"(is_builder=True, normally local rank 0) should write; still missing: {', '.join(missing)}. "
                "Check that the builder runs and uses the same data path, split, seed and cache_dir."
            )
        time.sleep(poll_s)


class GPTDataset(torch.utils.data.Dataset):
    """Samples of ``seq_length + 1`` tokens from documents [begin, end) of an IndexedDataset.

    ``len()`` is the full number of samples of the epochs needed (>= num_samples, as Megatron).
    """

    def __init__(
        self,
        name: str,
        indexed_dataset: IndexedDataset,
        document_range: tuple[int, int],
        num_samples: int,
        seq_length: int,
        seed: int,
        cache_dir: Optional[str] = None,
        is_builder: bool = True,
        barrier_timeout_s: float = 1800.0,
    ) -> None:
        begin, end = document_range
        if not 0 <= begin < end <= len(indexed_dataset):
            raise ValueError(f"document range [{begin}, {end}) invalid for {len(indexed_dataset)} documents")
        if seq_length <= 0 or num_samples < 0:
            raise ValueError(f"need seq_length > 0 and num_samples >= 0, got {seq_length} and {num_samples}")
        self.name = name
        self.indexed_dataset = indexed_dataset
        self.document_range = (int(begin), int(end))
        self.num_samples = int(num_samples)
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        prefix = indexed_dataset.prefix
        self.cache_dir = cache_dir if cache_dir is not None else (os.path.dirname(os.path.abspath(prefix)))
        self.description = (
            f"GPTDataset v{CACHE_FORMAT_VERSION}\nprefix: {prefix}\nsplit: {name}\n"
            f"documents: [{begin}, {end}) of {len(indexed_dataset)}\n"
            f"tokens in split: {int(indexed_dataset.sequence_lengths[begin:end].sum(dtype=np.int64))}\n"
            f"num_samples: {num_samples}\nseq_length: {seq_length}\nseed: {seed}\n"
        )
        digest = hashlib.md5(self.description.encode()).hexdigest()
        stem = os.path.join(self.cache_dir, f"{os.path.basename(prefix)}_{name}_{digest}")
        self.cache_paths = {k: f"{stem}_{k}.npy" for k in ("doc_idx", "sample_idx", "shuffle_idx")}
        paths = list(self.cache_paths.values())
        if is_builder and not all(os.path.exists(p) for p in paths):
            self._build_and_save(stem)
        elif not is_builder:
            wait_for_files(paths, barrier_timeout_s)
        self._load()

    def _build_and_save(self, stem: str) -> None:
        start_time = time.time()
        begin, end = self.document_range
        sizes = np.ascontiguousarray(self.indexed_dataset.sequence_lengths, dtype=np.int32)
        tokens_per_epoch = int(sizes[begin:end].sum(dtype=np.int64))
        if tokens_per_epoch == 0:
            raise ValueError(
                f"{self.name} split of {self.indexed_dataset.prefix}: documents [{begin}, {end}) hold no tokens"
            )
        num_epochs = _num_epochs(tokens_per_epoch, self.seq_length, self.num_samples)
        separate_last, from_full_epochs = False, 0
        if num_epochs > 1:
            from_full_epochs = ((num_epochs - 1) * tokens_per_epoch - 1) // self.seq_length
            last_epoch_samples = self.num_samples - from_full_epochs
            samples_per_epoch = (tokens_per_epoch - 1) // self.seq_length
            separate_last = last_epoch_samples < int(SEPARATE_LAST_EPOCH_THRESHOLD * samples_per_epoch)
        rng = np.random.RandomState(self.seed)
        documents = np.arange(begin, end, dtype=np.int64)
        doc_idx = _build_doc_idx(documents, num_epochs, rng, separate_last)
        sample_idx = _helpers_cpp.build_sample_idx(sizes, doc_idx, self.seq_length, num_epochs, tokens_per_epoch)
        total = sample_idx.shape[0] - 1
        shuffled_first = from_full_epochs if separate_last else total
        shuffle_idx = _build_shuffle_idx(shuffled_first, total, rng)
        os.makedirs(self.cache_dir, exist_ok=True)
        with open(f"{stem}_description.txt", "w") as f:
            f.write(self.description)
        # shuffle_idx last: the barrier waits for all three, and each appears complete by rename.
        for key, array in (("doc_idx", doc_idx), ("sample_idx", sample_idx), ("shuffle_idx", shuffle_idx)):
            _save_npy_atomic(self.cache_paths[key], array)
        logger.info(
            "built %s indices for %s: %d epochs, %d samples (separate last epoch: %s) in %.2fs",
            self.name, self.indexed_dataset.prefix, num_epochs, total, separate_last, time.time() - start_time,
        )

    def _load(self) -> None:
        self.doc_idx = np.load(self.cache_paths["doc_idx"], mmap_mode="r", allow_pickle=False)
        self.sample_idx = np.load(self.cache_paths["sample_idx"], mmap_mode="r", allow_pickle=False)
        self.shuffle_idx = np.load(self.cache_paths["shuffle_idx"], mmap_mode="r", allow_pickle=False)
        ok = (
            self.sample_idx.ndim == 2
            and self.sample_idx.shape[1] == 2
            and len(self.shuffle_idx) == self.sample_idx.shape[0] - 1
            and len(self.shuffle_idx) >= self.num_samples
        )
        if not ok:
            raise ValueError(f"inconsistent dataset index cache {self.cache_paths}; delete these files to rebuild")

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {self.name} dataset of {len(self)} samples")
        j = int(self.shuffle_idx[idx])
        first, first_offset = (int(v) for v in self.sample_idx[j])
        last, last_offset = (int(v) for v in self.sample_idx[j + 1])
        ds, doc_idx = self.indexed_dataset, self.doc_idx
        if first == last:
            text = ds.get(int(doc_idx[first]), first_offset, last_offset - first_offset + 1)
        else:
            parts = [ds.get(int(doc_idx[first]), first_offset)]
            parts += [ds.get(int(doc_idx[k])) for k in range(first + 1, last)]
            parts.append(ds.get(int(doc_idx[last]), 0, last_offset + 1))
            text = np.concatenate(parts)
        return {"text": text.astype(np.int64)}

    # Spawned DataLoader workers re-open the memory maps instead of pickling the arrays' contents.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("doc_idx", "sample_idx", "shuffle_idx"):
            del state[key]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._load()


class BlendedDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from several datasets in proportion to ``weights`` (greedy, deterministic)."""

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset], weights: Sequence[float], size: int) -> None:
        if len(datasets) == 0 or len(datasets) != len(weights):
            raise ValueError(f"need one weight per dataset, got {len(datasets)} datasets, {len(weights)} weights")
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(f"blend weights must be finite, >= 0 and not all zero, got {list(weights)}")
        self.datasets = list(datasets)
        self.weights = w / w.sum()
        self.size = int(size)
        self.dataset_index, self.dataset_sample_index = _helpers_cpp.build_blending_indices(self.weights, self.size)
        counts = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, (count, dataset) in enumerate(zip(counts, self.datasets)):
            if count > len(dataset):
                raise ValueError(f"blended dataset {d} needs {count} samples but has only {len(dataset)}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} out of range for blended dataset of {self.size} samples")
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]


class MockGPTDataset(torch.utils.data.Dataset):
    """Synthetic uniform tokens; item i depends only on (seed, i), so any sampler order is reproducible."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int = 1234) -> None:
        if num_samples < 0 or seq_length <= 0 or vocab_size <= 0 or seed < 0:
            raise ValueError(
                f"MockGPTDataset needs num_samples >= 0, seq_length > 0, vocab_size > 0, seed >= 0; got "
                f"{num_samples}, {seq_length}, {vocab_size}, {seed}"
            )
        self.num_samples, self.seq_length, self.vocab_size, self.seed = num_samples, seq_length, vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for mock dataset of {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, idx])
        return {"text": rng.integers(0, self.vocab_size, self.seq_length + 1, dtype=np.int64)}


def _parse_data_prefix(data_prefix: Sequence[str]) -> tuple[list[str], list[float]]:
    """Megatron's ``--data-path``: ``[prefix]`` or ``[w1, prefix1, w2, prefix2, ...]``."""
    items = list(data_prefix)
    if len(items) == 1:
        return items, [1.0]
    if len(items) == 0 or len(items) % 2:
        raise ValueError(f"data_prefix must be [prefix] or [weight, prefix, ...] pairs, got {items}")
    try:
        weights = [float(w) for w in items[0::2]]
    except ValueError:
        raise ValueError(f"data_prefix pairs must start with a numeric weight, got {items}") from None
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"data_prefix weights must be >= 0 and not all zero, got {weights}")
    total = sum(weights)
    return items[1::2], [w / total for w in weights]


def _build_split_datasets(prefix, split, num_samples, seq_length, seed, cache_dir, is_builder, mmap_bin=True) -> list:
    if not IndexedDataset.exists(prefix):
        raise FileNotFoundError(
            f"dataset prefix {prefix!r} not found: expected {data_file_path(prefix)} and {index_file_path(prefix)}"
        )
    indexed = IndexedDataset(prefix, mmap_bin=mmap_bin)
    ranges = split_document_ranges(parse_split(split), len(indexed))
    out = []
    for name, (begin, end), n in zip(SPLIT_NAMES, ranges, num_samples):
        if end <= begin:
            out.append(None)
            continue
        out.append(GPTDataset(name, indexed, (begin, end), n, seq_length, seed, cache_dir, is_builder))
    return out


def build_train_valid_test_datasets(
    data_prefix: list[str],
    split: str,
    train_valid_test_num_samples: tuple[int, int, int],
    seq_length: int,
    seed: int,
    cache_dir: Optional[str] = None,
    is_builder: bool = True,
    mmap_bin: bool = True,
) -> tuple:
    """(train, valid, test) datasets; a split with no documents is None; several prefixes are blended."""
    nums = [int(n) for n in train_valid_test_num_samples]
    if len(nums) != 3 or any(n < 0 for n in nums):
        raise ValueError(f"train_valid_test_num_samples must be three counts >= 0, got {train_valid_test_num_samples}")
    return _blend(data_prefix, split, nums, seq_length, seed, cache_dir, is_builder, mmap_bin)


def build_dataset(data_prefix: list[str], split_index: int, num_samples: int, seq_length: int, seed: int,
                  cache_dir: Optional[str] = None, is_builder: bool = True, mmap_bin: bool = True):
    """One split's dataset over whole files (Megatron's --train-data-path / --valid-data-path / --test-data-path,
    each optionally a weighted blend): every document of the files belongs to split `split_index` (0, 1, 2)."""
    nums = [num_samples if k == split_index else 0 for k in range(3)]
    split = ",".join("1" if k == split_index else "0" for k in range(3))
    return _blend(data_prefix, split, nums, seq_length, seed, cache_dir, is_builder, mmap_bin)[split_index]


def _blend(data_prefix, split, nums, seq_length, seed, cache_dir, is_builder, mmap_bin) -> tuple:
    prefixes, weights = _parse_data_prefix(data_prefix)
    if len(prefixes) == 1:
        return tuple(_build_split_datasets(prefixes[0], split, nums, seq_length, seed, cache_dir, is_builder,
                                           mmap_bin))
    per_prefix = []
    for prefix, w in zip(prefixes, weights):
        inflated = [int(math.ceil(n * w * BLEND_OVERSAMPLE)) for n in nums]
        per_prefix.append(_build_split_datasets(prefix, split, inflated, seq_length, seed, cache_dir, is_builder,
                                                mmap_bin))
    blended = []
    for k in range(3):
        members = [(ds[k], w) for ds, w in zip(per_prefix, weights) if ds[k] is not None]
        if not members or not nums[k]:
            blended.append(None)
            continue
        blended.append(BlendedDataset([m for m, _ in members], [w for _, w in members], nums[k]))
    return tuple(blended)
