"""IndexedDatasetBuilder (C++) and IndexedDataset (mmap reader): format bytes, round trips, corruption."""
import os
import pickle
import struct

import numpy as np
import pytest

from megagpt.data.indexed_dataset import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    best_dtype,
    data_file_path,
    index_file_path,
    merge_datasets,
)


def random_documents(rng, n, vocab, max_len=50):
    docs = [rng.integers(0, vocab, rng.integers(0, max_len)) for _ in range(n)]
    docs[3] = np.zeros(0, dtype=np.int64)  # empty document
    docs[5] = np.array([vocab - 1])  # one-token document holding the largest id
    docs[7] = np.zeros(0, dtype=np.int64)
    return docs


def write(prefix, docs, dtype):
    with IndexedDatasetBuilder(str(prefix), dtype) as builder:
        for doc in docs:
            builder.add_document(doc)
    return str(prefix)


def expected_idx_bytes(lengths, code, itemsize):
    """The .idx layout of DESIGN.md written out by hand."""
    s = len(lengths)
    out = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    out += struct.pack("<Q", s) + struct.pack("<Q", s + 1)
    out += b"".join(struct.pack("<i", n) for n in lengths)
    pointer = 0
    for n in lengths:
        out += struct.pack("<q", pointer)
        pointer += n * itemsize
    out += b"".join(struct.pack("<q", d) for d in range(s + 1))
    return out


def test_dtype_codes_and_paths():
    assert {c: str(d) for c, d in DTYPE_CODES.items()} == {
        1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64", 7: "float32", 8: "uint16"
    }
    assert best_dtype(50257) == np.uint16 and best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32 and best_dtype(128000) == np.int32
    assert data_file_path("/a/b") == "/a/b.bin" and index_file_path("/a/b") == "/a/b.idx"


@pytest.mark.parametrize("dtype, vocab", [(np.uint16, 65535), (np.int32, 2**31 - 1)])
def test_round_trip(tmp_path, dtype, vocab):
    rng = np.random.default_rng(0)
    docs = random_documents(rng, 40, vocab)
    prefix = write(tmp_path / "ds", docs, dtype)
    ds = IndexedDataset(prefix)
    assert len(ds) == len(docs) and ds.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(ds.sequence_lengths, [len(d) for d in docs])
    np.testing.assert_array_equal(ds.document_indices, np.arange(len(docs) + 1))
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ds[i], doc)
        assert ds[i].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(ds[-1], docs[-1])
    np.testing.assert_array_equal(ds.get(0, offset=2, length=3), docs[0][2:5])
    assert [len(x) for x in ds[2:6]] == [len(d) for d in docs[2:6]]
    # .bin is exactly the concatenated tokens, no header.
    with open(data_file_path(prefix), "rb") as f:
        assert f.read() == np.concatenate(docs).astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    assert not any(".tmp-" in name for name in os.listdir(tmp_path))


def test_idx_bytes_match_hand_written_layout(tmp_path):
    docs = [np.array([5, 6, 7]), np.array([], dtype=np.int64), np.array([9]), np.arange(10)]
    for dtype, code, itemsize in [(np.uint16, 8, 2), (np.int32, 4, 4), (np.uint8, 1, 1), (np.int64, 5, 8)]:
        prefix = write(tmp_path / f"ds_{code}", docs, dtype)
        with open(index_file_path(prefix), "rb") as f:
            assert f.read() == expected_idx_bytes([3, 0, 1, 10], code, itemsize)


def test_items_are_read_only_views(tmp_path):
    prefix = write(tmp_path / "ds", [np.arange(100), np.arange(7)], np.uint16)
    ds = IndexedDataset(prefix)
    item = ds[1]
    assert not item.flags.owndata and not item.flags.writeable
    assert np.shares_memory(item, ds.get(1, offset=3))


def test_input_dtypes_and_lists(tmp_path):
    docs = [np.array([1, 2], np.uint8), np.array([3], np.int16), [4, 5, 6], np.array([7], np.uint64), []]
    docs.append(np.arange(12)[::3])  # strided input
    prefix = write(tmp_path / "ds", docs, np.int32)
    ds = IndexedDataset(prefix)
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ds[i], np.asarray(doc, dtype=np.int64))
    with IndexedDatasetBuilder(str(tmp_path / "bad"), np.int32) as builder:
        with pytest.raises(TypeError, match="integer"):
            builder.add_document(np.array([1.5]))
        with pytest.raises(ValueError, match="1-D"):
            builder.add_document(np.zeros((2, 2), np.int64))


def test_out_of_range_token_raises_and_keeps_builder_consistent(tmp_path):
    prefix = str(tmp_path / "ds")
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        builder.add_document(np.array([1, 2, 3]))
        with pytest.raises(ValueError, match="token id 70000 at position 2"):
            builder.add_document(np.array([4, 5, 70000, 6]))
        with pytest.raises(ValueError, match="token id -1 "):
            builder.add_document(np.array([-1]))
        builder.add_document(np.array([65535, 0]))
        assert builder.documents == 2 and builder.tokens == 5
    ds = IndexedDataset(prefix)
    assert [list(x) for x in ds] == [[1, 2, 3], [65535, 0]]
    with IndexedDatasetBuilder(str(tmp_path / "i8"), np.int8) as builder:
        with pytest.raises(ValueError, match=r"token id 128 .*int8 \[-128, 127\]"):
            builder.add_document(np.array([127, 128]))
        with pytest.raises(ValueError, match="out of range for int8"):
            builder.add_document(np.array([2**63 - 1], np.uint64))


