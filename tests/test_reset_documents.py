"""--reset-position-ids and --reset-attention-mask (Megatron's packed documents, #10).

1. The layout function equals a direct loop over the EODs as Megatron writes it (gpt_dataset.py
   `_get_ltor_masks_and_position_ids`), corner cases included.
2. The strongest check: with both flags, a document packed after another one gives the per-token losses and the
   gradients of that document alone at the start of a sequence (fp32, dropout off), with learned positions (GPT-2)
   and RoPE (Llama-style, GQA), in every attention backend and under selective and full recompute. Without the
   flags the packed losses differ, so the check can fail.
3. The contract: TP2, TP2+SP (also Llama-style), PP2 and PP2 zb-v (whose second rank reads no data) train with the
   flags exactly like one rank, and so does the DeepSpeed engine; the flags change the losses of that run.
4. The CUDA softmax kernel (host emulator) takes the document mask's layout.
"""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from distributed import run_distributed
from model_utils import tiny_model_config
from test_model import LLAMA, _model
from test_softmax import emu, emu_forward, tolerances  # noqa: F401 (emu: the host kernel emulator fixture)
from test_training import _config, _train, compare_to_reference
from megagpt.data.documents import split_documents
from megagpt.model.transformer import document_mask
from megagpt.parallel.state import ParallelState

EOD = 1


def _megatron_loop(tokens: torch.Tensor, eod: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron's algorithm per sample, as a loop over its EODs: position ids, and True where attention is kept."""
    b, s = tokens.shape
    positions = torch.arange(s).repeat(b, 1)
    keep = torch.ones(b, s, s).tril()
    for row in range(b):
        prev = 0
        for i in (tokens[row] == eod).nonzero().flatten().tolist():
            keep[row, i + 1:, :i + 1] = 0
            positions[row, i + 1:] -= i + 1 - prev
            prev = i + 1
    return positions, keep.bool()


def test_layout_equals_megatrons_loop():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 4, (4, 24), generator=g)      # eod 0: a quarter of the tokens, runs of EODs too
    tokens[0, 0], tokens[1, -1], tokens[2] = 0, 0, 3         # EOD first, EOD last, a row without any EOD
    positions, keep = _megatron_loop(tokens, 0)
    docs = split_documents(tokens, 0, True, True)
    assert torch.equal(docs.position_ids, positions)
    assert torch.equal(document_mask(docs.document_ids, flash=True)[:, 0], keep)          # True = attend
    causal = torch.ones(24, 24, dtype=torch.bool).triu(1)
    assert torch.equal(document_mask(docs.document_ids, flash=False)[:, 0] | causal, ~keep)   # True = masked out
    assert split_documents(tokens, 0, False, False) is None                               # flags off: nothing built
    assert split_documents(tokens, 0, True, False).document_ids is None
    assert split_documents(tokens, 0, False, True).position_ids is None


def test_rope_rotates_each_token_by_its_position_id():
    """Per-token positions rotate a token exactly as the plain path rotates the token found at that position."""
    from megagpt.model.rotary import RotaryEmbedding

    rotary = RotaryEmbedding(tiny_model_config(**LLAMA))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 3, (3, 12), generator=g)                        # eod 0
    x = torch.randn(12, 3, 2, 16, generator=g)                                 # [s, b, n, hd]
    positions = split_documents(tokens, 0, True, False).position_ids          # [b, s]
    rotated = rotary(x, positions)
    for t in range(12):
        for r in range(3):
            p = int(positions[r, t])
            placed = torch.zeros(p + 1, 1, 2, 16)
            placed[p, 0] = x[t, r]
            assert torch.equal(rotated[t, r], rotary(placed)[p, 0]), (t, r)
    assert torch.equal(rotary(x, torch.arange(12).repeat(3, 1)), rotary(x))   # positions 0..s-1: the plain path


