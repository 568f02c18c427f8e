"""GPT model: loss at init, TP (+ sequence parallel) forward/backward equal to the single-rank model."""
import math
from typing import Optional

import pytest
import torch

from distributed import run_distributed
from model_utils import batch, full_state, tiny_model_config
from megagpt.model.gpt import GPTModel, stage_layer_ids
from megagpt.optim.grad_buffer import finalize_model_grads
from megagpt.parallel import random as tp_random
from megagpt.parallel.state import ParallelState


def _model(cfg, ps, sequence_parallel=False, seed=7):
    tracker = tp_random.model_parallel_seed(seed, ps.tp_rank, ps.pp_rank, "cpu")
    return GPTModel(cfg, ps, range(cfg.num_layers), seed=seed, tracker=tracker, pre_process=True,
                    post_process=True, sequence_parallel=sequence_parallel)


def _loss_and_grads(model, ps, cfg):
    tokens, labels = batch(3, 2, cfg.seq_length, cfg.vocab_size)
    loss = model(tokens=tokens, labels=labels).mean()
    loss.backward()
    finalize_model_grads(model.parameters(), ps, reducer=None)  # sequence-parallel LayerNorm grads summed over TP
    return loss.item(), full_state(model, ps.tp_group), full_state(model, ps.tp_group, grads=True)


def _tp_vs_single(tp: int, sequence_parallel: bool, variant: Optional[dict] = None):
    cfg = tiny_model_config(**(variant or {}))
    torch.manual_seed(0)
    reference = _model(cfg, ParallelState(tp=1))
    ps = ParallelState(tp=tp)
    model = _model(cfg, ps, sequence_parallel)
    ref_loss, ref_params, ref_grads = _loss_and_grads(reference, ParallelState(tp=1), cfg)
    loss, params, grads = _loss_and_grads(model, ps, cfg)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
    assert params.keys() == ref_params.keys()
    for name in ref_params:
        torch.testing.assert_close(params[name], ref_params[name], rtol=0, atol=0, msg=lambda m, name=name: f"init of {name}: {m}")
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"grad of {name}: {m}")
    return loss


@pytest.mark.parametrize("tp,sp", [(2, False), (2, True), (4, False), (4, True)])
def test_tensor_parallel_matches_single_rank(tp, sp):
    losses = run_distributed(_tp_vs_single, tp, tp, sp)
    assert len(set(losses)) == 1  # every TP rank reports the same loss


LLAMA = dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, group_query_attention=True,
             num_query_groups=2, untie_embeddings_and_output_weights=True, disable_bias_linear=True)
VARIANTS = {
    "llama-flash": LLAMA,
    "llama-unfused": dict(LLAMA, attention_backend="unfused"),
    "llama-fused": dict(LLAMA, attention_backend="fused"),
    # q/k norms (grads summed over TP), a QKV bias alone, partial and interleaved RoPE, multi-query attention
    "qk-norm-qkv-bias-partial-rope": dict(LLAMA, qk_layernorm=True, add_qkv_bias=True, rotary_percent=0.5,
                                          rotary_interleaved=True),
    "layernorm-gqa-no-positions": dict(group_query_attention=True, num_query_groups=2, qk_layernorm=True,
                                       position_embedding_type="none", swiglu=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("sp", [False, True])
def test_model_variants_under_tensor_parallel_match_single_rank(variant, sp):
    """Grouped QKV rows give each TP rank whole key/value groups, SwiGLU's fc1 shards are [gate_r | up_r], RoPE
    rotates each rank's heads after the SP all-gather: init, loss and every grad equal the single-rank model."""
    losses = run_distributed(_tp_vs_single, 2, 2, sp, VARIANTS[variant])
    assert len(set(losses)) == 1


def _count_params(configs):
    return [sum(p.numel() for p in _model(cfg, ParallelState(tp=1)).parameters()) for cfg in configs]


def test_variant_parameter_counts_match_the_model():
    """config.num_parameters (the planner's and the presets' count) equals the built model's, for every variant."""
    from megagpt.config import num_parameters
    from megagpt.config import pad_vocab_size

    configs = [tiny_model_config(**variant) for variant in [{}, *VARIANTS.values()]]
    counts = run_distributed(_count_params, 1, configs)[0]
    assert counts == [num_parameters(cfg, pad_vocab_size(cfg.vocab_size, 1)) for cfg in configs]


def _init_loss():
    cfg = tiny_model_config(vocab_size=50257, hidden_size=64, num_layers=2, seq_length=32,
                            max_position_embeddings=32)
    model = _model(cfg, ParallelState(tp=1))
    tokens, labels = batch(1, 4, cfg.seq_length, cfg.vocab_size)
    with torch.no_grad():
        return model(tokens=tokens, labels=labels).mean().item()


def test_loss_at_init_is_about_ln_vocab():
    loss = run_distributed(_init_loss, 1)[0]
    assert abs(loss - math.log(50257)) < 0.1, loss


def _padded_logits_never_predicted():
    cfg = tiny_model_config()
    ps = ParallelState(tp=2)
    model = _model(cfg, ps)
    tokens, _ = batch(5, 2, cfg.seq_length, cfg.vocab_size)
    logits = model(tokens=tokens)  # [s, b, v/tp]
    shard = logits.size(-1)
    ids = torch.arange(ps.tp_rank * shard, (ps.tp_rank + 1) * shard)
    return bool(torch.isinf(logits[..., ids >= cfg.vocab_size]).all()), bool(
        torch.isfinite(logits[..., ids < cfg.vocab_size]).all())


def test_vocab_padding_is_masked_out_of_the_softmax():
    for padded_masked, real_finite in run_distributed(_padded_logits_never_predicted, 2):
        assert padded_masked and real_finite


def test_stage_layer_ids():
    assert list(stage_layer_ids(8, 2, 1)) == [4, 5, 6, 7]
    # interleaved: 8 layers, PP 2, 2 chunks -> virtual stages of 2 layers: rank 0 holds 0-1 and 4-5
    assert [list(stage_layer_ids(8, 2, 0, 2, c)) for c in range(2)] == [[0, 1], [4, 5]]
    assert [list(stage_layer_ids(8, 2, 1, 2, c)) for c in range(2)] == [[2, 3], [6, 7]]


def _recompute_grads(granularity):
    """Dropout on, TP=2: recomputed forwards must redraw the same dropout masks, so grads equal no-recompute."""
    ps = ParallelState(tp=2)
    out = {}
    for mode in (None, granularity):
        cfg = tiny_model_config(hidden_dropout=0.1, attention_dropout=0.1, recompute_granularity=mode)
        torch.manual_seed(11)
        model = _model(cfg, ps)  # seeds the default generator and the tracker identically for both modes
        model.train()
        tokens, labels = batch(3, 2, cfg.seq_length, cfg.vocab_size)
        loss = model(tokens=tokens, labels=labels).mean()
        loss.backward()
        out[mode] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (ref_loss, ref), (loss, grads) = out[None], out[granularity]
    assert loss == ref_loss
    assert grads.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("granularity", ["selective", "full"])
def test_recompute_reproduces_forward_and_grads(granularity):
    run_distributed(_recompute_grads, 2, granularity)
