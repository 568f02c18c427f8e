"""Learning-rate and weight-decay schedule with Megatron's semantics (OptimizerParamScheduler); resumable.

Steps count samples, as Megatron does: each optimizer step advances by that step's global batch size, so the
schedule is the same whether the batch size is constant or ramps up (`--rampup-batch-size`). `config.schedule_steps`
turns iteration flags into samples (iterations x global batch size).

    step <= warmup:               lr = init + (max - init) * step / warmup
    constant:                     lr = max
    step > decay:                 lr = min
    inverse-square-root:          lr = max(min, max * sqrt(max(warmup, 1)) / sqrt(max(step, 1)))
    otherwise r = (step - warmup) / (decay - warmup):
        linear:  coeff = 1 - r
        cosine:  coeff = (cos(pi r) + 1) / 2
        WSD:     coeff = 1 until the last `wsd_decay` steps of the decay, then over those steps, with
                 q = the fraction of them done: exponential 2 * 0.5^q - 1, linear 1 - q, cosine (cos(pi q) + 1) / 2,
                 minus_sqrt 1 - sqrt(q)
        lr = min + coeff * (max - min)
Weight decay goes from start to end over `wd_incr` steps (constant, linear or cosine), then stays at end; it is
written only into param groups that decay (`wd_mult` 1; biases and norms have 0).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

from megagpt.config import OptimConfig, schedule_problems

# Fields compared between the run's flags and a checkpoint's schedule (Megatron's _check_and_set).
_CHECKED = ("max_lr", "min_lr", "init_lr", "warmup_steps", "decay_steps", "decay_style")


@dataclass
class Schedule:
    """A resolved schedule; lengths in samples."""

    max_lr: float
    min_lr: float = 0.0
    warmup_steps: float = 0
    decay_steps: Optional[int] = None
    decay_style: str = "linear"
    init_lr: float = 0.0
    wsd_decay_steps: Optional[int] = None
    wsd_decay_style: str = "exponential"
    start_wd: float = 0.0
    end_wd: float = 0.0
    wd_incr_steps: Optional[int] = None
    wd_incr_style: str = "constant"

    def lr(self, n: float) -> float:
        if self.warmup_steps > 0 and n <= self.warmup_steps:
            return self.init_lr + (self.max_lr - self.init_lr) * n / self.warmup_steps
        if self.decay_style == "constant":
            return self.max_lr
        if n > self.decay_steps:
            return self.min_lr
        if self.decay_style == "inverse-square-root":
            return max(self.min_lr, self.max_lr * math.sqrt(max(self.warmup_steps, 1)) / math.sqrt(max(n, 1)))
        ratio = (n - self.warmup_steps) / (self.decay_steps - self.warmup_steps)
        if self.decay_style == "linear":
            coeff = 1.0 - ratio
        elif self.decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        else:   # WSD: stable, then decay over the last wsd_decay_steps
            anneal_start = self.decay_steps - self.wsd_decay_steps
            coeff = 1.0 if n <= anneal_start else _wsd_coeff((n - anneal_start) / self.wsd_decay_steps,
                                                            self.wsd_decay_style)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def weight_decay(self, n: float) -> float:
        if self.wd_incr_style == "constant" or n > self.wd_incr_steps:
            return self.end_wd
        ratio = n / self.wd_incr_steps
        coeff = ratio if self.wd_incr_style == "linear" else 0.5 * (math.cos(math.pi * (1 - ratio)) + 1.0)
        return self.start_wd + coeff * (self.end_wd - self.start_wd)


def _wsd_coeff(q: float, style: str) -> float:
    if style == "exponential":
        return 2.0 * math.pow(0.5, q) - 1.0
    if style == "linear":
        return 1.0 - q
    if style == "cosine":
        return 0.5 * (math.cos(math.pi * q) + 1.0)
    return 1.0 - math.sqrt(q)   # minus_sqrt


class LRScheduler:
    """Writes the scheduled lr and weight decay into every param group of `optimizer` (anything with
    `param_groups`). `override`: a checkpoint's schedule is ignored (its step count is kept); `use_checkpoint`: the
    checkpoint's schedule replaces the flags'; neither: they must agree (Megatron's --override-opt_param-scheduler
    and --use-checkpoint-opt_param-scheduler)."""

    def __init__(self, optimizer, schedule: Schedule, override: bool = False, use_checkpoint: bool = False) -> None:
        problems = schedule_problems(schedule.max_lr, schedule.min_lr, schedule.warmup_steps, schedule.decay_steps,
                                     schedule.decay_style)
        if problems:
            raise ValueError("; ".join(problems))
        self.optimizer, self.schedule = optimizer, schedule
        self.override, self.use_checkpoint = override, use_checkpoint
        self.num_steps = 0
        self._apply()

    def get_lr(self, num_steps: Optional[float] = None) -> float:
        """The lr after `num_steps` samples (default: the current count)."""
        return self.schedule.lr(self.num_steps if num_steps is None else num_steps)

    def get_wd(self) -> float:
        return self.schedule.weight_decay(self.num_steps)

    def _apply(self) -> None:
        lr, wd = self.get_lr(), self.get_wd()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = wd * group.get("wd_mult", 1.0)

    def step(self, increment: int = 1) -> float:
        """Advance by `increment` samples and write the new lr into the optimizer; returns it."""
        self.num_steps += increment
        self._apply()
        return self.get_lr()

    def state_dict(self) -> dict:
        return {**asdict(self.schedule), "num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly at the checkpoint's step count; the schedule itself follows the override rules above."""
        if "decay_iters" in state:
            raise ValueError("this checkpoint's LR schedule counts iterations (megagpt before sample-based "
                             "schedules); resume it with the megagpt version that wrote it")
        saved = Schedule(**{f.name: state[f.name] for f in fields(Schedule)})
        if self.use_checkpoint:
            self.schedule = saved
        elif not self.override:
            diff = [f"{k}: flags give {getattr(self.schedule, k)!r}, checkpoint has {getattr(saved, k)!r}"
                    for k in _CHECKED if getattr(self.schedule, k) != getattr(saved, k)]
            if diff:
                raise ValueError("learning-rate schedule of the checkpoint differs from the flags ("
                                 + "; ".join(diff) + "): pass --override-opt_param-scheduler to use the flags or "
                                 "--use-checkpoint-opt_param-scheduler to use the checkpoint's")
        self.num_steps = state["num_steps"]
        self._apply()


def build_scheduler(optimizer, o: OptimConfig, steps: dict) -> LRScheduler:
    """The scheduler of a run: `steps` from config.schedule_steps (warmup, decay, wsd_decay, wd_incr in samples)."""
    schedule = Schedule(max_lr=o.lr, min_lr=o.min_lr, warmup_steps=steps["warmup"], decay_steps=steps["decay"],
                        decay_style=o.lr_decay_style, init_lr=o.lr_warmup_init, wsd_decay_steps=steps["wsd_decay"],
                        wsd_decay_style=o.lr_wsd_decay_style,
                        start_wd=o.weight_decay if o.start_weight_decay is None else o.start_weight_decay,
                        end_wd=o.weight_decay if o.end_weight_decay is None else o.end_weight_decay,
                        wd_incr_steps=steps["wd_incr"], wd_incr_style=o.weight_decay_incr_style)
    return LRScheduler(optimizer, schedule, override=o.override_opt_param_scheduler,
                       use_checkpoint=o.use_checkpoint_opt_param_scheduler)
