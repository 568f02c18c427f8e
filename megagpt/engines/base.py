"""The Engine protocol the Trainer drives, and the micro-batch type it feeds."""
from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.nn as nn

from megagpt.checkpoint.sharded import LoadedCheckpoint

# (tokens [b, s], labels [b, s], loss mask [b, s] or None: 1 where a position counts in the loss)
MicroBatch = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


def token_mean(per_token_loss: torch.Tensor, loss_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """A micro-batch's loss: the mean over its tokens, or over the unmasked ones (--eod-mask-loss)."""
    per_token_loss = per_token_loss.float()
    if loss_mask is None:
        return per_token_loss.mean()
    return (per_token_loss * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)


class Engine(Protocol):
    """One rank's share of training. Losses returned are this rank's mean over its micro-batches (equal on every
    pipeline stage); the Trainer averages them over data-parallel ranks."""

    chunks: list[nn.Module]

    def train_step(self, batches: list[MicroBatch], num_microbatches: int,
                   global_batch_size: int) -> tuple[float, bool, Optional[float]]:
        """Forward, backward and update on this step's micro-batches (`batches` is empty on stages that read no
        data; `num_microbatches` per DP rank, `global_batch_size` in all: both may ramp up between steps):
        (loss, whether the update was applied, global grad norm before clipping)."""

    def eval_step(self, batches: list[MicroBatch], num_microbatches: int) -> float:
        """Forward-only loss of one round of micro-batches."""

    def save(self, directory: str, iteration: int, consumed_samples: int, consumed_valid_samples: int) -> None:
        """Write a checkpoint of this rank's state (collective: every rank calls it)."""

    def poll_save(self, block: bool = False) -> Optional[tuple[str, int]]:
        """Collective while a background (--async-save) save is in flight: (directory, iteration) of the checkpoint
        that just became complete, else None. `block` waits for it."""

    def load(self, directory: str, iteration: Optional[int] = None) -> LoadedCheckpoint:
        """Restore a checkpoint in place (`iteration`, default the newest complete one); returns iteration, consumed
        samples and this rank's RNG states."""

    @property
    def loss_scale(self) -> float: ...

    @property
    def learning_rate(self) -> float: ...

    @property
    def num_zeros_in_grad(self) -> Optional[int]:
        """Zero gradient entries of the last step under --log-num-zeros-in-grad, else None."""

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of this rank's parameters, gradients and optimizer state, measured from the tensors."""
