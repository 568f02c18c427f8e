"""Preprocessing: bad lines skipped and reported by line number, output equal to tokenizing the good lines,
worker-count independence (byte-identical), bounded read-ahead, atomic failure, the CLI, and the corpus tool."""
import glob
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megagpt.data import preprocess as pp
from megagpt.data.indexed_dataset import IndexedDataset
from megagpt.data.tokenizer import GPT2BPETokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "data", "shakespeare_small.jsonl")


def _good(text, **extra):
    return json.dumps({"text": text, **extra}).encode() + b"\n"


def _write_messy(path):
    """A JSONL file with every kind of bad line; returns (good texts in order, {line_no: reason prefix})."""
    lines = [
        _good("First good line."),                      # 1
        b'{"text": "unterminated\n',                    # 2 malformed JSON
        json.dumps({"body": "no text key"}).encode() + b"\n",  # 3 missing key
        json.dumps({"text": ["a", "list"]}).encode() + b"\n",  # 4 non-string
        b'{"text": "bad byte \xff\xfe here"}\n',        # 5 invalid UTF-8
        b"\n",                                          # 6 blank: ignored, not counted
        _good("Second good line, with unicode: caf\u00e9 \u65e5\u672c \U0001f916"),  # 7
        b"[1, 2, 3]\n",                                 # 8 not an object
        b'{"text": "lone \\ud800 surrogate"}\n',        # 9 valid JSON, invalid Unicode
        _good(""),                                      # 10 empty document
        json.dumps({"text": 7}).encode() + b"\n",       # 11 non-string
        _good("  Third good line\n\nwith newlines  "),  # 12, no trailing newline below
    ]
    lines[-1] = lines[-1].rstrip(b"\n")
    with open(path, "wb") as f:
        f.writelines(lines)
    good = ["First good line.", "Second good line, with unicode: caf\u00e9 \u65e5\u672c \U0001f916",
            "  Third good line\n\nwith newlines  "]
    bad = {2: "malformed JSON", 3: "missing key 'text'", 4: "key 'text' is not a string (list)",
           5: "invalid UTF-8", 8: "not a JSON object", 9: "text has lone surrogates", 11: "key 'text' is not a string (int)"}
    return good, bad


@pytest.fixture(scope="module")
def gpt2():
    return GPT2BPETokenizer()


def _read(prefix):
    ds = IndexedDataset(prefix)
    return [np.asarray(ds[i]).tolist() for i in range(len(ds))], ds.dtype


@pytest.mark.parametrize("append_eod", [False, True])
def test_bad_lines_skipped_and_reported(tmp_path, gpt2, append_eod):
    src = tmp_path / "messy.jsonl"
    good, bad = _write_messy(src)
    cfg = pp.PreprocessConfig(input=str(src), output_prefix=str(tmp_path / "out"), append_eod=append_eod,
                              progress=False, log_interval=0)
    s = pp.preprocess(cfg)
    assert [(b.line, b.path) for b in s.first_bad] == [(n, str(src)) for n in sorted(bad)]
    for b in s.first_bad:
        assert b.reason.startswith(bad[b.line])
    assert (s.skipped, s.empty, s.lines, s.documents) == (7, 1, 11, 3)
    assert s.bytes_read == os.path.getsize(src)
    docs, dtype = _read(str(tmp_path / "out_text_document"))
    expected = [gpt2.tokenize(t) + ([gpt2.eod] if append_eod else []) for t in good]
    assert docs == expected and dtype == np.uint16
    assert s.tokens == sum(map(len, expected))
    report = s.report()
    assert f"{src}:9: text has lone surrogates" in report and "skipped 7 bad lines" in report


def test_first_bad_capped_at_ten(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"not json\n" * 25 + _good("ok"))
    s = pp.preprocess(pp.PreprocessConfig(input=str(src), output_prefix=str(tmp_path / "o"),
                                          tokenizer_type="ByteTokenizer", progress=False, log_interval=0))
    assert s.skipped == 25 and s.skipped_by_reason == {"malformed JSON": 25}
    assert [b.line for b in s.first_bad] == list(range(1, 11))
    assert _read(str(tmp_path / "o_text_document"))[0] == [list(b"ok")]


