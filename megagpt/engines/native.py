"""megagpt's own engine: pipeline schedule over the model chunks, bucketed grad reduction or ZeRO, mixed precision.

A step runs the rank's instruction list (pipeline/executor.py) with a `forward_step` closure; backward hooks fill
the grad buffer, then the TrainingOptimizer (optim/builder.py) reduces, clips, steps and advances the LR schedule.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from megagpt.checkpoint.async_save import AsyncCheckpointWriter
from megagpt.checkpoint.sharded import LoadedCheckpoint, load_checkpoint, prepare_checkpoint, save_checkpoint
from megagpt.config import Config
from megagpt.data.documents import Documents, documents_of
from megagpt.diagnostics.activations import measure_first_calls
from megagpt.diagnostics.ledger import LEDGER
from megagpt.engines.base import MicroBatch, token_mean
from megagpt.optim.builder import TrainingOptimizer
from megagpt.parallel import comm
from megagpt.parallel import random as tp_random
from megagpt.parallel.state import ParallelState
from megagpt.pipeline.executor import broadcast_losses, forward_backward
from megagpt.pipeline.schedules import Instr
from megagpt.timers import Timers


def params_dtype(config: Config) -> torch.dtype:
    return torch.bfloat16 if config.optim.bf16 else torch.float16 if config.optim.fp16 else torch.float32


def run_schedule(config: Config, chunks: list[nn.Module], ps: ParallelState, batches: list[MicroBatch], count: int,
                 forward_only: bool, loss_scale: float = 1.0,
                 on_instruction: Optional[Callable[[Instr], None]] = None, timers: Optional[Timers] = None,
                 saved_bytes: Optional[dict[int, int]] = None) -> float:
    """Run one round of micro-batches through this rank's pipeline schedule; returns the mean micro-batch loss
    (broadcast from the last stage, so every stage returns it). Backward scales each of the `count` losses by
    loss_scale / count, so the grads are those of the mean. With `saved_bytes`, each chunk's first micro-batch
    forward records the bytes it saves for backward in saved_bytes[chunk] (the start-up check of the plan)."""
    device = next(chunks[0].parameters()).device
    documents = packed_documents(config, ps, batches, count, device)

    def forward_step(chunk: int, microbatch: int, input_tensor: Optional[torch.Tensor]):
        model = chunks[chunk]
        tokens, labels, loss_mask = batches[microbatch] if batches else (None, None, None)
        position_ids, document_ids = documents[microbatch] if documents else (None, None)
        out = model(tokens=tokens if model.pre_process else None, input_tensor=input_tensor,
                    labels=labels if model.post_process else None, position_ids=position_ids,
                    document_ids=document_ids)
        if not model.post_process:
            return out, None
        loss = token_mean(out, loss_mask)            # token mean of this micro-batch
        return loss * (loss_scale / count), loss.detach()

    step = forward_step if saved_bytes is None else \
        measure_first_calls(forward_step, saved_bytes, lambda chunk: [p for c in chunks for p in c.parameters()])
    losses = forward_backward(LEDGER.with_faults(step), count, ps, activation_shape(config, ps),
                              params_dtype(config), device,
                              num_chunks=len(chunks), forward_only=forward_only, on_instruction=on_instruction,
                              schedule=config.parallel.pipeline_schedule, timers=timers)
    return broadcast_losses(losses, ps, device)


def packed_documents(config: Config, ps: ParallelState, batches: list[MicroBatch], count: int,
                     device: torch.device) -> list[Documents]:
    """Each micro-batch's document layout under --reset-position-ids / --reset-attention-mask (empty when both are
    off), on every pipeline stage: every layer needs it, but only the first and last stages read data, so under
    PP the first stage's tokens reach the others by one broadcast over the pipeline group (count x b x s ids)."""
    d = config.data
    if not (d.reset_position_ids or d.reset_attention_mask):
        return []
    tokens = [t for t, _, _ in batches]
    if ps.pp_size > 1:
        shape = (count, config.train.micro_batch_size, config.model.seq_length)
        stacked = (torch.stack(tokens).long() if ps.is_first_stage
                   else torch.empty(shape, dtype=torch.long, device=device))         # [count, b, s]
        comm.broadcast(stacked, ps.pp_ranks[0], ps.pp_group)
        tokens = list(stacked)                                                       # count x [b, s]
    return [documents_of(t, d) for t in tokens]


