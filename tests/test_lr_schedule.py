"""LR and weight-decay schedule values at key steps (hand-computed from Megatron's formulas), the flag -> samples
resolution, the checkpoint override rules and exact resume."""
from __future__ import annotations

import math

import pytest
import torch

from megagpt.cli import parse_args
from megagpt.config import schedule_steps
from megagpt.optim.lr_schedule import LRScheduler, Schedule, build_scheduler


def _optimizer() -> torch.optim.Optimizer:
    p, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.AdamW([{"params": [p], "wd_mult": 1.0}, {"params": [b], "weight_decay": 0.0, "wd_mult": 0.0}],
                             lr=123.0)


def _values(schedule: Schedule, points: list[int]) -> list[float]:
    opt = _optimizer()
    sched = LRScheduler(opt, schedule)
    got = []
    for target in points:
        sched.step(target - sched.num_steps)
        got.append(sched.get_lr())
        assert all(g["lr"] == got[-1] for g in opt.param_groups)   # written into the optimizer
    return got


@pytest.mark.parametrize("style,expected", [
    # max 1.0, min 0.1, warmup 10, decay 110: checkpoints at 0, 5, 10, 35, 60, 85, 110, 111, 500
    ("cosine", [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)), 0.55,
                0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.75)), 0.1, 0.1, 0.1]),
    ("linear", [0.0, 0.5, 1.0, 0.775, 0.55, 0.325, 0.1, 0.1, 0.1]),
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    # max(min, max * sqrt(warmup) / sqrt(step)); past the decay length: min
    ("inverse-square-root", [0.0, 0.5, 1.0, math.sqrt(10 / 35), math.sqrt(10 / 60), math.sqrt(10 / 85),
                             math.sqrt(10 / 110), 0.1, 0.1]),
])
def test_values_at_key_steps(style, expected):
    got = _values(Schedule(max_lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110, decay_style=style),
                  [0, 5, 10, 35, 60, 85, 110, 111, 500])
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("wsd_style,q_half", [("linear", 0.5), ("cosine", 0.5), ("exponential", 2 * 0.5 ** 0.5 - 1),
                                              ("minus_sqrt", 1 - 0.5 ** 0.5)])
def test_wsd_is_flat_then_decays_over_its_last_steps(wsd_style, q_half):
    # warmup 0, decay 100 of which the last 20 anneal: flat at max until 80, then coeff(q) with q = (n - 80) / 20
    s = Schedule(max_lr=1.0, min_lr=0.0, decay_steps=100, decay_style="WSD", wsd_decay_steps=20,
                 wsd_decay_style=wsd_style)
    got = _values(s, [0, 50, 80, 90, 100, 101])
    assert got == pytest.approx([1.0, 1.0, 1.0, q_half, 0.0, 0.0], abs=1e-12)


def test_warmup_starts_from_lr_warmup_init():
    assert _values(Schedule(max_lr=1.0, warmup_steps=4, decay_steps=8, init_lr=0.2), [0, 2, 4]) == \
        pytest.approx([0.2, 0.6, 1.0])


@pytest.mark.parametrize("style,mid", [("linear", 0.055), ("cosine", 0.01 + 0.09 * 0.5), ("constant", 0.1)])
def test_weight_decay_increment_reaches_only_decayed_groups(style, mid):
    start = 0.01 if style != "constant" else 0.1
    opt = _optimizer()
    sched = LRScheduler(opt, Schedule(max_lr=1.0, decay_steps=100, start_wd=start, end_wd=0.1, wd_incr_steps=100,
                                      wd_incr_style=style))
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(start)
    sched.step(50)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(mid)
    assert opt.param_groups[1]["weight_decay"] == 0.0            # biases and norms never decay
    sched.step(60)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.1)


