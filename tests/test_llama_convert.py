"""Llama checkpoints: Hugging Face LlamaForCausalLM import/export (hf_llama.py) and resharding GQA/SwiGLU layouts.

A random transformers-built Llama (GQA G=2, untied or tied head, non-trivial RMSNorm weights) imported into megagpt
gives transformers' logits within 1e-5 and its greedy `generate`; exported back it is bit-identical, also through a
TP2 x PP2 checkpoint and through megagpt's interleaved RoPE storage (the q/k permutation both ways). A Llama-style
megagpt run resharded from TP2 DP2 ZeRO-1 to PP2 loads bit-exact and resumes with the source run's losses.
"""
import os
import subprocess
import sys

import pytest
import torch

from distributed import run_distributed
from test_convert import ITERS, SAVED, _config, _merge, _source_worker, _target_worker
from megagpt.checkpoint.convert import ConversionError, reshard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA = dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, group_query_attention=True,
             num_query_groups=2, untie_embeddings_and_output_weights=True, disable_bias_linear=True)


DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
ROPES = {"default": DEFAULT_ROPE, "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
         "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192, "rope_theta": 10000.0}}


def _hf_llama(seed: int = 0, tie: bool = False, rope: dict = DEFAULT_ROPE, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                         tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                         rope_parameters=dict(rope), **overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():   # non-trivial norm weights (and biases), so a mis-mapped one shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _hf_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _logits_and_greedy(ckpt: str, tokens: torch.Tensor, prompt: list, new: int):
    from megagpt.generate import generate, load_for_generation

    model, config, _ = load_for_generation(ckpt)
    with torch.no_grad():
        logits = model(tokens=tokens)[..., :config.model.vocab_size].transpose(0, 1)   # [b, s, V]
    return logits, generate(model, prompt, new, temperature=0)


@pytest.mark.parametrize("tie,interleaved,rope", [(False, False, "default"), (True, False, "default"),
                                                  (False, True, "default"), (False, False, "linear"),
                                                  (False, False, "llama3")])
def test_imported_llama_gives_transformers_logits_and_greedy_generation(tmp_path, tie, interleaved, rope):
    from megagpt.checkpoint.hf_llama import export_hf, import_hf

    hf = _hf_llama(tie=tie, rope=ROPES[rope])
    ckpt = str(tmp_path / "ckpt")
    import_hf(_hf_state(hf), ckpt, 1, 1, config=hf.config, rotary_interleaved=interleaved)
    tokens = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(3))
    prompt, new = [5, 17, 300, 42], 12
    logits, greedy = run_distributed(_logits_and_greedy, 1, ckpt, tokens, prompt, new)[0]
    with torch.no_grad():
        expected = hf(tokens).logits
        hf_greedy = hf.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False)[0, len(prompt):].tolist()
    diff = float((logits - expected).abs().max())
    print(f"tie={tie} interleaved={interleaved} rope={rope}: max |logit diff| vs transformers = {diff:.2e}")
    assert diff < 1e-5
    assert greedy == hf_greedy
    _, exported = export_hf(ckpt)                        # the scaling survives the way back
    assert {k: v for k, v in exported.rope_parameters.items()} == ROPES[rope]


@pytest.mark.parametrize("interleaved", [False, True])
def test_llama_round_trip_through_tp2_pp2_is_bit_exact(tmp_path, interleaved):
    from megagpt.checkpoint.hf_llama import export_hf, import_hf

    hf = _hf_llama(seed=1, attention_bias=True, mlp_bias=True)
    state = _hf_state(hf)
    import_hf(state, str(tmp_path / "ckpt"), 2, 2, config=hf.config, rotary_interleaved=interleaved)
    exported, config = export_hf(str(tmp_path / "ckpt"))
    assert exported.keys() == state.keys()
    for name, t in state.items():
        assert torch.equal(exported[name], t), name
    assert config.num_key_value_heads == 2 and not config.tie_word_embeddings and config.attention_bias