VARIANTS = {
    "gpt2-flash": {}, "gpt2-fused": dict(attention_backend="fused"), "gpt2-unfused": dict(attention_backend="unfused"),
    "llama-flash": LLAMA, "llama-fused": dict(LLAMA, attention_backend="fused"),
    "llama-unfused": dict(LLAMA, attention_backend="unfused"),
    "gpt2-flash-full-recompute": dict(recompute_granularity="full"),
    "gpt2-fused-selective-recompute": dict(attention_backend="fused", recompute_granularity="selective"),
    "llama-unfused-selective-recompute": dict(LLAMA, attention_backend="unfused", recompute_granularity="selective"),
}


def _documents(seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Packed rows `[A EOD B]` and `[C EOD D]` (s = 16), the rows `[B A EOD]`, `[D C EOD]` (B, D first), and where B
    and D start in the packed rows; each document is a random run of ids 2..499."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(2, 500, (n,), generator=g) for n in (6, 10, 2, 14)]
    eod = torch.tensor([EOD])
    packed = torch.stack([torch.cat([docs[0], eod, docs[1]]), torch.cat([docs[2], eod, docs[3]])])   # [2, 17]
    alone = torch.stack([torch.cat([docs[1], docs[0], eod]), torch.cat([docs[3], docs[2], eod])])    # [2, 17]
    return packed, alone, [7, 3]


def _losses_and_grads(model, text: torch.Tensor, starts: list[int], length: list[int], flags: bool):
    """Per-token losses of row r's positions starts[r] .. starts[r] + length[r] - 1, and the grads of their sum."""
    tokens, labels = text[:, :-1], text[:, 1:]                                      # [b, s]
    docs = split_documents(tokens, EOD, True, True) if flags else None
    model.zero_grad()
    per_token = model(tokens=tokens, labels=labels, position_ids=docs.position_ids if flags else None,
                      document_ids=docs.document_ids if flags else None)            # [b, s]
    losses = [per_token[r, start:start + n] for r, (start, n) in enumerate(zip(starts, length))]
    torch.cat(losses).sum().backward()
    return losses, {n: p.grad.clone() for n, p in model.named_parameters()}


def _packed_vs_alone(variants: dict) -> dict:
    out = {}
    for name, variant in variants.items():
        cfg = tiny_model_config(**variant)
        model = _model(cfg, ParallelState(tp=1))
        model.train()                                       # dropout is off; recompute runs only in training
        packed, alone, starts = _documents(seed=3)
        length = [packed.size(1) - 1 - start for start in starts]          # B and D up to the last position
        packed_losses, packed_grads = _losses_and_grads(model, packed, starts, length, flags=True)
        alone_losses, alone_grads = _losses_and_grads(model, alone, [0, 0], length, flags=True)
        plain_losses, _ = _losses_and_grads(model, packed, starts, length, flags=False)
        out[name] = list(zip(packed_losses, alone_losses, plain_losses)), packed_grads, alone_grads
        if cfg.position_embedding_type == "rope":   # position ids alone reach RoPE (the mask alone would not show)
            tokens, labels = packed[:, :-1], packed[:, 1:]
            docs = split_documents(tokens, EOD, True, False)
            with torch.no_grad():
                moved = model(tokens=tokens, labels=labels, position_ids=docs.position_ids) - \
                    model(tokens=tokens, labels=labels)
            assert moved[0, starts[0]:].abs().min() > 0, name
    return out


def test_a_packed_document_equals_that_document_alone():
    results = run_distributed(_packed_vs_alone, 1, VARIANTS)[0]
    for name, (rows, packed_grads, alone_grads) in results.items():
        for packed, alone, plain in rows:
            torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
            assert (plain - alone).abs().max() > 1e-3, name            # without the flags the context leaks in
        for param, grad in alone_grads.items():
            torch.testing.assert_close(packed_grads[param], grad, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=name, p=param: f"{n}, grad of {p}: {m}")


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory) -> str:
    """Documents of one to three words of the committed sample (bytes + EOD): 1-3 EODs in every 16-token sample."""
    from megagpt.data.preprocess import PreprocessConfig, preprocess
    from test_training import CORPUS

    out = tmp_path_factory.mktemp("docs")
    words = [w for doc in open(CORPUS) for w in json.loads(doc)["text"].split()][:800]
    with open(out / "words.jsonl", "w") as f:
        i = 0
        while i < len(words):
            n = 1 + i % 3
            f.write(json.dumps({"text": " ".join(words[i:i + n])}) + "\n")
            i += n
    preprocess(PreprocessConfig(input=str(out / "words.jsonl"), output_prefix=str(out / "w"),
                                tokenizer_type="ByteTokenizer", append_eod=True, progress=False, log_interval=0))
    return str(out / "w_text_document")


