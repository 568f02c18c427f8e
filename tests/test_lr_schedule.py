"""LR schedule values at key iterations (hand-computed from Megatron's formulas) and exact resume."""
from __future__ import annotations

import math

import pytest
import torch

from megagpt.optim.lr_schedule import LRScheduler


def _optimizer() -> torch.optim.Optimizer:
    p = torch.nn.Parameter(torch.zeros(2))
    return torch.optim.AdamW([{"params": [p]}, {"params": [], "weight_decay": 0.0}], lr=123.0)


@pytest.mark.parametrize("style,expected", [
    # max 1.0, min 0.1, warmup 10, decay 110: checkpoints at 0, 5, 10, 35, 60, 85, 110, 111, 500
    ("cosine", [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)), 0.55,
                0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.75)), 0.1, 0.1, 0.1]),
    ("linear", [0.0, 0.5, 1.0, 0.775, 0.55, 0.325, 0.1, 0.1, 0.1]),
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
])
def test_values_at_key_iterations(style, expected):
    opt = _optimizer()
    sched = LRScheduler(opt, max_lr=1.0, min_lr=0.1, warmup_iters=10, decay_iters=110, decay_style=style)
    assert all(g["lr"] == 0.0 for g in opt.param_groups)      # written into the optimizer at construction
    points = [0, 5, 10, 35, 60, 85, 110, 111, 500]
    got = []
    for target in points:
        sched.step(target - sched.num_steps)
        got.append(sched.get_lr())
        assert all(g["lr"] == got[-1] for g in opt.param_groups)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_no_warmup_starts_at_max():
    sched = LRScheduler(_optimizer(), max_lr=2.0, min_lr=0.0, warmup_iters=0, decay_iters=4, decay_style="linear")
    assert [sched.get_lr(n) for n in range(6)] == [2.0, 1.5, 1.0, 0.5, 0.0, 0.0]


def test_state_round_trip_resumes_exactly():
    a = LRScheduler(_optimizer(), max_lr=3e-4, min_lr=3e-5, warmup_iters=7, decay_iters=50)
    for _ in range(20):
        a.step()
    opt_b = _optimizer()
    b = LRScheduler(opt_b, max_lr=1.0, min_lr=0.0, warmup_iters=1, decay_iters=2, decay_style="linear")
    b.load_state_dict(a.state_dict())
    assert opt_b.param_groups[0]["lr"] == a.get_lr()
    for _ in range(40):
        assert a.step() == b.step()
    assert b.state_dict() == a.state_dict()


def test_invalid_settings_are_named():
    with pytest.raises(ValueError, match=r"decay iterations \(10, .*\) must exceed --lr-warmup-iters \(10\)"):
        LRScheduler(_optimizer(), max_lr=1.0, warmup_iters=10, decay_iters=10)
    with pytest.raises(ValueError, match=r"--min-lr \(2.0\) <= --lr \(1.0\)"):
        LRScheduler(_optimizer(), max_lr=1.0, min_lr=2.0, decay_iters=10)
    with pytest.raises(ValueError, match="--lr-decay-style must be one of"):
        LRScheduler(_optimizer(), max_lr=1.0, decay_iters=10, decay_style="step")