def test_exception_deletes_temp_files_and_keeps_old_output(tmp_path):
    prefix = write(tmp_path / "ds", [np.array([1, 2])], np.uint16)
    before = {p: open(p, "rb").read() for p in (data_file_path(prefix), index_file_path(prefix))}
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetBuilder(prefix, np.uint16) as builder:
            builder.add_document(np.arange(1000))
            assert any(".tmp-" in name for name in os.listdir(tmp_path))
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]
    assert {p: open(p, "rb").read() for p in before} == before
    with pytest.raises(RuntimeError, match="aborted"):
        builder.add_document([1])


def test_finalize_twice_and_abort_without_output(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "x"), np.uint16)
    builder.add_document([1])
    builder.abort()
    assert os.listdir(tmp_path) == []
    builder = IndexedDatasetBuilder(str(tmp_path / "y"), np.uint16)
    builder.finalize()
    with pytest.raises(RuntimeError, match="finalized"):
        builder.finalize()
    assert len(IndexedDataset(str(tmp_path / "y"))) == 0  # empty dataset: 0-byte .bin is valid


def test_merge(tmp_path):
    rng = np.random.default_rng(1)
    a, b = random_documents(rng, 20, 1000), random_documents(rng, 15, 1000)
    pa, pb = write(tmp_path / "a", a, np.uint16), write(tmp_path / "b", b, np.uint16)
    merge_datasets([pa, pb, pa], str(tmp_path / "m"))
    merged = IndexedDataset(str(tmp_path / "m"))
    expected = a + b + a
    assert len(merged) == len(expected)
    for i, doc in enumerate(expected):
        np.testing.assert_array_equal(merged[i], doc)
    lengths = [len(d) for d in expected]
    with open(index_file_path(str(tmp_path / "m")), "rb") as f:
        assert f.read() == expected_idx_bytes(lengths, 8, 2)
    pc = write(tmp_path / "c", [np.array([1])], np.int32)
    with pytest.raises(ValueError, match="different dtypes"):
        merge_datasets([pa, pc], str(tmp_path / "bad"))
    assert not IndexedDataset.exists(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="at least one"):
        merge_datasets([], str(tmp_path / "bad"))


def corrupt(tmp_path, mutate_idx=None, bin_bytes=None):
    prefix = write(tmp_path / "ds", [np.arange(10), np.arange(5)], np.uint16)
    if mutate_idx is not None:
        data = bytearray(open(index_file_path(prefix), "rb").read())
        open(index_file_path(prefix), "wb").write(mutate_idx(data))
    if bin_bytes is not None:
        data = open(data_file_path(prefix), "rb").read()
        open(data_file_path(prefix), "wb").write(data[:bin_bytes])
    return prefix


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: b"XXIDIDX\x00\x00" + d[9:], r"corrupt index .*ds\.idx: bad magic b'XXIDIDX"),
        (lambda d: d[:20], r"corrupt index .*ds\.idx: truncated header: 20 bytes"),
        (lambda d: d[:-3], r"corrupt index .*ds\.idx: file is \d+ bytes but S=2, D=3 need"),
        (lambda d: d[:9] + struct.pack("<Q", 2) + d[17:], r"unsupported version 2; expected 1"),
        (lambda d: d[:17] + b"\x09" + d[18:], r"unknown dtype code 9"),
        (lambda d: d[:50] + struct.pack("<q", 4) + d[58:], r"sequence 1 starts at byte 4, expected 20"),
        (lambda d: d[:-8] + struct.pack("<q", 1), r"document indices run 0..1; expected 0..2"),
    ],
)
def test_corrupt_index_raises_clear_error(tmp_path, mutate, message):
    prefix = corrupt(tmp_path, mutate_idx=mutate)
    with pytest.raises(IndexedDatasetError, match=message):
        IndexedDataset(prefix)


def test_short_bin_raises_clear_error(tmp_path):
    prefix = corrupt(tmp_path, bin_bytes=28)
    with pytest.raises(IndexedDatasetError, match=r"data file .*ds\.bin is 28 bytes but its index .* needs 30"):
        IndexedDataset(prefix)
    assert issubclass(IndexedDatasetError, ValueError)


def test_missing_files_and_exists(tmp_path):
    prefix = str(tmp_path / "nope")
    assert not IndexedDataset.exists(prefix)
    with pytest.raises(FileNotFoundError, match=r"nope\.bin and .*nope\.idx"):
        IndexedDataset(prefix)
    write(tmp_path / "yes", [[1]], np.uint16)
    assert IndexedDataset.exists(str(tmp_path / "yes"))


def test_pickle_reopens_maps(tmp_path):
    prefix = write(tmp_path / "ds", [np.arange(9), np.arange(4)], np.int32)
    ds = pickle.loads(pickle.dumps(IndexedDataset(prefix)))
    np.testing.assert_array_equal(ds[0], np.arange(9))
    assert len(pickle.dumps(IndexedDataset(prefix))) < 300  # the prefix, not the data