def test_interleaved_storage_permutes_q_and_k_rows_per_head():
    """Row 2k of each interleaved head is rotate-half row k, row 2k+1 is row k + d/2; v is never permuted."""
    from megagpt.checkpoint.hf_llama import _interleave

    rows = torch.arange(2 * 8).float().unsqueeze(1)          # 2 heads of d = 8
    assert _interleave(rows, 2).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    assert torch.equal(_interleave(_interleave(rows, 2), 2, inverse=True), rows)


def test_convert_tool_llama_both_ways(tmp_path):
    hf = _hf_llama(seed=2)
    hf.save_pretrained(tmp_path / "hf")
    tool = [sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "--no-progress"]
    subprocess.run(tool + ["from-hf", "--model-type", "llama", "--load", str(tmp_path / "hf"), "--save",
                           str(tmp_path / "ckpt"), "--target-tensor-parallel-size", "2",
                           "--target-pipeline-parallel-size", "1"], check=True, capture_output=True)
    subprocess.run(tool + ["to-hf", "--load", str(tmp_path / "ckpt"), "--save", str(tmp_path / "back")],
                   check=True, capture_output=True)
    from transformers import LlamaForCausalLM

    back = LlamaForCausalLM.from_pretrained(tmp_path / "back", local_files_only=True).state_dict()
    for name, t in hf.state_dict().items():
        assert torch.equal(back[name], t), name


def test_unsupported_llama_configs_are_refused_with_the_reason(tmp_path):
    from transformers import LlamaConfig, MistralConfig

    from megagpt.checkpoint.hf_llama import check_hf_config, hf_config

    with pytest.raises(ConversionError, match="rope_type 'yarn'"):
        check_hf_config(LlamaConfig(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}))
    with pytest.raises(ConversionError, match="llama3 RoPE low_freq_factor=2.0: megagpt uses Llama 3.1's 1.0"):
        check_hf_config(LlamaConfig(rope_parameters={**ROPES["llama3"], "low_freq_factor": 2.0}))
    with pytest.raises(ConversionError, match="model_type 'mistral'"):
        check_hf_config(MistralConfig())
    with pytest.raises(ConversionError, match="attention_bias=True with mlp_bias=False"):
        check_hf_config(LlamaConfig(attention_bias=True))
    gpt2 = _config().to_dict()["model"]
    with pytest.raises(ConversionError, match="position-embedding-type is learned_absolute"):
        hf_config(gpt2)


def test_gqa_reshard_refuses_a_tp_that_splits_a_group(tmp_path):
    from megagpt.checkpoint.hf_llama import import_hf

    hf = _hf_llama()
    with pytest.raises(ConversionError, match="num-query-groups 2 is not divisible by target tensor-model-parallel"):
        import_hf(_hf_state(hf), str(tmp_path / "ckpt"), 4, 1, config=hf.config)
    assert not os.path.exists(tmp_path / "ckpt")


@pytest.mark.slow
def test_llama_reshard_from_tp2_zero_to_pp2_loads_equal_and_resumes(tmp_path):
    """GQA rows and SwiGLU's [gate_r | up_r] shards, weights and Adam state (merged from ZeRO shards), re-split."""
    src = str(tmp_path / "tp2dp2")
    results = run_distributed(_source_worker, 4, dict(tp=2, zero=True, **LLAMA), src)
    reshard(src, str(tmp_path / "pp2"), 1, 2)
    reshard(src, str(tmp_path / "pp2-it2"), 1, 2, iteration=SAVED)
    loaded = run_distributed(_target_worker, 2, dict(pp=2, **LLAMA), str(tmp_path / "pp2"),
                             str(tmp_path / "pp2-it2"), str(tmp_path / "resumed"))
    weights, src_weights = _merge(loaded), _merge(results)
    assert weights.keys() == src_weights.keys() and "output_layer.weight" in weights
    for name, w in src_weights.items():
        assert torch.equal(weights[name], w), name
    for r in loaded:
        assert r["start"] == ITERS
        torch.testing.assert_close(r["eval"], results[-1]["eval"], rtol=1e-5, atol=0)
        torch.testing.assert_close(torch.tensor(r["resumed"]), torch.tensor(results[-1]["losses"][SAVED:]),
                                   rtol=1e-5, atol=0)
