#!/usr/bin/env python
"""Pre-train a GPT with Megatron-LM flags: `torchrun --nproc-per-node N examples/pretrain_gpt.py --help`."""
import sys

import torch.distributed as dist

from megagpt.cli import parse_args
from megagpt.config import ConfigError
from megagpt.diagnostics.numerics import NumericalAbort
from megagpt.training import pretrain


def main() -> int:
    config = parse_args()
    try:
        pretrain(config)
    except ConfigError as exc:
        print(f"megagpt: {exc}", file=sys.stderr, flush=True)
        return 2
    except NumericalAbort as exc:     # NaN/Inf or diverged replicas under the abort policy: nothing was saved
        print(f"megagpt: aborted: {exc}", file=sys.stderr, flush=True)
        return 4
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