def _documents_config(prefix: str, flags: bool = True, **layout):
    return _with_documents(_config(**layout), prefix, flags)


def _with_documents(config, prefix: str, flags: bool = True):
    """test_training's config trained on the short documents, with or without both flags."""
    d = config.data
    d.mock_data, d.data_path, d.split, d.data_cache_path = False, [prefix], "1,0,0", prefix + "_cache"
    d.reset_position_ids = d.reset_attention_mask = flags
    config.model.vocab_size = None                         # the byte tokenizer's
    return config


def _train_unpadded(config):
    """test_training's _train, with the vocabulary rows cut to the byte tokenizer's 257 (TP pads them differently)."""
    losses, norms, weights, dp_rank = _train(config)
    vocab = config.model.vocab_size
    return losses, norms, {n: w[:vocab] if w.size(0) > vocab else w for n, w in weights.items()}, dp_rank


def _reference_runs(configs: list) -> list:
    return [_train_unpadded(config) for config in configs]


LAYOUTS = {"tp2": dict(tp=2), "tp2-sp": dict(tp=2, sp=True), "pp2": dict(pp=2),
           "pp2-zb-v": dict(pp=2, schedule="zb-v"), "llama-tp2-sp": dict(LLAMA, tp=2, sp=True)}


@pytest.fixture(scope="module")
def references(short_documents) -> dict:
    gpt2, plain, llama = run_distributed(_reference_runs, 1, [
        _documents_config(short_documents), _documents_config(short_documents, flags=False),
        _documents_config(short_documents, **LLAMA)])[0]
    return {"gpt2": gpt2, "plain": plain, "llama": llama}


def test_the_flags_change_training(references):
    flagged, plain = references["gpt2"][0], references["plain"][0]
    assert all(abs(a - b) > 1e-4 for a, b in zip(flagged[1:], plain[1:])), (flagged, plain)
    assert flagged[0] != plain[0]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_with_the_flags_match_one_rank(layout, references, short_documents):
    config = _documents_config(short_documents, **LAYOUTS[layout])
    compare_to_reference(run_distributed(_train_unpadded, 2, config), references["llama" if "llama" in layout else "gpt2"])


@pytest.mark.slow   # DeepSpeed JIT-builds an op on first use (~80 s on a fresh checkout; cached after)
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed (optional)")
def test_deepspeed_with_the_flags_matches_one_rank(references, short_documents, tmp_path):
    """The DeepSpeed engine (PP 1: every rank reads its tokens) passes the same layout to the model."""
    from test_deepspeed import ZERO, _ds_config, _write_ds_json

    config = _with_documents(_ds_config(_write_ds_json(tmp_path, ZERO["zero1"])), short_documents)
    compare_to_reference(run_distributed(_train_unpadded, 1, config), references["gpt2"])


def test_the_fused_kernel_takes_the_document_mask(emu):
    """The CUDA kernel (run by tests/test_softmax.py's host emulator) reads document_mask's `[b, 1, s, s]` (head
    stride 0) on top of its own causal mask: the probabilities of the PyTorch path."""
    from megagpt.model.softmax import FusedScaleMaskSoftmax

    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 6, (2, 64), generator=g)                             # eod 0: ~11 documents a row
    mask = document_mask(split_documents(tokens, 0, False, True).document_ids, flash=False)   # [2, 1, 64, 64]
    scores = (torch.randn(2, 3, 64, 64, generator=g) * 3).half()                 # [b, np, s, s]
    rc, probs = emu_forward(emu, scores, mask, 0.37, True)
    expected = FusedScaleMaskSoftmax("causal", 0.37, masked_softmax_fusion=False)(scores.float(), mask)
    assert rc == 0
    torch.testing.assert_close(probs.float(), expected, rtol=tolerances(torch.float16)[0], atol=1e-6)
