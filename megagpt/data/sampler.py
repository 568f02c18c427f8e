"""Micro-batch sampler that splits each global window across DP ranks and resumes from consumed_samples.

Megatron's rule (DESIGN.md "Batches"): within each window of ``micro * DP`` consecutive sample indices,
DP rank r takes ``[r*micro, (r+1)*micro)``. Every layout therefore consumes exactly the samples of DP=1
in the same order, and resuming only needs the number of samples consumed so far.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.utils.data


class PretrainingSampler:
    """Yields this DP rank's micro-batches (lists of sample indices), starting at ``consumed_samples``.

    With ``drop_last=False`` a trailing partial window is split by the same rule; ranks whose part of
    it is empty yield nothing for it.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ) -> None:
        if total_samples <= 0:
            raise ValueError(f"total_samples must be positive, got {total_samples}")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(
                f"consumed_samples must be in [0, total_samples={total_samples}), got {consumed_samples}"
                " (the dataset is exhausted or the checkpoint belongs to other data)"
            )
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if data_parallel_size <= 0:
            raise ValueError(f"data_parallel_size must be positive, got {data_parallel_size}")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank must be in [0, {data_parallel_size}), got {data_parallel_rank}")
        self.total_samples = int(total_samples)
        self.consumed_samples = int(consumed_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.data_parallel_rank = int(data_parallel_rank)
        self.data_parallel_size = int(data_parallel_size)
        self.drop_last = drop_last
        self.window = self.micro_batch_size * self.data_parallel_size

    def _rank_slice(self, window_start: int, window_end: int) -> list[int]:
        start = window_start + self.data_parallel_rank * self.micro_batch_size
        end = min(start + self.micro_batch_size, window_end)
        return list(range(start, end)) if start < end else []

    def __iter__(self) -> Iterator[list[int]]:
        window_start = self.consumed_samples
        while window_start + self.window <= self.total_samples:
            yield self._rank_slice(window_start, window_start + self.window)
            window_start += self.window
        if not self.drop_last and window_start < self.total_samples:
            batch = self._rank_slice(window_start, self.total_samples)
            if batch:
                yield batch

    def __len__(self) -> int:
        remaining = self.total_samples - self.consumed_samples
        full = remaining // self.window
        if self.drop_last:
            return full
        tail = remaining - full * self.window
        return full + int(tail > self.data_parallel_rank * self.micro_batch_size)


class CyclicSampler:
    """Megatron's `--dataloader-type cyclic` (MegatronPretrainingRandomSampler): the dataset (less a last partial
    window) is cut into one bucket per DP rank; every epoch each rank walks its bucket in the order of a permutation
    seeded by the epoch number, forever. Resumes from ``consumed_samples`` (all ranks together). Unlike the single
    sampler, which samples a rank sees depends on the DP size."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int,
                 data_parallel_size: int) -> None:
        self.window = micro_batch_size * data_parallel_size
        if total_samples < self.window:
            raise ValueError(f"the dataset has {total_samples} samples, fewer than one window of micro-batch-size "
                             f"{micro_batch_size} x data-parallel size {data_parallel_size}")
        self.micro_batch_size, self.rank, self.dp = micro_batch_size, data_parallel_rank, data_parallel_size
        self.active = total_samples - total_samples % self.window
        self.bucket = self.active // data_parallel_size
        self.consumed_samples = consumed_samples

    def __iter__(self) -> Iterator[list[int]]:
        consumed = self.consumed_samples
        while True:
            epoch, in_epoch = divmod(consumed, self.active)
            generator = torch.Generator().manual_seed(epoch)
            order = torch.randperm(self.bucket, generator=generator).tolist()
            start = self.rank * self.bucket
            for offset in range(in_epoch // self.dp, self.bucket, self.micro_batch_size):
                batch = order[offset:offset + self.micro_batch_size]
                if len(batch) < self.micro_batch_size:
                    break
                yield [start + i for i in batch]
                consumed += self.window
            consumed = (epoch + 1) * self.active


def _collate_text(items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack ``{"text": int64 [s+1]}`` items into ``{"text": LongTensor [b, s+1]}``."""
    return {"text": torch.from_numpy(np.stack([item["text"] for item in items]).astype(np.int64, copy=False))}


def build_data_loader(
    dataset: torch.utils.data.Dataset,
    consumed_samples: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    num_workers: int = 0,
    drop_last: bool = True,
    cyclic: bool = False,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """DataLoader over this DP rank's micro-batches, resuming after ``consumed_samples`` samples (``cyclic``:
    Megatron's shuffled, endless --dataloader-type cyclic). ``pin_memory`` (for a CUDA device) makes the
    trainer's ``non_blocking`` host-to-device copies really asynchronous."""
    if cyclic:
        sampler = CyclicSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    else:
        sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size, drop_last)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=_collate_text,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )
