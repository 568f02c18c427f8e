"""The optimizer the training loop sees: grad reduction, (ZeRO) optimizer, loss scaling and the LR schedule as one.

The loop calls `zero_grad()`, runs the pipeline schedule (backward hooks fill the grad buffer), then `step()`;
it never learns whether grads are all-reduced or reduce-scattered, or which precision runs.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from megagpt.config import Config, schedule_steps
from megagpt.optim.grad_buffer import DataParallelGradReducer, finalize_model_grads
from megagpt.optim.lr_schedule import build_scheduler
from megagpt.optim.mixed_precision import MixedPrecisionOptimizer
from megagpt.optim.zero import DistributedOptimizer
from megagpt.parallel.state import ParallelState
from megagpt.pipeline.schedules import Instr
from megagpt.timers import Timers


class TrainingOptimizer:
    """Reducer + optimizer + scheduler for this rank's model chunks."""

    def __init__(self, config: Config, chunks: list[nn.Module], ps: ParallelState,
                 timers: Optional[Timers] = None) -> None:
        p, o = config.parallel, config.optim
        self.ps = ps
        self.timers = timers or Timers()
        named = [(name, param) for chunk in chunks for name, param in chunk.named_parameters()]
        self.params = [param for _, param in named]
        self.reducer = DataParallelGradReducer(
            self.params, ps, bucket_size=p.ddp_bucket_size, use_distributed_optimizer=p.use_distributed_optimizer,
            overlap_grad_reduce=p.overlap_grad_reduce, zero_stage=p.zero_stage)
        optimizer_cls = DistributedOptimizer if p.use_distributed_optimizer else MixedPrecisionOptimizer
        self.optimizer = optimizer_cls(self.params, ps, o, reducer=self.reducer,
                                       param_names={param: name for name, param in named}, timers=self.timers)
        self.scheduler = build_scheduler(self.optimizer, o, schedule_steps(config, ps.dp_size))
        self.num_microbatches = 0   # of the running step (the global batch may ramp up): set by zero_grad
        self.num_zeros_in_grad: Optional[int] = None   # of the last step, with --log-num-zeros-in-grad

    def zero_grad(self, num_microbatches: int) -> None:
        """Start a step of `num_microbatches` micro-batches per DP rank."""
        self.num_microbatches = num_microbatches
        self.optimizer.zero_grad()

    def on_instruction(self, instr: Instr) -> None:
        """Overlapped reduction may start only during a chunk's last backward (Megatron's no_sync for the rest); a
        split backward's W gives the linear weights their grads, so a bucket holding them is ready only after it."""
        self.reducer.is_last_microbatch = instr.is_backward and instr.microbatch == self.num_microbatches - 1

    def step(self, global_batch_size: int,
             accept: Optional[Callable[[list[tuple[str, Optional[torch.Tensor]]]], bool]] = None,
             ) -> tuple[bool, Optional[float]]:
        """Finish grads (SP and tied-embedding sums, DP reduction), update, advance the LR schedule by this step's
        samples (Megatron counts the schedule in samples). `accept(named grads)` False drops the update (the
        numerical guardrails of diagnostics/numerics.py judge the finished grads there)."""
        self.reducer.is_last_microbatch = True
        self.num_zeros_in_grad = None
        with self.timers("all-grads-sync", 1):
            finalize_model_grads(self.params, self.ps, self.reducer, self.timers)
        if accept is not None and not accept(self.optimizer.named_grads()):
            return False, None
        with self.timers("optimizer", 1):
            ok, grad_norm, self.num_zeros_in_grad = self.optimizer.step()
            if ok:
                self.scheduler.step(increment=global_batch_size)
        return ok, grad_norm

    @property
    def loss_scale(self) -> float:
        return self.optimizer.loss_scale

    @property
    def learning_rate(self) -> float:
        return self.optimizer.learning_rate

    def memory_bytes(self) -> dict[str, int]:
        return self.optimizer.memory_bytes()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
