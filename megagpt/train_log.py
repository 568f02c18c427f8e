"""Megatron's training log line, the validation line, model FLOPs, and the TensorBoard mirror of both."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

from megagpt.config import Config


def model_flops_per_iteration(config: Config, padded_vocab: int, global_batch_size: int) -> float:
    """Model FLOPs of one iteration (forward + backward, no recompute): 72 B s L h^2 (1 + s/6h + V/12Lh)."""
    m = config.model
    B, s, L, h = global_batch_size, m.seq_length, m.num_layers, m.hidden_size
    return 72.0 * B * s * L * h * h * (1.0 + s / (6.0 * h) + padded_vocab / (12.0 * L * h))


@dataclass
class IterationStats:
    """What one log line reports (averaged over the log interval where it is a rate or a loss)."""

    iteration: int
    train_iters: int
    consumed_samples: int
    elapsed_ms: float
    tflops_per_gpu: float
    tokens_per_second: float
    learning_rate: float
    global_batch_size: int
    lm_loss: float
    loss_scale: float
    grad_norm: Optional[float]
    skipped_iterations: int
    nan_iterations: int


def format_log_line(st: IterationStats, now: Optional[float] = None) -> str:
    """The line log parsers and golden-value tests read (Megatron-LM's, plus tokens per second)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    grad_norm = "" if st.grad_norm is None else f" grad norm: {st.grad_norm:.3f} |"
    return (f" [{stamp}] iteration {st.iteration:8d}/{st.train_iters:8d} |"
            f" consumed samples: {st.consumed_samples:12d} |"
            f" elapsed time per iteration (ms): {st.elapsed_ms:.1f} |"
            f" throughput per GPU (TFLOP/s/GPU): {st.tflops_per_gpu:.1f} |"
            f" tokens per second: {st.tokens_per_second:.1f} |"
            f" learning rate: {st.learning_rate:.6E} |"
            f" global batch size: {st.global_batch_size:5d} |"
            f" lm loss: {st.lm_loss:.6E} |"
            f" loss scale: {st.loss_scale:.1f} |{grad_norm}"
            f" number of skipped iterations: {st.skipped_iterations:3d} |"
            f" number of nan iterations: {st.nan_iterations:3d} |")


def format_validation_line(iteration: int, loss: float) -> str:
    ppl = math.exp(min(20.0, loss))
    return f" validation loss at iteration {iteration} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} |"


class TensorBoardLog:
    """Writes the logged scalars when a directory is given; a no-op otherwise (and on ranks that don't log)."""

    def __init__(self, log_dir: Optional[str]) -> None:
        self.writer = None
        if log_dir:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: tensorboard is slow to import
            self.writer = SummaryWriter(log_dir=log_dir)

    def iteration(self, st: IterationStats) -> None:
        if self.writer is None:
            return
        scalars = {"lm loss": st.lm_loss, "learning-rate": st.learning_rate, "loss-scale": st.loss_scale,
                   "iteration-time": st.elapsed_ms / 1000.0, "throughput": st.tflops_per_gpu,
                   "tokens-per-second": st.tokens_per_second}
        if st.grad_norm is not None:
            scalars["grad-norm"] = st.grad_norm
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, st.iteration)
        self.writer.add_scalar("lm loss vs samples", st.lm_loss, st.consumed_samples)

    def validation(self, iteration: int, loss: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("lm loss validation", loss, iteration)
            self.writer.add_scalar("lm loss validation ppl", math.exp(min(20.0, loss)), iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