def test_workers_byte_identical(tmp_path):
    outs = []
    for workers in (1, 2):
        prefix = str(tmp_path / f"w{workers}")
        cfg = pp.PreprocessConfig(input=FIXTURE, output_prefix=prefix, append_eod=True, workers=workers,
                                  chunk_bytes=16 * 1024, progress=False, log_interval=0)  # ~25 chunks
        s = pp.preprocess(cfg)
        assert s.documents == 82 and s.skipped == 0
        outs.append([open(f"{prefix}_text_document.{ext}", "rb").read() for ext in ("bin", "idx")])
    assert outs[0] == outs[1]


def test_several_keys_and_glob(tmp_path):
    """Two input files via a glob, two keys; line numbers are per file and key outputs stay aligned."""
    (tmp_path / "a.jsonl").write_bytes(_good("alpha", title="A") + _good("beta", title=""))
    (tmp_path / "b.jsonl").write_bytes(_good("gamma") + _good("delta", title="D"))
    cfg = pp.PreprocessConfig(input=str(tmp_path / "*.jsonl"), output_prefix=str(tmp_path / "k"),
                              json_keys=("text", "title"), tokenizer_type="ByteTokenizer", append_eod=True,
                              progress=False, log_interval=0)
    s = pp.preprocess(cfg)
    assert [(os.path.basename(b.path), b.line) for b in s.first_bad] == [("b.jsonl", 1)]
    assert s.empty == 1 and s.documents == 2  # "beta" has an empty title: skipped for both keys
    assert _read(str(tmp_path / "k_text_document"))[0] == [list(b"alpha") + [256], list(b"delta") + [256]]
    assert _read(str(tmp_path / "k_title_document"))[0] == [list(b"A") + [256], list(b"D") + [256]]


class _FakePool:
    """Runs tasks immediately; lets the test count how far the reader got ahead of the consumer."""

    class _Done:
        def __init__(self, value):
            self.value = value

        def result(self):
            return self.value

    def submit(self, fn, chunk):
        return self._Done(chunk)


def test_read_ahead_is_bounded():
    pulled = []

    def chunks():
        for i in range(100):
            pulled.append(i)
            yield i

    results = pp._ordered_results(None, _FakePool(), chunks(), in_flight=4)
    consumed = []
    for r in results:
        consumed.append(r)
        assert len(pulled) - len(consumed) <= 4 - 1
    assert consumed == list(range(100))


def test_iter_chunks_covers_every_line(tmp_path):
    src = tmp_path / "x.jsonl"
    lines = [f"line {i}\n".encode() * (i % 5 + 1) for i in range(50)]
    src.write_bytes(b"".join(lines))
    chunks = list(pp.iter_chunks([str(src)], chunk_bytes=100))
    assert len(chunks) > 5
    got = [(c.first_line + j, line) for c in chunks for j, line in enumerate(c.lines)]
    assert got == [(i + 1, line) for i, line in enumerate(b"".join(lines).splitlines(keepends=True))]


