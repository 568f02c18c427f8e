#!/usr/bin/env python3
"""Build the fused softmax CUDA extension ahead of time (into torch's extension cache, TORCH_EXTENSIONS_DIR).

    python tools/build_cuda_extension.py

Training builds it on first use anyway; building here, at install time, turns a missing nvcc or a compile error
into a failed install instead of a run that starts and then falls back (or, with --attention-backend fused, stops).
Exit status: 0 built (or no CUDA torch: nothing to build, said so), 1 the build failed.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402

from megagpt.model import softmax  # noqa: E402


def main() -> int:
    if torch.version.cuda is None:
        print(f"torch {torch.__version__} has no CUDA: no fused softmax extension to build (CPU runs use PyTorch's "
              f"softmax)")
        return 0
    if softmax.is_available():
        print(f"fused softmax extension built for torch {torch.__version__} (CUDA {torch.version.cuda})")
        return 0
    print(f"error: the fused softmax extension did not build: {softmax.unavailable_reason()}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
