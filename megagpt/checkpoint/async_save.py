"""--async-save: checkpoint files written by a background thread while training goes on.

At the iteration boundary the state is copied to host memory (sharded.prepare_checkpoint: the only part training
waits for), then a thread writes the files, each atomically as in a synchronous save. The checkpoint is marked
complete (tracker file) only once every rank's thread has finished without error: after each iteration the ranks
agree on that with one small all-reduce, and rank 0 then writes the tracker. A failed write is reported and the
checkpoint is never marked; the previous one stays the resume point. At most one save is in flight: a new one
first waits for the last.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch

from megagpt.checkpoint.sharded import PendingSave, commit_checkpoint, write_files
from megagpt.parallel import comm
from megagpt.parallel.state import ParallelState


class AsyncCheckpointWriter:
    """One rank's background writer; `poll` is collective while a save is in flight."""

    def __init__(self, ps: ParallelState, device: torch.device) -> None:
        self.ps, self.device = ps, device
        self.pending: Optional[PendingSave] = None
        self.thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None

    @property
    def in_flight(self) -> bool:
        return self.pending is not None

    def submit(self, pending: PendingSave) -> None:
        """Start writing `pending` in the background (after finishing the save before it, if any)."""
        if self.in_flight:
            self.poll(block=True)
        self.pending, self.error = pending, None
        self.thread = threading.Thread(target=self._write, name=f"async-save-{pending.iteration}", daemon=True)
        self.thread.start()

    def _write(self) -> None:
        try:
            write_files(self.pending)
        except BaseException as exc:   # reported by poll on every rank; training goes on
            self.error = exc

    def poll(self, block: bool = False) -> Optional[tuple[str, int]]:
        """Collective when a save is in flight: (directory, iteration) of the checkpoint it completed (tracker
        written), or None while any rank is still writing, or when one failed (then reported, left unmarked)."""
        if not self.in_flight:
            return None
        if block:
            self.thread.join()
        done = not self.thread.is_alive()
        state = torch.tensor([0.0 if done else 1.0, 1.0 if done and self.error is not None else 0.0],
                             device=self.device)
        comm.all_reduce_max(state, None)                    # any rank still writing / any rank failed
        if state[0] > 0:
            return None
        pending, self.pending = self.pending, None
        if state[1] > 0:
            if self.error is not None:
                print(f"megagpt: rank {self.ps.rank}: async save of iteration {pending.iteration} failed, the "
                      f"checkpoint is not marked complete: {self.error!r}", flush=True)
            return None
        commit_checkpoint(pending, self.ps)
        return pending.directory, pending.iteration
