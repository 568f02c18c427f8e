"""Learning-rate schedule with Megatron's semantics: linear warmup from 0, then decay to min_lr; resumable.

    step <= warmup:               lr = max_lr * step / warmup
    constant:                     lr = max_lr
    step > decay_iters:           lr = min_lr
    otherwise, r = (step - warmup) / (decay_iters - warmup):
        linear:  lr = min_lr + (max_lr - min_lr) * (1 - r)
        cosine:  lr = min_lr + (max_lr - min_lr) * 0.5 * (cos(pi * r) + 1)

`step` counts whatever `step(increment)` is fed (iterations by default; pass global batch sizes to count
samples as Megatron does with sample-based schedules) and the iteration counts must use the same unit.
"""
from __future__ import annotations

import math
from typing import Optional

from megagpt.config import schedule_problems

class LRScheduler:
    """Writes the scheduled lr into every param group of `optimizer` (anything with `param_groups`)."""

    def __init__(self, optimizer, max_lr: float, min_lr: float = 0.0, warmup_iters: int = 0,
                 decay_iters: Optional[int] = None, decay_style: str = "cosine") -> None:
        problems = schedule_problems(max_lr, min_lr, warmup_iters, decay_iters, decay_style)
        if problems:
            raise ValueError("; ".join(problems))
        self.optimizer = optimizer
        self.max_lr, self.min_lr = float(max_lr), float(min_lr)
        self.warmup_iters, self.decay_iters, self.decay_style = warmup_iters, decay_iters, decay_style
        self.num_steps = 0
        self._apply()

    def get_lr(self, num_steps: Optional[int] = None) -> float:
        """The lr after `num_steps` increments (default: the current count)."""
        n = self.num_steps if num_steps is None else num_steps
        if self.warmup_iters > 0 and n <= self.warmup_iters:
            return self.max_lr * n / self.warmup_iters
        if self.decay_style == "constant":
            return self.max_lr
        if n > self.decay_iters:
            return self.min_lr
        ratio = (n - self.warmup_iters) / (self.decay_iters - self.warmup_iters)
        if self.decay_style == "linear":
            coeff = 1.0 - ratio
        else:
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def _apply(self) -> None:
        lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, increment: int = 1) -> float:
        """Advance by `increment` and write the new lr into the optimizer; returns it."""
        self.num_steps += increment
        self._apply()
        return self.get_lr()

    def state_dict(self) -> dict:
        return {"max_lr": self.max_lr, "min_lr": self.min_lr, "warmup_iters": self.warmup_iters,
                "decay_iters": self.decay_iters, "decay_style": self.decay_style, "num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly: the checkpoint's schedule and step count replace the constructor's."""
        self.max_lr, self.min_lr = float(state["max_lr"]), float(state["min_lr"])
        self.warmup_iters, self.decay_iters = int(state["warmup_iters"]), state["decay_iters"]
        self.decay_style = state["decay_style"]
        self.num_steps = int(state["num_steps"])
        self._apply()
