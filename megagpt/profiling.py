"""What runs between iterations to look inside a step or to steady it: the torch.profiler window (--profile), CUDA
memory history (--record-memory-history) and manual garbage collection (--manual-gc).

Profiling follows Megatron's window: iterations (profile_step_start, profile_step_end] are recorded on
--profile-ranks, after one warm-up iteration (the profiler's own start-up cost stays out of the trace), and the trace
is written when the window closes as Chrome/Perfetto JSON, `rank-<r>.json.gz`, in `<tensorboard-dir>/../torch_profile`
(Megatron's place) or `<save>/torch_profile`. Megatron's plain --profile drives nsys instead; here the torch trace is
always written and, on CUDA, cudaProfilerStart/Stop bracket the same window so `nsys --capture-range=cudaProfilerApi`
captures it too.

Manual GC: Python's collector runs when allocation counts cross thresholds, at different moments on each rank, and a
full collection stalls a rank for tens of milliseconds while its peers wait in the next collective. --manual-gc turns
it off and collects on every rank after the same iterations (every --manual-gc-interval, and around evaluation
unless --no-manual-gc-eval), so pauses line up. Unlike Megatron, the collector is switched back on when training ends.
"""
from __future__ import annotations

import contextlib
import gc
import os
from typing import Iterator, Optional

import torch

from megagpt.config import Config


def profile_dir(config: Config) -> str:
    """Where traces go: beside the TensorBoard logs (Megatron's <tensorboard-dir>/../torch_profile), else the save dir."""
    t = config.train
    if t.tensorboard_dir:
        return os.path.join(os.path.dirname(os.path.abspath(t.tensorboard_dir)), "torch_profile")
    return os.path.join(t.save, "torch_profile")


class Instruments:
    """This rank's profiler window, CUDA memory history and manual GC for one run of the training loop.

    Call `after_iteration(i)` at the end of every iteration, wrap evaluation in `evaluation()`, `close()` at the end
    (also on errors: it stops the profiler and re-enables the garbage collector)."""

    def __init__(self, config: Config, rank: int, device: torch.device, start_iteration: int) -> None:
        lg = config.logging
        self.config, self.rank, self.device = config, rank, device
        self.profiled_rank = rank in lg.profile_ranks
        self.cuda = device.type == "cuda"
        self.profiler: Optional[torch.profiler.profile] = None
        self.trace_path: Optional[str] = None
        first = start_iteration + 1                                # iterations are numbered from 1
        self.first_active = max(lg.profile_step_start + 1, first)
        if lg.profile and self.profiled_rank and self.first_active <= lg.profile_step_end:
            self._start_profiler(first)
        if lg.record_memory_history and self.profiled_rank and self.cuda:
            torch.cuda.memory._record_memory_history()
        self.gc_was_enabled = gc.isenabled()
        if lg.manual_gc:
            gc.disable()
            gc.collect()

    def _start_profiler(self, first: int) -> None:
        lg = self.config.logging
        warmup = 1 if self.first_active > first else 0              # the iteration before the window, if we run it
        schedule = torch.profiler.schedule(wait=self.first_active - warmup - first, warmup=warmup,
                                           active=lg.profile_step_end - self.first_active + 1, repeat=1)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.trace_path = os.path.join(profile_dir(self.config), f"rank-{self.rank}.json.gz")
        self.profiler = torch.profiler.profile(
            activities=activities, schedule=schedule, on_trace_ready=self._write_trace,
            record_shapes=lg.pytorch_profiler_collect_shapes, with_stack=lg.pytorch_profiler_collect_callstack,
            profile_memory=lg.record_memory_history)
        self.profiler.start()
        if self.cuda and self.first_active == first:
            torch.cuda.profiler.start()

    def _write_trace(self, prof: torch.profiler.profile) -> None:
        os.makedirs(os.path.dirname(self.trace_path), exist_ok=True)
        prof.export_chrome_trace(self.trace_path)
        print(f" > rank {self.rank}: profiler trace of iterations {self.first_active}-"
              f"{self.config.logging.profile_step_end} written to {self.trace_path}", flush=True)

    def after_iteration(self, iteration: int) -> None:
        lg = self.config.logging
        if self.profiler is not None:
            if self.cuda and iteration == self.first_active - 1:
                torch.cuda.profiler.start()
            self.profiler.step()
            if iteration == lg.profile_step_end:
                self._stop_profiler()
        if lg.record_memory_history and self.profiled_rank and self.cuda \
                and iteration % self.config.train.log_interval == 0:
            base, ext = os.path.splitext(lg.memory_snapshot_path)
            torch.cuda.memory._dump_snapshot(f"{base}_{self.rank}{ext}")
        if lg.manual_gc and lg.manual_gc_interval and iteration % lg.manual_gc_interval == 0:
            gc.collect()

    def _stop_profiler(self) -> None:
        if self.cuda:
            torch.cuda.profiler.stop()
        self.profiler.stop()
        self.profiler = None

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        """Megatron's --manual-gc around evaluation: a full collection before, the young generation after."""
        collect = self.config.logging.manual_gc and self.config.logging.manual_gc_eval
        if collect:
            gc.collect()
        yield
        if collect:
            gc.collect(generation=0)

    def close(self) -> None:
        if self.profiler is not None:     # training ended inside the window: keep what was recorded
            self._stop_profiler()
        if self.config.logging.manual_gc and self.gc_was_enabled:
            gc.enable()
