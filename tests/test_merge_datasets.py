"""tools/merge_datasets.py: Megatron's flags and order (every pair in --input, by name), byte-identical to
preprocessing the inputs as one corpus, and clear refusals before anything is written."""
import glob
import os
import subprocess
import sys

import numpy as np

from megagpt.data import preprocess as pp
from megagpt.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "data", "shakespeare_small.jsonl")
TOOL = os.path.join(ROOT, "tools", "merge_datasets.py")


def _merge(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=120)


def _bytes(prefix):
    return [open(f"{prefix}.{ext}", "rb").read() for ext in ("bin", "idx")]


def test_merging_per_input_outputs_equals_one_run_over_all_inputs(tmp_path):
    lines = open(FIXTURE, "rb").read().splitlines(keepends=True)
    inputs = []
    for i, part in enumerate((lines[:40], lines[40:41], lines[41:])):
        path = tmp_path / "in" / f"shard{i}.jsonl"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"".join(part))
        inputs.append(str(path))
    common = dict(input=inputs, append_eod=True, progress=False, log_interval=0)
    pp.preprocess(pp.PreprocessConfig(output_prefix=str(tmp_path / "shards" / "c"), output_per_input=True, **common))
    pp.preprocess(pp.PreprocessConfig(output_prefix=str(tmp_path / "whole"), **common))
    assert os.path.exists(tmp_path / "shards" / "c.progress.jsonl")  # not a dataset: the merge ignores it
    r = _merge("--input", str(tmp_path / "shards"), "--output-prefix", str(tmp_path / "out" / "merged"))
    assert r.returncode == 0, r.stderr
    assert "merged 3 datasets: 82 documents" in r.stderr
    assert _bytes(str(tmp_path / "out" / "merged")) == _bytes(str(tmp_path / "whole_text_document"))


def _dataset(prefix, docs, dtype=np.uint16):
    with IndexedDatasetBuilder(prefix, dtype) as b:
        for d in docs:
            b.add_document(np.array(d))


def test_name_order_and_refusals(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    _dataset(str(d / "b"), [[3, 4]])
    _dataset(str(d / "a"), [[1], [2]])
    assert _merge("--input", str(d), "--output-prefix", str(tmp_path / "m")).returncode == 0
    merged = IndexedDataset(str(tmp_path / "m"))
    assert [x.tolist() for x in merged] == [[1], [2], [3, 4]]

    r = _merge("--input", str(d), "--output-prefix", str(tmp_path / "mm"), "--multimodal")
    assert r.returncode == 2 and "not supported" in r.stderr
    _dataset(str(d / "c"), [[5]], dtype=np.int32)
    r = _merge("--input", str(d), "--output-prefix", str(tmp_path / "x"))
    assert r.returncode == 2 and "different dtypes" in r.stderr
    os.remove(d / "c.idx")
    r = _merge("--input", str(d), "--output-prefix", str(tmp_path / "x"))
    assert r.returncode == 2 and "c: .idx file missing" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _merge("--input", str(empty), "--output-prefix", str(tmp_path / "x"))
    assert r.returncode == 2 and "no .bin/.idx pairs" in r.stderr
    assert not glob.glob(str(tmp_path / "x*")) and not glob.glob(str(tmp_path / "mm*"))
