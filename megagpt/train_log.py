"""Megatron's training log line, the validation line, model FLOPs, and their TensorBoard / W&B mirror.

`TrainingLog` is the loop's one reporter: it keeps the interval's losses and times, prints the line and the timers
(megagpt/timers.py) on the last rank, and writes Megatron's scalar names; training.py only calls it.
"""
from __future__ import annotations

import importlib.util
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from megagpt.config import Config, ModelConfig
from megagpt.optim.clip import get_params_norm
from megagpt.timers import Timers


def layer_forward_flops_per_token(m: ModelConfig) -> tuple[float, float]:
    """Forward FLOPs of one transformer layer per token (2 per multiply-add): (its GEMMs, the attention core).

    GEMMs: QKV 2 h (n + 2G) d (grouped-query attention computes G key/value heads, not n), output projection
    2 h^2, MLP 2 h f x 2 (GELU: fc1 and fc2) or x 3 (SwiGLU: gate, up and down). Attention core: QK^T and probs x V,
    2 x 2 s h over the whole s x s score matrix (the causal half is not discounted, as Megatron's original formula;
    with G < n the keys and values serve n/G query heads each, so the core still costs n heads). For GPT-2
    (G = n, f = 4h) this is 24 h^2 + 4 s h: the 72 B s L h^2 (1 + s/6h) of the log line's formula over 3."""
    h, f = m.hidden_size, m.ffn_size
    qkv = h * (1.0 + 2.0 * m.query_groups / m.num_attention_heads)     # (n + 2G) d = h (1 + 2G/n)
    gemms = 2.0 * h * qkv + 2.0 * h * h + 2.0 * h * f * (3 if m.swiglu else 2)
    return gemms, 4.0 * m.seq_length * h


def model_flops_per_iteration(config: Config, padded_vocab: int, global_batch_size: int) -> float:
    """Model FLOPs of one iteration (forward + backward = 3 forwards, no recompute): 3 B s (L (layer GEMMs +
    attention core) + 2 h V), per `layer_forward_flops_per_token`; for GPT-2 72 B s L h^2 (1 + s/6h + V/12Lh)."""
    m = config.model
    gemms, core = layer_forward_flops_per_token(m)
    return 3.0 * global_batch_size * m.seq_length * (m.num_layers * (gemms + core) + 2.0 * m.hidden_size * padded_vocab)


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
    num_zeros: Optional[int] = None       # zero grad entries of the last step (--log-num-zeros-in-grad)
    params_norm: Optional[float] = None   # L2 norm of all weights (--log-params-norm)


def format_log_line(st: IterationStats, now: Optional[float] = None) -> str:
    """The line log parsers and golden-value tests read (Megatron-LM's, plus tokens per second)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    grad_norm = "" if st.grad_norm is None else f" grad norm: {st.grad_norm:.3f} |"
    if st.num_zeros is not None:                # Megatron's order: grad norm, num zeros, params norm
        grad_norm += f" num zeros: {st.num_zeros} |"
    if st.params_norm is not None:
        grad_norm += f" params norm: {st.params_norm:.3f} |"
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


def wandb_problems(config: Config) -> list[str]:
    """Why --wandb-project cannot run here (the package is optional): said before start-up, not as a traceback."""
    if config.logging.wandb_project and importlib.util.find_spec("wandb") is None:
        return [f"--wandb-project {config.logging.wandb_project} needs the wandb package: run `make install-wandb` "
                f"(or pip install torch==2.13.0 wandb=={WANDB_VERSION}); WANDB_MODE=offline logs without an account"]
    return []


WANDB_VERSION = "0.31.0"   # the version `make install-wandb` pins and the tests ran against


class ScalarWriter:
    """TensorBoard and Weights & Biases on the logging rank, no-ops elsewhere: one scalar goes to both.

    TensorBoard also gets Megatron's "<name> vs samples" twin (x = consumed samples); W&B keeps a single
    monotonic step, so it gets the per-iteration series only (as in Megatron)."""

    def __init__(self, config: Config, active: bool) -> None:
        self.tensorboard = self.wandb = None
        t, lg = config.train, config.logging
        if active and t.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: tensorboard is slow to import
            self.tensorboard = SummaryWriter(log_dir=t.tensorboard_dir)
        if active and lg.wandb_project:
            import wandb  # optional: training.setup has checked it is installed (wandb_problems)
            save_dir = lg.wandb_save_dir or os.path.join(t.save or ".", "wandb")
            os.makedirs(save_dir, exist_ok=True)
            self.wandb = wandb.init(project=lg.wandb_project, name=lg.wandb_exp_name, entity=lg.wandb_entity,
                                    dir=save_dir, config=config.to_dict())

    @property
    def enabled(self) -> bool:
        return self.tensorboard is not None or self.wandb is not None

    def scalar(self, name: str, value: float, iteration: int, samples: Optional[int] = None) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(name, value, iteration)
            if samples is not None:
                self.tensorboard.add_scalar(f"{name} vs samples", value, samples)
        if self.wandb is not None:
            self.wandb.log({name: value}, step=iteration)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def memory_scalars(device: torch.device, engine) -> dict[str, float]:
    """--log-memory-to-tensorboard: on CUDA Megatron's four allocator statistics; on CPU (no allocator statistics)
    the process's peak resident set and the bytes of params, grads and optimizer state measured from the tensors."""
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        return {"mem-reserved-bytes": stats["reserved_bytes.all.current"],
                "mem-allocated-bytes": stats["allocated_bytes.all.current"],
                "mem-max-allocated-bytes": stats["allocated_bytes.all.peak"],
                "mem-allocated-count": stats["allocation.all.current"]}
    import resource  # POSIX; ru_maxrss is KiB on Linux
    scalars = {"mem-max-rss-bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0}
    scalars.update({f"mem-{kind}-bytes": float(n) for kind, n in engine.memory_bytes().items()})
    return scalars


class TrainingLog:
    """What the loop reports: Megatron's line every --log-interval (losses and times averaged over the interval),
    then the timers; per-iteration scalars every --tensorboard-log-interval; validation lines.

    Every rank calls every method: the timers' gather and the params norm are collectives. Only the last rank
    (which holds the loss, as in Megatron) prints and writes. Time spent in `pause()`..`resume()` (evaluation,
    checkpoints, reports) is left out of the iteration time."""

    def __init__(self, config: Config, ps, timers: Timers, chunks: list, total_iters: int, log: bool) -> None:
        self.config, self.ps, self.timers, self.total_iters = config, ps, timers, total_iters
        self.params = [p for chunk in chunks for p in chunk.parameters()]
        self.padded_vocab = chunks[0].padded_vocab
        self.printer = log and ps.rank == ps.world_size - 1
        self.writer = ScalarWriter(config, self.printer)
        self._window_start, self._losses, self._iters, self._samples = time.perf_counter(), [], 0, 0
        self._paused_at: Optional[float] = None

    def iteration(self, iteration: int, loss: float, grad_norm: Optional[float], global_batch_size: int,
                  consumed_samples: int, skipped_iterations: int, engine) -> None:
        """Account one finished iteration; print, gather timers and write the interval's scalars when it ends one."""
        lg = self.config.logging
        self._losses.append(loss)
        self._iters, self._samples = self._iters + 1, self._samples + global_batch_size
        num_zeros = engine.num_zeros_in_grad if self.config.optim.log_num_zeros_in_grad else None
        if self.writer.enabled and iteration % lg.tensorboard_log_interval == 0:
            self._per_iteration_scalars(iteration, loss, grad_norm, num_zeros, global_batch_size, consumed_samples,
                                        engine)
        if iteration % self.config.train.log_interval and iteration != self.total_iters:
            return
        elapsed = (time.perf_counter() - self._window_start) / self._iters
        flops = model_flops_per_iteration(self.config, self.padded_vocab, self._samples / self._iters)
        params_norm = get_params_norm(self.params, self.ps) if lg.log_params_norm else None
        stats = IterationStats(
            iteration=iteration, train_iters=self.total_iters, consumed_samples=consumed_samples,
            elapsed_ms=elapsed * 1000.0, tflops_per_gpu=flops / elapsed / self.ps.world_size / 1e12,
            tokens_per_second=self._samples / self._iters * self.config.model.seq_length / elapsed,
            learning_rate=engine.learning_rate, global_batch_size=global_batch_size,
            lm_loss=float(np.mean(self._losses)), loss_scale=engine.loss_scale, grad_norm=grad_norm,
            skipped_iterations=skipped_iterations, nan_iterations=sum(1 for x in self._losses if not np.isfinite(x)),
            num_zeros=num_zeros, params_norm=params_norm)
        timer_ms = self.timers.gather(normalizer=self._iters)
        if self.printer:
            print(format_log_line(stats), flush=True)
            if timer_ms:
                print(self.timers.report(timer_ms), flush=True)
        for name, value in (("iteration-time", elapsed), ("throughput", stats.tflops_per_gpu),
                            ("tokens-per-second", stats.tokens_per_second), ("params-norm", params_norm)):
            if value is not None:
                self.writer.scalar(name, value, iteration)
        if lg.log_timers_to_tensorboard:
            for name, per_rank in timer_ms.items():
                self.writer.scalar(f"{name}-time", max(per_rank), iteration)
        self._window_start, self._losses, self._iters, self._samples = time.perf_counter(), [], 0, 0

    def _per_iteration_scalars(self, iteration: int, loss: float, grad_norm: Optional[float],
                               num_zeros: Optional[int], global_batch_size: int, consumed: int, engine) -> None:
        """Megatron's names; each also written against consumed samples."""
        lg = self.config.logging
        scalars = {"learning-rate": engine.learning_rate, "batch-size": global_batch_size, "lm loss": loss,
                   "loss-scale": engine.loss_scale if lg.log_loss_scale_to_tensorboard else None,
                   "grad-norm": grad_norm, "num-zeros": num_zeros}
        for name, value in scalars.items():
            if value is not None:
                self.writer.scalar(name, value, iteration, consumed)
        if lg.log_memory_to_tensorboard:
            for name, value in memory_scalars(self.timers.device, engine).items():
                self.writer.scalar(name, value, iteration)

    def validation(self, iteration: int, loss: float, consumed_samples: int) -> None:
        if self.printer:
            print(format_validation_line(iteration, loss), flush=True)
        self.writer.scalar("lm loss validation", loss, iteration, consumed_samples)
        if self.config.logging.log_validation_ppl_to_tensorboard:
            self.writer.scalar("lm loss validation ppl", math.exp(min(20.0, loss)), iteration, consumed_samples)

    def skipped(self, iteration: int, samples: int) -> None:
        """An iteration of --iterations-to-skip: one line instead of a step."""
        if self.printer:
            print(f" iteration {iteration:8d}/{self.total_iters:8d} | skipped (--iterations-to-skip): its {samples} "
                  f"samples were read, not trained on", flush=True)

    def pause(self) -> None:
        self._paused_at = time.perf_counter()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._window_start += time.perf_counter() - self._paused_at
            self._paused_at = None

    def close(self) -> None:
        self.writer.close()
