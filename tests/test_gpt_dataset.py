"""Sample/blending index helpers against slow Python references; GPTDataset, BlendedDataset, splits, caching."""
import os
import pickle
import threading
import time

import numpy as np
import pytest

from megagpt.data import _helpers_cpp, gpt_dataset
from megagpt.data.gpt_dataset import (
    BlendedDataset,
    GPTDataset,
    MockGPTDataset,
    build_train_valid_test_datasets,
    parse_split,
    split_document_ranges,
)
from megagpt.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder


def reference_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch):
    """Slow transcription of the rule: walk token by token, a sample boundary every seq_length tokens."""
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    positions = [(p, off) for p, doc in enumerate(doc_idx) for off in range(sizes[doc])]
    # Sample 0 starts at entry (0, 0) even when the first document is empty.
    starts = [(0, 0)] + [positions[i * seq_length] for i in range(1, num_samples + 1)]
    return np.array(starts, dtype=np.int64).reshape(-1, 2)


def reference_blending(weights, size):
    counts = [0] * len(weights)
    index, sample = [], []
    for i in range(size):
        errors = [w * max(i, 1.0) - c for w, c in zip(weights, counts)]
        d = errors.index(max(errors))
        index.append(d)
        sample.append(counts[d])
        counts[d] += 1
    return index, sample


@pytest.mark.parametrize("seed", range(6))
def test_build_sample_idx_matches_reference_and_covers_tokens(seed):
    rng = np.random.default_rng(seed)
    num_docs = int(rng.integers(1, 30))
    sizes = rng.integers(0, 40, num_docs).astype(np.int32)
    sizes[0] = max(sizes[0], 1)
    num_epochs, seq_length = int(rng.integers(1, 4)), int(rng.integers(1, 50))
    tokens_per_epoch = int(sizes.sum())
    doc_idx = np.tile(np.arange(num_docs, dtype=np.int32), num_epochs)
    rng.shuffle(doc_idx)
    for idx_dtype in (np.int32, np.int64):
        got = _helpers_cpp.build_sample_idx(sizes, doc_idx.astype(idx_dtype), seq_length, num_epochs, tokens_per_epoch)
        assert got.dtype == np.int64
        expected = reference_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch)
        np.testing.assert_array_equal(got, expected)
    # Reading the samples back: each token of the stream appears once, except one shared token per boundary.
    token_ids = [np.arange(s) + 1000 * d for d, s in enumerate(sizes)]
    stream = np.concatenate([token_ids[d] for d in doc_idx])
    samples = []
    for i in range(len(got) - 1):
        (p0, o0), (p1, o1) = got[i], got[i + 1]
        if p0 == p1:
            sample = token_ids[doc_idx[p0]][o0 : o1 + 1]
        else:
            parts = [token_ids[doc_idx[p0]][o0:]] + [token_ids[doc_idx[p]] for p in range(p0 + 1, p1)]
            sample = np.concatenate(parts + [token_ids[doc_idx[p1]][: o1 + 1]])
        assert len(sample) == seq_length + 1
        samples.append(sample)
    if samples:
        joined = np.concatenate([samples[0]] + [s[1:] for s in samples[1:]])
        np.testing.assert_array_equal(joined, stream[: len(joined)])
        assert len(stream) - len(joined) < seq_length  # nothing usable left over


def test_build_sample_idx_errors():
    sizes = np.array([5, 5], np.int32)
    with pytest.raises(ValueError, match="ran out of tokens"):
        _helpers_cpp.build_sample_idx(sizes, np.array([0], np.int32), 2, 1, 10)
    with pytest.raises(ValueError, match="outside sizes"):
        _helpers_cpp.build_sample_idx(sizes, np.array([0, 7], np.int32), 2, 1, 10)
    with pytest.raises(TypeError, match="sizes must have dtype int32"):
        _helpers_cpp.build_sample_idx(sizes.astype(np.int64), np.array([0, 1], np.int32), 2, 1, 10)
    with pytest.raises(ValueError, match="seq_length must be positive"):
        _helpers_cpp.build_sample_idx(sizes, np.array([0, 1], np.int32), 0, 1, 10)


@pytest.mark.parametrize("weights, size", [([0.3, 0.7], 1000), ([0.5, 0.25, 0.125, 0.125], 777), ([1.0], 10)])
def test_blending_indices_match_reference_and_weights(weights, size):
    index, sample = _helpers_cpp.build_blending_indices(np.array(weights), size)
    assert index.dtype == np.uint8 and sample.dtype == np.int64
    ref_index, ref_sample = reference_blending(weights, size)
    np.testing.assert_array_equal(index, ref_index)
    np.testing.assert_array_equal(sample, ref_sample)
    counts = np.bincount(index, minlength=len(weights))
    assert np.abs(counts - np.array(weights) * size).max() <= 1.0
    for d in range(len(weights)):  # each dataset's samples are taken in order 0, 1, 2, ...
        np.testing.assert_array_equal(sample[index == d], np.arange(counts[d]))