def activation_shape(config: Config, ps: ParallelState) -> tuple[int, int, int]:
    """Shape of the hidden states passed between pipeline stages: [s / TP under SP, b, h]."""
    s = config.model.seq_length
    if config.parallel.sequence_parallel:
        s //= ps.tp_size
    return (s, config.train.micro_batch_size, config.model.hidden_size)


class NativeEngine:
    """Model chunks + TrainingOptimizer + the pipeline executor; saves megagpt's sharded checkpoints."""

    def __init__(self, config: Config, chunks: list[nn.Module], ps: ParallelState,
                 tracker: tp_random.RNGStatesTracker, timers: Optional[Timers] = None) -> None:
        self.config, self.chunks, self.ps, self.tracker = config, chunks, ps, tracker
        self.timers = timers or Timers()
        self.optimizer = TrainingOptimizer(config, chunks, ps, self.timers)
        device = next(chunks[0].parameters()).device
        self.writer = AsyncCheckpointWriter(ps, device) if config.train.async_save else None
        self.guard: Optional[Callable[[float, list], bool]] = None   # diagnostics.numerics.StepGuard, when on
        self.activation_bytes: Optional[dict[int, int]] = None   # per chunk, one micro-batch: measured in step 1

    def train_step(self, batches: list[MicroBatch], num_microbatches: int,
                   global_batch_size: int) -> tuple[float, bool, Optional[float]]:
        self.optimizer.zero_grad(num_microbatches)
        measure = {} if self.activation_bytes is None else None
        with self.timers("forward-backward", 1):
            loss = run_schedule(self.config, self.chunks, self.ps, batches, num_microbatches, forward_only=False,
                                loss_scale=self.optimizer.loss_scale, on_instruction=self.optimizer.on_instruction,
                                timers=self.timers, saved_bytes=measure)
        self.activation_bytes = self.activation_bytes if measure is None else measure
        accept = (lambda named_grads: self.guard(loss, named_grads)) if self.guard is not None else None
        ok, grad_norm = self.optimizer.step(global_batch_size, accept)
        return loss, ok, grad_norm

    def eval_step(self, batches: list[MicroBatch], num_microbatches: int) -> float:
        return run_schedule(self.config, self.chunks, self.ps, batches, num_microbatches, forward_only=True)

    def save(self, directory: str, iteration: int, consumed_samples: int, consumed_valid_samples: int) -> None:
        args = (directory, iteration, self.config, self.ps, self.chunks, self.optimizer, self.tracker,
                consumed_samples, consumed_valid_samples)
        if self.writer is None:
            save_checkpoint(*args)
        else:
            self.writer.submit(prepare_checkpoint(*args))

    def poll_save(self, block: bool = False) -> Optional[tuple[str, int]]:
        return self.writer.poll(block) if self.writer is not None else None

    def load(self, directory: str, iteration: Optional[int] = None) -> LoadedCheckpoint:
        return load_checkpoint(directory, self.config, self.ps, self.chunks, self.optimizer, iteration)

    @property
    def loss_scale(self) -> float:
        return self.optimizer.loss_scale

    @property
    def learning_rate(self) -> float:
        return self.optimizer.learning_rate

    @property
    def num_zeros_in_grad(self) -> Optional[int]:
        return self.optimizer.num_zeros_in_grad

    def memory_bytes(self) -> dict[str, int]:
        return self.optimizer.memory_bytes()
