"""A run's datasets and the micro-batches a training step reads from its loader.

`build_datasets` sizes train, validation and test sets for the whole run from the config (every step's global
batch added up, ramp-up included); `MicroBatches` slices each loader batch of `seq_length + 1` tokens into the
(tokens, labels, loss mask) triple the engines take. Knows no model and no process group: ranks arrive as ints.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from megagpt.config import Config, final_global_batch_size, train_iters, train_samples
from megagpt.data.gpt_dataset import MockGPTDataset, build_dataset, build_train_valid_test_datasets


class MicroBatches:
    """Pulls one step's micro-batches from a loader and slices them into (tokens, labels, loss mask); with
    `masked_token` (the end-of-document id under --eod-mask-loss) positions whose input is that token don't count."""

    def __init__(self, loader, device: torch.device, masked_token: Optional[int] = None) -> None:
        self.iterator: Iterator = iter(loader)
        self.device, self.masked_token = device, masked_token

    def next_step(self, count: int) -> list[tuple]:
        batches = []
        for _ in range(count):
            text = next(self.iterator)["text"].to(self.device, non_blocking=True)   # [b, s+1]
            tokens = text[:, :-1].contiguous()                                      # [b, s]
            mask = None if self.masked_token is None else (tokens != self.masked_token).float()   # [b, s]
            batches.append((tokens, text[:, 1:].contiguous(), mask))
        return batches


def build_datasets(config: Config, dp_size: int, is_builder: bool) -> tuple:
    """Train, validation and test datasets sized for the whole run (train: every step's global batch added up)."""
    t, m, d = config.train, config.model, config.data
    iters, gbs = train_iters(config, dp_size), final_global_batch_size(config, dp_size)
    eval_rounds = (iters // t.eval_interval + 1) * t.eval_iters if t.eval_interval else 0
    samples = (train_samples(config, dp_size), eval_rounds * gbs, t.eval_iters * gbs)
    if d.mock_data:
        return tuple(MockGPTDataset(n, m.seq_length, m.vocab_size, config.train.seed + i) if n else None
                     for i, n in enumerate(samples))
    where = dict(cache_dir=d.data_cache_path, is_builder=is_builder, mmap_bin=d.mmap_bin_files)
    if d.data_path:
        return build_train_valid_test_datasets(d.data_path, d.split, samples, m.seq_length, t.seed, **where)
    paths = (d.train_data_path, d.valid_data_path, d.test_data_path)
    return tuple(build_dataset(path, k, n, m.seq_length, t.seed, **where) if path and n else None
                 for k, (path, n) in enumerate(zip(paths, samples)))
