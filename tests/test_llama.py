"""The numerical contract for a Llama-style model: RoPE + RMSNorm + SwiGLU + grouped-query attention (G=2) +
untied LM head + no linear biases, trained under TP, SP, PP, interleaved PP and TP2xPP2xDP2 ZeRO-1, reproduces
the single-rank run's losses, grad norms and final weights within rtol 1e-5 (tests/test_training.py's harness).

What each layout exercises: TP splits the grouped QKV rows by whole key/value groups and SwiGLU's fc1 as
[gate_r | up_r]; SP all-gathers the sequence before RoPE; PP carries the untied LM head on the last stage only (no
embedding all-reduce); ZeRO shards the fp32 masters of RMSNorm weights and the GLU rows like any other.
"""
import pytest

from distributed import run_distributed
from test_training import _config, _train, compare_to_reference

LLAMA = dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, group_query_attention=True,
             num_query_groups=2, untie_embeddings_and_output_weights=True, disable_bias_linear=True)

LAYOUTS = {
    "tp2": (2, dict(tp=2)),
    "tp2-sp": (2, dict(tp=2, sp=True)),
    "pp2": (2, dict(pp=2)),
    "pp2-interleaved": (2, dict(pp=2, vl=1)),
    "tp2-pp2-dp2-zero1": (8, dict(tp=2, pp=2, zero=1)),
    "pp2-zb-v": (2, dict(pp=2, schedule="zb-v")),
}
FAST = {"tp2-sp", "pp2"}
_REFERENCE = {}


def reference():
    if "ref" not in _REFERENCE:
        _REFERENCE["ref"] = run_distributed(_train, 1, _config(**LLAMA))[0]
    return _REFERENCE["ref"]


def test_reference_is_llama_shaped_and_learns():
    losses, _, weights, _ = reference()
    assert "output_layer.weight" in weights and "embedding.position_embeddings.weight" not in weights
    assert not any(name.endswith(".bias") for name in weights)
    assert weights["decoder.layers.0.self_attention.linear_qkv.weight"].shape[0] == (4 + 2 * 2) * 16
    assert weights["decoder.layers.0.mlp.linear_fc1.weight"].shape[0] == 2 * 128   # [gate | up], 8h/3 -> 128
    assert len(set(losses)) == len(losses)


@pytest.mark.parametrize("layout", [pytest.param(k, marks=() if k in FAST else pytest.mark.slow) for k in LAYOUTS])
def test_llama_layout_matches_single_rank(layout):
    world, parallel = LAYOUTS[layout]
    compare_to_reference(run_distributed(_train, world, _config(**parallel, **LLAMA)), reference())


def test_llama_presets_have_the_published_parameter_counts():
    """Llama 3.2 1B: 1.236B parameters (tied head); Llama 3.1 8B: 8.030B (untied), vocabulary 128256."""
    from megagpt.cli import parse_args
    from megagpt.config import num_parameters

    for preset, billions in (("llama-1b", 1.2358), ("llama-8b", 8.0303)):
        model = parse_args(["--model-size", preset]).model
        assert abs(num_parameters(model, 128256) / 1e9 - billions) < 1e-4, preset


def test_flops_count_swiglu_and_grouped_query_attention():
    """Per token per layer forward: QKV 2h(n+2G)d, projection 2h^2, SwiGLU 3 x 2hf, core 4sh; LM head 2hV; x3."""
    from megagpt.train_log import model_flops_per_iteration

    config = _config(**LLAMA)        # h 64, 4 heads of 16, G 2, f 128 (8h/3 rounded to 64), s 16, L 4
    h, d, n, g, f, s, L, V, B = 64, 16, 4, 2, 128, 16, 4, 512, 8
    layer = 2 * h * (n + 2 * g) * d + 2 * h * h + 3 * 2 * h * f + 4 * s * h
    assert model_flops_per_iteration(config, V, B) == 3 * B * s * (L * layer + 2 * h * V)
