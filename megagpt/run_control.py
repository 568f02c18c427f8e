"""When a run stops early: --exit-interval, --exit-duration-in-mins and --exit-signal-handler (Megatron's flags).

A cluster's scheduler sends SIGTERM a while before it preempts or times out a job (SLURM: `#SBATCH --signal`).
The handler only records the signal; at the end of every iteration all ranks agree, with one all-reduce over the
world, whether any rank has seen it or run past the duration, so every rank stops after the same iteration, the
checkpoint is saved by all of them, and the job exits 0. Without these flags no collective is added.
"""
from __future__ import annotations

import signal
import time
from typing import Optional

import torch

from megagpt.config import TrainConfig
from megagpt.parallel import comm


class RunControl:
    """Decides, after each iteration, whether the run stops there; `reason` says why."""

    def __init__(self, train: TrainConfig, world_group, device: torch.device) -> None:
        self.train, self.group, self.device = train, world_group, device
        self.start = time.monotonic()
        self.signal_received = False
        self.reason: Optional[str] = None
        self._previous = None
        if train.exit_signal_handler:
            self.signum = getattr(signal, train.exit_signal)
            self._previous = signal.signal(self.signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:   # noqa: ARG002 - the signal module's signature
        self.signal_received = True

    @property
    def agrees_every_iteration(self) -> bool:
        return self.train.exit_signal_handler or self.train.exit_duration_in_mins is not None

    def should_exit(self, iteration: int) -> bool:
        """Collective when a signal or duration is watched: every rank calls it after every iteration."""
        t = self.train
        if self.agrees_every_iteration:
            elapsed = (time.monotonic() - self.start) / 60.0
            flags = torch.tensor([float(self.signal_received),
                                  float(t.exit_duration_in_mins is not None and elapsed > t.exit_duration_in_mins)],
                                 device=self.device)
            comm.all_reduce_max(flags, self.group)
            if flags[0] > 0:
                self.reason = f"received {t.exit_signal}"
            elif flags[1] > 0:
                self.reason = f"exit duration of {t.exit_duration_in_mins} minutes reached"
        if self.reason is None and t.exit_interval and iteration % t.exit_interval == 0:
            self.reason = f"exit interval {t.exit_interval} reached"
        return self.reason is not None

    def close(self) -> None:
        """Give the signal back to whoever handled it before."""
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None