def test_flags_resolve_to_samples_as_megatron_does():
    iters = parse_args(["--mock-data", "--train-iters", "1000", "--global-batch-size", "32", "--micro-batch-size", "4",
                        "--lr-decay-iters", "800", "--lr-warmup-fraction", "0.01", "--lr-decay-style", "WSD",
                        "--lr-wsd-decay-iters", "100"])
    assert schedule_steps(iters, dp_size=2) == {"warmup": 0.01 * 800 * 32, "decay": 800 * 32, "wsd_decay": 100 * 32,
                                                "wd_incr": 1000 * 32}
    samples = parse_args(["--mock-data", "--train-samples", "64000", "--lr-warmup-samples", "640",
                          "--rampup-batch-size", "8", "8", "6400", "--global-batch-size", "32"])
    assert schedule_steps(samples, dp_size=1) == {"warmup": 640, "decay": 64000, "wsd_decay": None, "wd_incr": 64000}


def test_state_round_trip_resumes_exactly():
    a = LRScheduler(_optimizer(), Schedule(max_lr=3e-4, min_lr=3e-5, warmup_steps=7, decay_steps=50,
                                           decay_style="cosine"))
    for _ in range(20):
        a.step(1)
    opt_b = _optimizer()
    b = LRScheduler(opt_b, Schedule(max_lr=1.0, decay_steps=2), use_checkpoint=True)
    b.load_state_dict(a.state_dict())
    assert opt_b.param_groups[0]["lr"] == a.get_lr()
    for _ in range(40):
        assert a.step(1) == b.step(1)
    assert b.state_dict() == a.state_dict()


def test_checkpoint_and_flags_must_agree_unless_told_which_wins():
    saved = LRScheduler(_optimizer(), Schedule(max_lr=1e-3, decay_steps=100))
    saved.step(30)
    state = saved.state_dict()
    with pytest.raises(ValueError, match=r"max_lr: flags give 0.002, checkpoint has 0.001.*--override-opt_param"):
        LRScheduler(_optimizer(), Schedule(max_lr=2e-3, decay_steps=100)).load_state_dict(state)
    flags = LRScheduler(_optimizer(), Schedule(max_lr=2e-3, decay_steps=100), override=True)
    flags.load_state_dict(state)
    assert flags.num_steps == 30 and flags.get_lr() == pytest.approx(2e-3 * 0.7)
    ckpt = LRScheduler(_optimizer(), Schedule(max_lr=2e-3, decay_steps=100), use_checkpoint=True)
    ckpt.load_state_dict(state)
    assert ckpt.get_lr() == pytest.approx(1e-3 * 0.7)


def test_build_scheduler_takes_the_optimizer_flags():
    config = parse_args(["--mock-data", "--train-iters", "10", "--global-batch-size", "4", "--micro-batch-size", "4",
                         "--lr", "0.5", "--lr-warmup-init", "0.1", "--lr-warmup-iters", "2",
                         "--weight-decay-incr-style", "linear", "--start-weight-decay", "0", "--end-weight-decay",
                         "0.2"])
    opt = _optimizer()
    sched = build_scheduler(opt, config.optim, schedule_steps(config, 1))
    assert sched.get_lr() == pytest.approx(0.1) and opt.param_groups[0]["weight_decay"] == 0.0
    sched.step(4)                                              # one step of 4 samples: half of the warmup
    assert sched.get_lr() == pytest.approx(0.3) and opt.param_groups[0]["weight_decay"] == pytest.approx(0.02)


def test_invalid_settings_are_named():
    with pytest.raises(ValueError, match=r"the decay \(10 samples.*must outlast the warmup \(10 samples\)"):
        LRScheduler(_optimizer(), Schedule(max_lr=1.0, warmup_steps=10, decay_steps=10))
    with pytest.raises(ValueError, match=r"--min-lr \(2.0\) <= --lr \(1.0\)"):
        LRScheduler(_optimizer(), Schedule(max_lr=1.0, min_lr=2.0, decay_steps=10))
    with pytest.raises(ValueError, match="--lr-decay-style must be one of"):
        LRScheduler(_optimizer(), Schedule(max_lr=1.0, decay_steps=10, decay_style="step"))
