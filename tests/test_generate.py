"""megagpt.generate: sampling rules, and greedy text from a TP=2 x PP=2 checkpoint equals Hugging Face GPT-2's
greedy continuation of the same weights (an independent forward), sliding window included."""
import importlib.util

import pytest
import torch

from distributed import run_distributed
from megagpt.generate import sample_next

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
WINDOW, PROMPT, NEW = 16, [5, 17, 200, 42, 99, 3, 64, 250, 7, 1], 12   # prompt + new > window: the context slides


def test_greedy_and_top_k_1_pick_the_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(-1)
    assert torch.equal(sample_next(logits, temperature=0.0), best)
    assert torch.equal(sample_next(logits, top_k=1, generator=torch.Generator().manual_seed(1)), best)


def test_top_k_and_top_p_restrict_the_support():
    gen = torch.Generator().manual_seed(2)
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.06, 0.04]])).repeat(2000, 1)
    assert set(sample_next(logits, top_k=2, generator=gen).tolist()) == {0, 1}
    assert set(sample_next(logits, top_p=0.5, generator=gen).tolist()) == {0}        # 0.6 alone reaches 0.5
    assert set(sample_next(logits, top_p=0.8, generator=gen).tolist()) == {0, 1}     # 0.6 + 0.3 reach 0.8
    assert set(sample_next(logits, generator=gen).tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, top_p=0.0)


def _hf_model():
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=257, n_positions=WINDOW, bos_token_id=None,
                        eos_token_id=None)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


def _imported_checkpoint(tmp_path, tp: int, pp: int):
    """A random HF GPT-2 and the same weights imported as a megagpt checkpoint at TP x PP."""
    from megagpt.checkpoint.hf_gpt2 import import_hf
    hf = _hf_model()
    ckpt = str(tmp_path / "ckpt")
    import_hf(hf.state_dict(), ckpt, tp, pp, config=hf.config)
    return hf, ckpt


def _hf_greedy(model, prompt: list[int], new: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            ids.append(int(model(torch.tensor([ids[-WINDOW:]])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _generate_worker(ckpt: str):
    from megagpt.generate import generate, load_for_generation
    model, config, ps = load_for_generation(ckpt)
    greedy = generate(model, PROMPT, NEW, temperature=0.0)
    sampled = [generate(model, PROMPT, NEW, temperature=1.0, top_k=20, seed=7) for _ in range(2)]
    return greedy, sampled, (ps.tp_size, ps.pp_size)


@needs_transformers
@pytest.mark.slow
def test_greedy_generation_from_a_tp2_pp2_checkpoint_matches_hugging_face(tmp_path):
    hf, ckpt = _imported_checkpoint(tmp_path, 2, 2)
    greedy, sampled, layout = run_distributed(_generate_worker, 1, ckpt)[0]
    assert layout == (1, 1)
    assert greedy == _hf_greedy(hf, PROMPT, NEW)
    assert sampled[0] == sampled[1] and len(sampled[0]) == NEW      # a seed reproduces a sample


@needs_transformers
@pytest.mark.slow
def test_cli_prints_the_prompt_and_its_continuation(tmp_path):
    import os
    import subprocess
    import sys

    hf, ckpt = _imported_checkpoint(tmp_path, 1, 2)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    run = subprocess.run([sys.executable, "-m", "megagpt.generate", "--load", ckpt, "--prompt", "To be",
                          "--max-new-tokens", "5", "--temperature", "0", "--tokenizer-type", "ByteTokenizer"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    expected = _hf_greedy(hf, list("To be".encode()), 5)
    assert run.stdout == "To be" + bytes(t for t in expected if t < 256).decode("utf-8", errors="replace") + "\n"
