#!/usr/bin/env python3
"""Plan a run before launching it: predicted memory per pipeline stage, step time, and the best layouts.

    python tools/plan.py --model-size gpt-1.3b --seq-length 2048 --global-batch-size 512 --bf16 \\
        --use-distributed-optimizer --cluster h100-80gb --num-gpus 16
    python tools/plan.py ... --json          # the ranked layouts as JSON
    python tools/plan.py ... --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --explain

Training flags are pretrain_gpt.py's; layout flags given stay fixed, the others are searched. The work is done by
megagpt.plan (pure arithmetic); `--cluster cpu-here` measures this machine with megagpt.diagnostics.hardware.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from megagpt.plan.command import run  # noqa: E402


def _measure(num_gpus: int):
    from megagpt.diagnostics.hardware import measure_cpu_cluster
    return measure_cpu_cluster(num_gpus)


def main(argv=None) -> int:
    text, status = run(sys.argv[1:] if argv is None else argv, measure=_measure)
    print(text, file=sys.stderr if status else sys.stdout)
    return status


if __name__ == "__main__":
    sys.exit(main())
