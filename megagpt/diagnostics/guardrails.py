"""What diagnostics/ adds to a training run, behind a few calls from the loop (training.train_loop).

`Guardrails(config, trainer, ps)` runs the pre-flight schedule check, hands the numerical StepGuard to the engine
(the optimizer consults it before every update) and starts the watchdog. The loop then calls `begin_iteration`
(the ledger's iteration, fault injection's clock), `end_iteration` (replica consistency, straggler report) and
`rollback` when the StepGuard asks for one (--on-spike rollback), runs inside `watching()` (a collective that
raises because a peer died starts the same forensics as a hang), and `close()`s it. Everything here is off the
hot path except one small all-reduce per step for the NaN/spike verdict.
"""
from __future__ import annotations

import contextlib
import statistics
import sys
import time
import traceback
from typing import Any, Iterator, Optional

import torch

from megagpt.checkpoint.format import (SKIP_FILE, CheckpointError, has_checkpoint, read_tracker,
                                       write_iterations_to_skip)
from megagpt.checkpoint.sharded import set_rng_state
from megagpt.config import Config, TrainConfig, non_persistent_dir
from megagpt.diagnostics.ledger import LEDGER
from megagpt.diagnostics.numerics import NumericalAbort, StepGuard, replica_mismatch
from megagpt.diagnostics.preflight import check_schedules
from megagpt.diagnostics.watchdog import Watchdog, connect_store
from megagpt.parallel import comm
from megagpt.parallel.state import ParallelState


def report_dir(config: Config) -> str:
    """Where hang_report/ goes: --hang-report-dir, else --save, else --tensorboard-dir, else the working directory."""
    t = config.train
    return config.diagnostics.hang_report_dir or t.save or t.tensorboard_dir or "."


def newest_checkpoint_dir(t: TrainConfig) -> Optional[str]:
    """The directory holding this run's newest complete checkpoint: --save, or the non-persistent one."""
    candidates = [d for d in (t.save, non_persistent_dir(t) if t.non_persistent_save_interval else None)
                  if d and has_checkpoint(d)]
    return max(candidates, key=read_tracker) if candidates else None


def straggler_line(iteration: int, times: list[float], top: int = 3) -> str:
    """The slowest ranks' mean step time against the median over ranks."""
    median = statistics.median(times)
    slowest = sorted(range(len(times)), key=lambda r: -times[r])[:top]
    return (f" straggler report at iteration {iteration}: median step {median * 1000:.1f} ms; slowest: "
            + ", ".join(f"rank {r} {times[r] * 1000:.1f} ms ({times[r] / median:.2f}x)" for r in slowest))


class Guardrails:
    """Pre-flight, numerical guardrails, watchdog, replica check and straggler report of one run."""

    def __init__(self, config: Config, trainer: Any, ps: ParallelState, log: bool = True) -> None:
        d, self.config, self.trainer, self.ps = config.diagnostics, config, trainer, ps
        self.reporter = log and ps.rank == 0
        self.device: torch.device = trainer.device
        if d.check_schedule:
            check_schedules(config, ps.pp_size, ps.dp_size, trainer.consumed_samples)
        self.guard: Optional[StepGuard] = None
        if d.check_for_nan_in_loss_and_grad or d.check_for_spiky_loss:
            self.guard = StepGuard(ps, self.device, d.check_for_nan_in_loss_and_grad,
                                   check_grads=not config.optim.fp16, on_nan=d.on_nan,
                                   spike_factor=d.spiky_loss_factor if d.check_for_spiky_loss else None,
                                   on_spike=d.on_spike, reporter=self.reporter)
        if hasattr(trainer.engine, "guard"):      # the native engine; DeepSpeed keeps its own overflow checks
            trainer.engine.guard = self.guard
        self.watchdog: Optional[Watchdog] = None
        if d.watchdog_timeout_seconds > 0:
            self.watchdog = Watchdog(d.watchdog_timeout_seconds, report_dir(config), ps.rank, ps.world_size,
                                     connect_store()).start()
        self.step_times: list[float] = []
        self._started = time.perf_counter()

    def begin_iteration(self, iteration: int) -> None:
        LEDGER.set_iteration(iteration)
        self._started = time.perf_counter()

    def end_iteration(self, iteration: int) -> None:
        """After the step and its log line: the replica check and the straggler report when due (collective)."""
        self.step_times.append(time.perf_counter() - self._started)
        d, t = self.config.diagnostics, self.config.train
        if d.check_replica_consistency_interval and iteration % d.check_replica_consistency_interval == 0:
            named = [(n, p) for chunk in self.trainer.chunks for n, p in chunk.named_parameters()]
            problem = replica_mismatch(named, self.ps, self.device)
            if problem:
                message = f"at iteration {iteration}: {problem}"
                if self.reporter:
                    print(f" megagpt guardrail: {message}", flush=True)
                raise NumericalAbort(message)
        if d.log_straggler and iteration % t.log_interval == 0:
            mine = torch.tensor([statistics.fmean(self.step_times)], dtype=torch.float64, device=self.device)
            every = torch.empty(self.ps.world_size, dtype=torch.float64, device=self.device)
            comm.all_gather_into(every, mine, None)
            if self.reporter:
                print(straggler_line(iteration, every.cpu().tolist()), flush=True)
        if iteration % t.log_interval == 0:
            self.step_times = []

    @property
    def rollback_requested(self) -> bool:
        return self.guard is not None and self.guard.rollback_at is not None

    def rollback(self, iteration: int) -> int:
        """--on-spike rollback after the spike at `iteration` (its update already dropped): reload the run's newest
        checkpoint and skip every iteration since, the spike's included (PaLM's recipe: the weights never see the
        data that led into the spike). The skipped iterations are recorded beside the checkpoints before anything
        is reloaded, so a resume from any of them skips them too. Returns the iteration the loop continues after."""
        trainer, t = self.trainer, self.config.train
        trainer.poll_save(block=True)                 # an in-flight save may be the newest checkpoint
        directory = newest_checkpoint_dir(t)
        if directory is None:
            self.guard.forget_after(iteration)
            self._say(f" megagpt guardrail: no checkpoint to roll back to yet: the update of iteration {iteration} "
                      f"is dropped and training goes on")
            return iteration
        target = read_tracker(directory)
        trainer.iterations_to_skip.update(range(target + 1, iteration + 1))
        if self.ps.rank == 0:
            for d in {directory, t.save}:
                write_iterations_to_skip(d, trainer.iterations_to_skip)
        rng_state = trainer.load(directory, target)
        trainer.attach_data()
        if rng_state is not None:
            set_rng_state(rng_state, trainer.tracker)   # the run's own checkpoint: same device kind
        self.guard.forget_after(target)
        gbs = trainer.global_batch_size
        self._say(f" megagpt guardrail: rolled back to the checkpoint of iteration {target} in {directory}; "
                  f"iterations {target + 1}-{iteration} (from sample {trainer.consumed_samples}, {gbs} per "
                  f"iteration) will only read their data (recorded in {SKIP_FILE})")
        return target

    def _say(self, line: str) -> None:
        if self.reporter:
            print(line, flush=True)

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """A backend error (a peer died, a connection closed) runs the hang forensics, then the rank exits."""
        try:
            yield
        except RuntimeError as exc:
            if self.watchdog is None or isinstance(exc, CheckpointError):
                raise
            traceback.print_exc(file=sys.stderr)
            self.watchdog.fire(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        if hasattr(self.trainer.engine, "guard"):
            self.trainer.engine.guard = None