def test_blending_many_datasets_uses_int16():
    weights = np.full(300, 1 / 300)
    index, _ = _helpers_cpp.build_blending_indices(weights, 900)
    assert index.dtype == np.int16 and np.array_equal(np.bincount(index), np.full(300, 3))


def test_parse_split_and_ranges():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.030, 0.001])
    assert parse_split("1") == [1.0, 0.0, 0.0]
    assert parse_split("2/2") == [0.5, 0.5, 0.0]
    for bad in ("a,b", "1,2,3,4", "0,0,0", "-1,2", ""):
        with pytest.raises(ValueError, match="bad split"):
            parse_split(bad)
    assert split_document_ranges(parse_split("969,30,1"), 1000) == [(0, 969), (969, 999), (999, 1000)]
    # Megatron rounds each part (6, 1, 1 -> ends 6, 7, 8) and shifts every end back by the excess (1).
    assert split_document_ranges(parse_split("8,1,1"), 7) == [(0, 5), (5, 6), (6, 7)]
    assert split_document_ranges(parse_split("1,0,0"), 7) == [(0, 7), (7, 7), (7, 7)]


def make_corpus(tmp_path, num_docs=60, seed=0, name="corpus"):
    """Document d holds tokens d*100 + k, so every token names its document."""
    rng = np.random.default_rng(seed)
    prefix = str(tmp_path / name)
    with IndexedDatasetBuilder(prefix, np.int32) as builder:
        for d in range(num_docs):
            builder.add_document(d * 100 + np.arange(rng.integers(0 if d % 7 else 1, 60)))
    return prefix


