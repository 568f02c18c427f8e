"""Training engines: what runs one optimizer step over this rank's model chunks, and saves and loads its state.

The Trainer holds exactly one engine and never asks which: `native` (megagpt's pipeline schedules, grad buffers,
ZeRO-1/2 and mixed precision) or `deepspeed` (DeepSpeed owns data parallelism; optional dependency).
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from megagpt.config import Config
from megagpt.engines.base import Engine
from megagpt.parallel import random as tp_random
from megagpt.parallel.state import ParallelState
from megagpt.timers import Timers


def build_engine(config: Config, chunks: list[nn.Module], ps: ParallelState, tracker: tp_random.RNGStatesTracker,
                 local_rank: int, timers: Optional[Timers] = None) -> Engine:
    """The engine the config asks for; DeepSpeed is imported only when --deepspeed is given. `timers` reach the
    native engine's schedule, reductions and optimizer (DeepSpeed times its own steps: --timing-log-level reports
    only the Trainer's spans there)."""
    if config.parallel.deepspeed:
        from megagpt.engines.deepspeed import DeepSpeedEngine
        return DeepSpeedEngine(config, chunks, ps, tracker, local_rank)
    from megagpt.engines.native import NativeEngine
    return NativeEngine(config, chunks, ps, tracker, timers)
