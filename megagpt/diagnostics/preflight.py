"""Pre-flight (--check-schedule): every rank's pipeline instruction list simulated together before the first step.

A send without its matching receive does not fail: it hangs, mid-step, with every stage waiting on another. The lists
are pure functions of (schedule, micro-batches, stages, chunks), so the whole pipeline can be run without tensors in
the simulator of pipeline/simulator.py (milliseconds) and an unmatched send/receive refused up front, naming the
stage, instruction and micro-batch. Every rank checks the same lists, so every rank refuses alike.
"""
from __future__ import annotations

from megagpt.config import Config, ConfigError, num_microbatches, num_model_chunks, v_shaped
from megagpt.pipeline.schedules import build_schedule
from megagpt.pipeline.simulator import ScheduleError, simulate


def check_schedules(config: Config, pp_size: int, dp_size: int, consumed_samples: int = 0) -> None:
    """Simulate the training lists at the first and the final global batch size, and the evaluation lists."""
    schedule, chunks = config.parallel.pipeline_schedule, num_model_chunks(config)
    counts = sorted({num_microbatches(config, dp_size, consumed_samples), num_microbatches(config, dp_size)})
    for count in counts:
        for forward_only in (False, True):
            lists = [build_schedule(count, pp_size, r, chunks, forward_only, schedule) for r in range(pp_size)]
            try:
                simulate(lists, v_shape=v_shaped(schedule))
            except ScheduleError as exc:
                raise ConfigError(f"--check-schedule: pipeline schedule {schedule or 'default'} with {count} "
                                  f"micro-batches over {pp_size} stages x {chunks} chunks"
                                  f"{' (forward only)' if forward_only else ''} cannot run: {exc}") from exc