def test_gpt_dataset_items_follow_doc_order_and_cache(tmp_path):
    prefix = make_corpus(tmp_path)
    ds_index = IndexedDataset(prefix)
    seq = 16
    ds = GPTDataset("train", ds_index, (0, 50), 300, seq, seed=7)
    assert len(ds) >= 300
    # Reference: the concatenation of documents in doc_idx order, sample i at shuffle_idx[i] * seq.
    assert set(np.unique(ds.doc_idx)) == set(range(50))
    stream = np.concatenate([ds_index[d] for d in ds.doc_idx]).astype(np.int64)
    for i in range(len(ds)):
        item = ds[i]["text"]
        j = int(ds.shuffle_idx[i])
        assert item.dtype == np.int64 and item.shape == (seq + 1,)
        np.testing.assert_array_equal(item, stream[j * seq : j * seq + seq + 1])
        assert (item // 100 < 50).all()  # only train documents
    assert sorted(ds.shuffle_idx) == list(range(len(ds)))
    files = sorted(os.listdir(tmp_path))
    assert sum(name.endswith(".npy") for name in files) == 3 and not any(".tmp-" in n for n in files)
    mtimes = {p: os.stat(p).st_mtime_ns for p in ds.cache_paths.values()}
    time.sleep(0.01)

    def fail(*args, **kwargs):
        raise AssertionError("cache hit expected, but the sample index was rebuilt")

    gpt_dataset._helpers_cpp, saved = type("M", (), {"build_sample_idx": staticmethod(fail)}), gpt_dataset._helpers_cpp
    try:
        again = GPTDataset("train", IndexedDataset(prefix), (0, 50), 300, seq, seed=7)
    finally:
        gpt_dataset._helpers_cpp = saved
    assert {p: os.stat(p).st_mtime_ns for p in again.cache_paths.values()} == mtimes
    for i in range(0, len(ds), 7):
        np.testing.assert_array_equal(again[i]["text"], ds[i]["text"])
    other_seed = GPTDataset("train", ds_index, (0, 50), 300, seq, seed=8)
    assert other_seed.cache_paths != ds.cache_paths
    assert not np.array_equal(other_seed.shuffle_idx, ds.shuffle_idx)


def test_gpt_dataset_deterministic_across_cache_dirs_and_pickle(tmp_path):
    prefix = make_corpus(tmp_path)
    a = GPTDataset("valid", IndexedDataset(prefix), (50, 60), 40, 8, 3, cache_dir=str(tmp_path / "c1"))
    b = GPTDataset("valid", IndexedDataset(prefix), (50, 60), 40, 8, 3, cache_dir=str(tmp_path / "c2"))
    c = pickle.loads(pickle.dumps(a))
    assert len(pickle.dumps(a)) < 4000
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i]["text"], b[i]["text"])
        np.testing.assert_array_equal(a[i]["text"], c[i]["text"])
        assert ((a[i]["text"] // 100 >= 50) & (a[i]["text"] // 100 < 60)).all()


def test_doc_idx_separate_last_epoch_rule(tmp_path):
    prefix = make_corpus(tmp_path, num_docs=40)
    index = IndexedDataset(prefix)
    tokens = int(index.sequence_lengths.sum())
    seq = 10
    per_epoch = (tokens - 1) // seq
    docs = np.arange(40)
    for last_fraction, separate in ((0.1, True), (0.9, False)):
        from_two = (2 * tokens - 1) // seq
        num_samples = from_two + int(last_fraction * per_epoch)
        ds = GPTDataset("train", index, (0, 40), num_samples, seq, seed=5, cache_dir=str(tmp_path / str(separate)))
        assert len(ds.doc_idx) == 3 * 40
        rng = np.random.RandomState(5)
        if separate:
            first = np.tile(docs, 2)
            rng.shuffle(first)
            last = docs.copy()
            rng.shuffle(last)
            expected = np.concatenate([first, last])
        else:
            expected = np.tile(docs, 3)
            rng.shuffle(expected)
        np.testing.assert_array_equal(ds.doc_idx, expected)
        total = len(ds)
        shuffled_first = from_two if separate else total
        expected_shuffle = np.arange(shuffled_first)
        rng.shuffle(expected_shuffle)
        if separate:
            rest = np.arange(shuffled_first, total)
            rng.shuffle(rest)
            expected_shuffle = np.concatenate([expected_shuffle, rest])
        np.testing.assert_array_equal(ds.shuffle_idx, expected_shuffle)


def test_non_builder_waits_for_files_then_times_out(tmp_path):
    prefix = make_corpus(tmp_path)
    index = IndexedDataset(prefix)
    with pytest.raises(TimeoutError, match=r"still missing: .*_doc_idx\.npy"):
        GPTDataset("train", index, (0, 50), 10, 8, 1, cache_dir=str(tmp_path / "w"), is_builder=False,
                   barrier_timeout_s=0.3)
    result = {}
    waiter = threading.Thread(
        target=lambda: result.update(ds=GPTDataset("train", index, (0, 50), 10, 8, 1, cache_dir=str(tmp_path / "w"),
                                                   is_builder=False, barrier_timeout_s=10))
    )
    waiter.start()
    time.sleep(0.3)
    built = GPTDataset("train", index, (0, 50), 10, 8, 1, cache_dir=str(tmp_path / "w"))
    waiter.join()
    np.testing.assert_array_equal(result["ds"][3]["text"], built[3]["text"])


def test_build_train_valid_test_single_and_blended(tmp_path):
    pa, pb = make_corpus(tmp_path, 60, 0, "a"), make_corpus(tmp_path, 30, 1, "b")
    train, valid, test = build_train_valid_test_datasets([pa], "8,2,0", (100, 20, 5), 8, 1234)
    assert isinstance(train, GPTDataset) and isinstance(valid, GPTDataset) and test is None
    assert train.document_range == (0, 48) and valid.document_range == (48, 60)
    assert len(train) >= 100 and len(valid) >= 20
    train, valid, test = build_train_valid_test_datasets(["0.25", pa, "0.75", pb], "1,1,0", (400, 40, 0), 8, 1,
                                                         cache_dir=str(tmp_path / "cache"))
    assert isinstance(train, BlendedDataset) and len(train) == 400 and len(valid) == 40 and test is None
    counts = np.bincount(train.dataset_index)
    assert abs(counts[0] - 100) <= 1 and abs(counts[1] - 300) <= 1
    assert train.datasets[0].num_samples == int(np.ceil(400 * 0.25 * 1.005))
    first_docs = [train[i]["text"][0] // 100 for i in range(len(train))]
    assert max(first_docs) < 30  # train split of each corpus: first half of its documents
    with pytest.raises(FileNotFoundError, match=r"missing.*expected .*missing\.bin and .*missing\.idx"):
        build_train_valid_test_datasets([str(tmp_path / "missing")], "1", (1, 0, 0), 8, 1)
    with pytest.raises(ValueError, match="numeric weight"):
        build_train_valid_test_datasets([pa, pb], "1", (1, 0, 0), 8, 1)


def test_blended_dataset_checks_sizes():
    small, big = MockGPTDataset(10, 4, 50, 0), MockGPTDataset(100, 4, 50, 1)
    with pytest.raises(ValueError, match="needs 50 samples but has only 10"):
        BlendedDataset([small, big], [1, 1], 100)
    blend = BlendedDataset([small, big], [1, 3], 40)
    # Greedy: step 0 lags most on the 0.75 dataset, step 1 on the 0.25 one.
    np.testing.assert_array_equal(blend[0]["text"], big[0]["text"])
    np.testing.assert_array_equal(blend[1]["text"], small[0]["text"])
    np.testing.assert_array_equal(blend[2]["text"], big[1]["text"])


def test_mock_dataset_depends_only_on_seed_and_index():
    a, b = MockGPTDataset(100, 32, 1000, seed=3), MockGPTDataset(5000, 32, 1000, seed=3)
    assert a[17]["text"].shape == (33,) and a[17]["text"].dtype == np.int64
    np.testing.assert_array_equal(a[17]["text"], b[17]["text"])
    assert not np.array_equal(a[17]["text"], a[18]["text"])
    assert not np.array_equal(a[17]["text"], MockGPTDataset(100, 32, 1000, seed=4)[17]["text"])
    assert 0 <= min(a[i]["text"].min() for i in range(100)) and max(a[i]["text"].max() for i in range(100)) < 1000
