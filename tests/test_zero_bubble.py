"""Split backward (deferred weight gradients), the V placement of ZB-V and the --pipeline-schedule rules, without
processes. The schedules themselves are simulated in test_schedules.py, run on gloo in test_pipeline_exec.py, and
trained end to end against one rank in test_training.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megagpt.checkpoint.convert import place
from megagpt.config import ConfigError, validate
from megagpt.model.gpt import stage_layer_ids
from megagpt.parallel.layers import defer_weight_grads, linear
from megagpt.config import stage_of, virtual_stage
from megagpt.parallel.state import ParallelLayout
from megagpt.training import config_for_test


def _inputs():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, requires_grad=True)                  # [s, b, in]
    w = torch.nn.Parameter(torch.randn(4, 5))                     # [out, in]
    b = torch.nn.Parameter(torch.randn(4))
    return x, w, b


def test_deferred_weight_grad_arrives_at_w_through_the_hooks():
    x, w, b = _inputs()
    arrivals = []
    w.register_post_accumulate_grad_hook(lambda p: arrivals.append(None if p.grad is None else p.grad.clone()))
    y = linear(x, w, b)
    g = torch.randn_like(y)
    with defer_weight_grads() as queue:
        y.backward(g)
    assert len(queue) == 1 and w.grad is None and x.grad is not None and b.grad is not None   # B only
    assert all(a is None for a in arrivals)
    queue.run()                                                   # W
    assert len(queue) == 0 and arrivals[-1] is not None
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    F.linear(x2, w2, b2).backward(g)
    for got, want in ((x.grad, x2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_without_deferral_and_for_computed_weights_the_grad_comes_at_once():
    x, w, b = _inputs()
    linear(x, w, b).sum().backward()
    assert w.grad is not None
    w.grad = None
    with defer_weight_grads() as queue:
        linear(x, w * 2.0, b).sum().backward()                    # not a leaf: its graph is gone by W
    assert len(queue) == 0 and w.grad is not None


def test_v_placement():
    # 8 layers, PP 2, two chunks in a V: rank 0 holds the first and the last layers.
    assert [[list(stage_layer_ids(8, 2, r, 2, c, v_shape=True)) for c in (0, 1)] for r in (0, 1)] == \
        [[[0, 1], [6, 7]], [[2, 3], [4, 5]]]
    assert [[list(stage_layer_ids(8, 2, r, 2, c)) for c in (0, 1)] for r in (0, 1)] == \
        [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]                       # interleaved, unchanged
    for p in (2, 3, 4):
        for v_shape in (False, True):
            for r in range(p):
                for c in range(2):
                    assert stage_of(virtual_stage(p, r, c, 2, v_shape), p, 2, v_shape) == (r, c)
    with pytest.raises(ValueError, match="exactly 2 model chunks"):
        virtual_stage(4, 0, 0, 3, v_shape=True)
    # The tied embedding lives on rank 0 only: embedding groups of one rank (nothing to all-reduce).
    assert ParallelLayout(8, 2, 2, v_shape=True).embedding_groups() == [[0], [1], [2], [3]]
    assert ParallelLayout(8, 2, 2).embedding_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_conversion_places_like_the_model():
    for v_shape in (False, True):
        for name, want in (("embedding.word_embeddings.weight", (0, 0)),
                           ("decoder.final_layernorm.weight", (0, 1) if v_shape else (1, 1)),
                           ("decoder.layers.6.mlp.linear_fc1.weight", (0, 1) if v_shape else (1, 1)),
                           ("decoder.layers.4.mlp.linear_fc1.weight", (1, 1) if v_shape else (0, 1))):
            assert place(name, 8, 2, 2, v_shape) == want, (name, v_shape)


@pytest.mark.parametrize("overrides, message", [
    (dict(pipeline_schedule="zb-v", pipeline_model_parallel_size=4, num_layers=4),
     r"zb-v needs num-layers 4 divisible by 2 x pipeline-model-parallel-size 4 = 8"),
    (dict(pipeline_schedule="zb-v", pipeline_model_parallel_size=1), r"zb-v needs pipeline-model-parallel-size >= 2"),
    (dict(pipeline_schedule="interleaved", pipeline_model_parallel_size=2), r"interleaved needs --num-layers-per"),
    (dict(pipeline_schedule="zb-h1", pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1),
     r"zb-h1 runs one model chunk per rank"),
])
def test_pipeline_schedule_rules(overrides, message):
    base = dict(num_layers=8, hidden_size=64, num_attention_heads=4, seq_length=16, micro_batch_size=1,
                global_batch_size=8, train_iters=2, mock_data=True)
    world = overrides.get("pipeline_model_parallel_size", 1)
    validate(config_for_test(**{**base, "pipeline_model_parallel_size": world}), world)   # the base is valid
    with pytest.raises(ConfigError, match=message):
        validate(config_for_test(**{**base, **overrides}), world)
