"""tools/train_tokenizer.py: a BPE trained on the committed corpus loads through both tokenizer types."""
import json
import os
import sys

import pytest

from megagpt.data.tokenizer import GPT2BPETokenizer, HuggingFaceTokenizer, train_bpe_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(REPO, "tests", "data", "shakespeare_small.jsonl")
sys.path.insert(0, os.path.join(REPO, "tools"))
import train_tokenizer  # noqa: E402


def _texts() -> list[str]:
    with open(CORPUS) as f:
        return [json.loads(line)["text"] for line in f]


def test_trained_files_load_as_gpt2_bpe_and_hf_with_the_same_ids(tmp_path):
    out = tmp_path / "tok"
    trained = train_bpe_tokenizer(_texts(), 1000, str(out), show_progress=False)
    assert sorted(os.listdir(out)) == ["merges.txt", "tokenizer.json", "vocab.json"]
    bpe = GPT2BPETokenizer(str(out / "vocab.json"), str(out / "merges.txt"))
    hf = HuggingFaceTokenizer(str(out / "tokenizer.json"))
    assert bpe.vocab_size == hf.vocab_size == trained.vocab_size == 1000
    assert bpe.eod == hf.eod
    text = "To be, or not to be: that is the question.\n  Whether 'tis nobler — café 2026!"
    ids = bpe.tokenize(text)
    assert ids == hf.tokenize(text) == bpe.tokenize_hf(text)
    assert bpe.detokenize(ids) == text
    assert len(ids) < len(text.encode()) / 2   # merges were learnt: fewer ids than bytes on in-domain text


def test_existing_output_and_tiny_vocab_are_refused(tmp_path):
    (tmp_path / "tok").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        train_bpe_tokenizer(["some text"], 1000, str(tmp_path / "tok"), show_progress=False)
    with pytest.raises(ValueError, match="vocab size 100 is below 257"):
        train_bpe_tokenizer(["some text"], 100, str(tmp_path / "new"), show_progress=False)
    assert not (tmp_path / "new").exists()


def test_cli_skips_and_reports_bad_lines(tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text(open(CORPUS).read() + '{"text": 3}\nnot json\n\n{"other": "x"}\n')
    n_good = sum(1 for _ in open(CORPUS))
    assert train_tokenizer.main(["--input", str(data), "--vocab-size", "600", "--output-dir",
                                 str(tmp_path / "tok"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"trained on {n_good} documents" in out and "skipped 3 bad line(s)" in out
    assert f"in.jsonl:{n_good + 1}: key 'text' is not a string (int)" in out
    assert f"in.jsonl:{n_good + 2}: malformed JSON" in out and f"in.jsonl:{n_good + 4}: missing key 'text'" in out
    assert train_tokenizer.main(["--input", str(data), "--vocab-size", "600", "--output-dir",
                                 str(tmp_path / "tok"), "--no-progress"]) == 1   # exists: refused
    assert "already exists" in capsys.readouterr().err