def test_failure_leaves_nothing(tmp_path, monkeypatch):
    prefix = str(tmp_path / "fail")
    calls = []

    def boom(self, chunk):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("disk on fire")
        return original(self, chunk)

    original = pp._Encoder.__call__
    monkeypatch.setattr(pp._Encoder, "__call__", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        pp.preprocess(pp.PreprocessConfig(input=FIXTURE, output_prefix=prefix, chunk_bytes=8192,
                                          progress=False, log_interval=0))
    assert glob.glob(prefix + "*") == []


def test_failure_keeps_previous_output(tmp_path):
    prefix = str(tmp_path / "keep")
    for ext in ("bin", "idx"):
        with open(f"{prefix}_text_document.{ext}", "wb") as f:
            f.write(b"old " + ext.encode())
    with pytest.raises(FileNotFoundError, match="missing.json"):
        pp.preprocess(pp.PreprocessConfig(input=FIXTURE, output_prefix=prefix, tokenizer_type="HuggingFaceTokenizer",
                                          tokenizer_model=str(tmp_path / "missing.json"), progress=False))
    assert sorted(os.listdir(tmp_path)) == ["keep_text_document.bin", "keep_text_document.idx"]
    assert open(f"{prefix}_text_document.idx", "rb").read() == b"old idx"


def test_cli_smoke(tmp_path, gpt2):
    prefix = str(tmp_path / "cli" / "shk")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", FIXTURE,
           "--output-prefix", prefix, "--tokenizer-type", "GPT2BPETokenizer", "--append-eod", "--workers", "1",
           "--log-interval", "50"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Done: 82 documents" in r.stderr and "Processed 50 documents" in r.stderr
    docs, _ = _read(prefix + "_text_document")
    with open(FIXTURE, encoding="utf-8") as f:
        first = json.loads(f.readline())["text"]
    assert len(docs) == 82 and docs[0] == gpt2.tokenize(first) + [gpt2.eod]

    bad = subprocess.run(cmd[:3] + [str(tmp_path / "nothing*.jsonl")] + cmd[4:], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "no input file matches" in bad.stderr


def test_no_torch_on_preprocess_path():
    code = "import sys; import megagpt.data.preprocess; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.stdout.strip() == "False", r.stderr


def _corpus_tool():
    spec = importlib.util.spec_from_file_location("make_demo_corpus", os.path.join(ROOT, "tools", "make_demo_corpus.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_corpus_tool_splits_scenes_and_strips_gutenberg():
    tool = _corpus_tool()
    raw = ("The Project Gutenberg EBook of Hamlet\r\nlicence blah\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n"
           "HAMLET\n\nPERSONS.\n\nACT I.\n\nSCENE I. Elsinore.\n\nBer.\nWho's there?\n\n"
           "SCENE II. A room.\n\nKing.\nScene civil wars, SCENE: not a heading.\n\n"
           "ACT II.\n\nPROLOGUE.\nChorus speaks.\n\nScene 1. A street.\n\nExeunt.\n"
           "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nmore licence\n")
    text = tool.strip_gutenberg(raw)
    assert text.startswith("HAMLET") and text.endswith("Exeunt.") and "\r" not in text
    assert tool.split_scenes(text) == [
        "HAMLET\n\nPERSONS.\n\nACT I.\n\nSCENE I. Elsinore.\n\nBer.\nWho's there?",
        "SCENE II. A room.\n\nKing.\nScene civil wars, SCENE: not a heading.",
        "ACT II.\n\nPROLOGUE.\nChorus speaks.\n\nScene 1. A street.\n\nExeunt.",
    ]
    assert tool.split_scenes("SONNETS\n\nI\nFrom fairest creatures\n") == ["SONNETS\n\nI\nFrom fairest creatures"]


def test_fixture_is_small_and_well_formed():
    assert os.path.getsize(FIXTURE) <= 400_000
    with open(FIXTURE, encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    assert len(docs) == 82 and all(set(d) == {"text"} and d["text"].strip() for d in docs)
    assert docs[1]["text"].startswith("SCENE 2.")


# --- fast path: backends, input formats, several inputs, resume, constant memory --------------------------------

def _cfg(tmp_path, name, **kw):
    kw = {"progress": False, "log_interval": 0, **kw}
    return pp.PreprocessConfig(output_prefix=str(tmp_path / name), **kw)


def _bytes_of(prefix):
    return [open(f"{prefix}.{ext}", "rb").read() for ext in ("bin", "idx")]


def _report(s):
    return (s.documents, s.tokens, s.lines, s.skipped, s.empty, s.skipped_by_reason,
            [(os.path.basename(b.path), b.line, b.reason) for b in s.first_bad])


def test_parse_json_line_keeps_the_standard_library_verdict():
    """orjson decodes; what it rejects but json accepts (NaN, huge ints, lone surrogates) is still accepted."""
    assert pp.parse_json_line(b'{"text": "a", "score": NaN}', ["text"]) == (["a"], None)
    assert pp.parse_json_line(b'{"text": "b", "n": 123456789012345678901234567890}', ["text"]) == (["b"], None)
    assert pp.parse_json_line(b'{"text": "\\ud800"}', ["text"]) == (["\ud800"], None)
    assert pp.parse_json_line(b'{"text": "x", "text": "y"}', ["text"]) == (["y"], None)
    assert pp.parse_json_line(b'{"text": "x"} trailing', ["text"]) == ([], "malformed JSON")
    assert pp.parse_json_line(b'\xef\xbb\xbf{"text": "bom"}', ["text"]) == ([], "malformed JSON")


@pytest.mark.parametrize("workers", [1, 2])
def test_gigatoken_and_hf_write_identical_bytes_and_reports(tmp_path, workers):
    pytest.importorskip("gigatoken")
    src = tmp_path / "messy.jsonl"
    _write_messy(src)
    with open(src, "ab") as f, open(FIXTURE, "rb") as fixture:
        f.write(b"\n" + fixture.read())
    runs = {}
    for backend in ("hf", "gigatoken"):
        s = pp.preprocess(_cfg(tmp_path, backend, input=str(src), append_eod=True, tokenizer_backend=backend,
                               workers=workers, chunk_bytes=32 * 1024))
        assert s.backend.startswith(f"tokenizer backend: {backend}")
        runs[backend] = (_report(s), _bytes_of(str(tmp_path / f"{backend}_text_document")))
    assert runs["hf"] == runs["gigatoken"]
    assert runs["hf"][0][3] == 7 and runs["hf"][0][0] == 82 + 3


def _compress(src, dst):
    data = open(src, "rb").read()
    if dst.endswith(".gz"):
        import gzip

        with gzip.open(dst, "wb") as f:
            f.write(data)
    else:
        import zstandard

        with open(dst, "wb") as f:  # two frames, as concatenated .zst files are
            half = len(data) // 2
            f.write(zstandard.ZstdCompressor().compress(data[:half]) + zstandard.ZstdCompressor().compress(data[half:]))


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_compressed_jsonl_equals_plain(tmp_path, suffix):
    src = tmp_path / "messy.jsonl"
    _write_messy(src)
    packed = str(src) + suffix
    _compress(src, packed)
    plain = pp.preprocess(_cfg(tmp_path, "plain", input=str(src), chunk_bytes=64))
    comp = pp.preprocess(_cfg(tmp_path, "comp", input=packed, chunk_bytes=64))
    assert [(b.line, b.reason) for b in comp.first_bad] == [(b.line, b.reason) for b in plain.first_bad]
    assert _report(comp)[:6] == _report(plain)[:6] and comp.bytes_read == os.path.getsize(src)
    assert _bytes_of(str(tmp_path / "comp_text_document")) == _bytes_of(str(tmp_path / "plain_text_document"))


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_truncated_compressed_input_is_named_and_leaves_nothing(tmp_path, suffix):
    packed = str(tmp_path / ("in.jsonl" + suffix))
    _compress(FIXTURE, packed)
    data = open(packed, "rb").read()
    open(packed, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"in.jsonl{suffix}: cannot read"):
        pp.preprocess(_cfg(tmp_path, "out", input=packed, tokenizer_type="ByteTokenizer"))
    assert sorted(os.listdir(tmp_path)) == [f"in.jsonl{suffix}"]


def test_plain_text_blocks_and_files(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"First doc\nline two\n\n\n  \t\nSecond doc\r\n\r\nbad \xff block\nmore\n\nlast")
    (tmp_path / "b.txt").write_bytes(b"")
    blocks = pp.preprocess(_cfg(tmp_path, "blk", input=str(tmp_path / "*.txt"), tokenizer_type="ByteTokenizer",
                                chunk_bytes=8))
    assert _read(str(tmp_path / "blk_text_document"))[0] == [list(b"First doc\nline two"), list(b"Second doc\r"),
                                                            list(b"last")]
    assert [(b.line, b.reason) for b in blocks.first_bad] == [(8, "invalid UTF-8")] and blocks.lines == 4
    files = pp.preprocess(_cfg(tmp_path, "file", input=[str(tmp_path / "a.txt")], text_split="file",
                               tokenizer_type="ByteTokenizer"))
    assert files.skipped == 1 and files.first_bad[0].line == 1 and files.documents == 0
    (tmp_path / "c.txt").write_text("whole file\n\nis one document\n")
    pp.preprocess(_cfg(tmp_path, "one", input=str(tmp_path / "c.txt"), text_split="file",
                       tokenizer_type="ByteTokenizer"))
    assert _read(str(tmp_path / "one_text_document"))[0] == [list(b"whole file\n\nis one document\n")]


def test_parquet_rows_and_schema_checks(tmp_path, gpt2):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = ["row one", None, "row three", "", "row five"]
    pq.write_table(pa.table({"text": texts, "n": list(range(5))}), tmp_path / "t.parquet", row_group_size=2)
    s = pp.preprocess(_cfg(tmp_path, "pq", input=str(tmp_path / "t.parquet"), append_eod=True, chunk_bytes=16))
    assert [(b.line, b.reason) for b in s.first_bad] == [(2, "key 'text' is null")]
    assert (s.documents, s.empty, s.lines) == (3, 1, 5)
    assert _read(str(tmp_path / "pq_text_document"))[0] == [gpt2.tokenize(t) + [gpt2.eod]
                                                           for t in ("row one", "row three", "row five")]
    for keys, match in ((("body",), "no column 'body'"), (("n",), "column 'n' has type int64")):
        with pytest.raises(ValueError, match=match):
            pp.preprocess(_cfg(tmp_path, "bad", input=str(tmp_path / "t.parquet"), json_keys=keys))
    assert not glob.glob(str(tmp_path / "bad*"))


def _three_inputs(tmp_path):
    docs = [json.loads(line)["text"] for line in open(FIXTURE, encoding="utf-8")]
    paths = []
    for i, part in enumerate((docs[:30], docs[30:31], docs[31:])):
        path = tmp_path / "in" / f"part{i}.jsonl"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"".join(_good(t) for t in part) + (b"oops\n" if i == 1 else b""))
        paths.append(str(path))
    return paths


def test_output_per_input_equals_separate_runs(tmp_path):
    paths = _three_inputs(tmp_path)
    s = pp.preprocess(_cfg(tmp_path, "per", input=paths, output_per_input=True, workers=2, chunk_bytes=20000))
    assert sorted(s.outputs) == [f"part{i}/text" for i in range(3)] and s.first_bad[0].line == 2
    for i, path in enumerate(paths):
        pp.preprocess(_cfg(tmp_path, f"alone{i}", input=path))
        assert _bytes_of(str(tmp_path / f"per_part{i}_text_document")) == _bytes_of(
            str(tmp_path / f"alone{i}_text_document"))
    (tmp_path / "other").mkdir()
    clash = str(tmp_path / "other" / "part0.jsonl")
    open(clash, "wb").write(_good("x"))
    with pytest.raises(ValueError, match="same output name 'part0'"):
        pp.preprocess(_cfg(tmp_path, "clash", input=paths + [clash], output_per_input=True))


def _fail_on_input(monkeypatch, index):
    original = pp._Encoder.__call__

    def maybe_fail(self, chunk):
        if chunk.path_index == index:
            raise RuntimeError("killed")
        return original(self, chunk)

    monkeypatch.setattr(pp._Encoder, "__call__", maybe_fail)


@pytest.mark.parametrize("per_input", [True, False])
def test_resume_skips_finished_inputs_and_matches_a_clean_run(tmp_path, monkeypatch, per_input):
    paths = _three_inputs(tmp_path)
    clean = pp.preprocess(_cfg(tmp_path, "clean", input=paths, output_per_input=per_input, append_eod=True))
    kw = dict(input=paths, output_per_input=per_input, append_eod=True, resume=True, chunk_bytes=4096)
    _fail_on_input(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="killed"):
        pp.preprocess(_cfg(tmp_path, "run", **kw))
    monkeypatch.undo()
    ledger = [json.loads(line) for line in open(tmp_path / "run.progress.jsonl")]
    assert [e["input"] for e in ledger[1:]] == paths[:2]
    assert not glob.glob(str(tmp_path / "run_text_document.*")) and not glob.glob(str(tmp_path / "*.tmp-*"))

    resumed = pp.preprocess(_cfg(tmp_path, "run", **kw))
    assert resumed.resumed_inputs == 2 and "2 of 3 inputs finished by an earlier run" in resumed.report()
    assert _report(resumed) == _report(clean)
    names = [f"part{i}_text_document" for i in range(3)] if per_input else ["text_document"]
    for name in names:
        assert _bytes_of(str(tmp_path / f"run_{name}")) == _bytes_of(str(tmp_path / f"clean_{name}"))
    assert os.path.exists(tmp_path / "run.progress.jsonl") == per_input  # parts and ledger go once merged
    assert not os.path.exists(tmp_path / "run.parts")

    if per_input:
        with pytest.raises(ValueError, match="other settings"):
            pp.preprocess(_cfg(tmp_path, "run", **{**kw, "append_eod": False}))
        with open(paths[0], "ab") as f:
            f.write(_good("one more"))
        with pytest.raises(ValueError, match="changed since"):
            pp.preprocess(_cfg(tmp_path, "run", **kw))


_PEAK_RSS = """
import resource, sys
from megagpt.data import preprocess as pp
pp.preprocess(pp.PreprocessConfig(input=sys.argv[1], output_prefix=sys.argv[2], workers=int(sys.argv[3]),
                                  append_eod=True, chunk_bytes=64 * 1024, progress=False, log_interval=0))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path, workers):
    """20x the input (~8 MB, ~130 chunks) peaks within 10% of 1x, in the main process and in each worker."""
    big = tmp_path / "x20.jsonl"
    data = open(FIXTURE, "rb").read()
    big.write_bytes(data * 20)
    peaks = []
    for src in (FIXTURE, str(big)):
        r = subprocess.run([sys.executable, "-c", _PEAK_RSS, src, str(tmp_path / "o"), str(workers)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        peaks.append([int(x) for x in r.stdout.split()])
    for one, twenty in zip(*peaks):
        assert twenty <= one * 1.10, peaks


def test_cli_several_inputs_per_input_outputs_and_backend(tmp_path):
    paths = _three_inputs(tmp_path)
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", *paths[:2],
           "--output-prefix", str(tmp_path / "o" / "c"), "--tokenizer-type", "GPT2BPETokenizer",
           "--tokenizer-backend", "hf", "--output-per-input", "--input-format", "jsonl", "--log-interval", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "tokenizer backend: hf (requested)" in r.stderr and "Done: 31 documents" in r.stderr
    assert f"part1/text: {tmp_path}/o/c_part1_text_document.bin" in r.stderr
    bad = subprocess.run(cmd[:-4] + ["--tokenizer-backend", "tiktoken"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "invalid choice: 'tiktoken'" in bad.stderr


def test_resume_after_sigkill(tmp_path):
    """A run killed (SIGKILL) while on its third input resumes there: the first two are not redone, the dead
    run's temporary files are removed, and the outputs equal a clean run's."""
    import signal
    import time

    paths = _three_inputs(tmp_path)
    data = open(FIXTURE, "rb").read()
    with open(paths[2], "wb") as f:
        f.write(data * 40)  # ~15 MB: seconds of work with the hf backend, time to kill it there
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", *paths,
           "--output-prefix", str(tmp_path / "run"), "--tokenizer-type", "GPT2BPETokenizer", "--append-eod",
           "--tokenizer-backend", "hf", "--output-per-input", "--resume", "--log-interval", "0", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger = tmp_path / "run.progress.jsonl"
    deadline = time.time() + 60
    temporary = str(tmp_path / "run_part2_text_document.bin.tmp-*")
    while time.time() < deadline and not glob.glob(temporary):  # the third input is being written
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ledger.read_text().count("\n") == 3, "the run finished before it could be killed"
    assert glob.glob(temporary)
    assert not os.path.exists(tmp_path / "run_part2_text_document.bin")
    done_before = os.path.getmtime(tmp_path / "run_part0_text_document.bin")

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "2 of 3 inputs finished by an earlier run" in r.stderr
    assert os.path.getmtime(tmp_path / "run_part0_text_document.bin") == done_before
    assert not glob.glob(str(tmp_path / "*.tmp-*"))
    pp.preprocess(_cfg(tmp_path, "clean", input=paths, output_per_input=True, append_eod=True))
    for i in range(3):
        assert _bytes_of(str(tmp_path / f"run_part{i}_text_document")) == _bytes_of(
            str(tmp_path / f"clean_part{i}_text_document"))
