"""Bandwidth of the fused scale+mask+softmax kernels vs PyTorch and vs the device's copy bandwidth.

    python bench/softmax.py [--dtype bf16|fp16] [--iters 50] [--shapes 4x16x2048x2048,...]

For each [b, np, sq, sk] shape it times (CUDA events, after warm-up), and reports GB/s = bytes a minimal
implementation must move / time:
  copy        out.copy_(scores): the device's achievable read+write bandwidth, the ceiling (2 x tensor bytes)
  fused fwd   the kernel forward (causal reads only the lower triangle but still writes the whole tensor;
              counted as 2 x tensor bytes so numbers compare with copy)
  torch fwd   the PyTorch path of FusedScaleMaskSoftmax (fp32 upcast, scale, mask, softmax, cast back)
  softmax     bare torch.softmax(scores, -1) in the input dtype, no scale or mask (a lower bound for eager)
  fused bwd / torch bwd   backward (3 x tensor bytes: read grad and probs, write grad)
Without CUDA it prints why and times the PyTorch path on the CPU only (no kernel to compare).
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from _common import print_table  # also puts the repo root on sys.path
from megagpt.model.softmax import FusedScaleMaskSoftmax, is_available, unavailable_reason

DEFAULT_SHAPES = "4x16x512x512,4x16x1024x1024,2x16x2048x2048,1x16x4096x4096,1x8x8192x8192,1x4x16384x16384"


def parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    shapes = []
    for item in text.split(","):
        b, h, sq, sk = (int(v) for v in item.lower().split("x"))
        shapes.append((b, h, sq, sk))
    return shapes


def time_cuda(fn: Callable[[], object], iters: int) -> float:
    """Mean seconds per call over `iters` calls, measured with CUDA events after 3 warm-up calls."""
    for _ in range(3):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / 1e3 / iters


def time_cpu(fn: Callable[[], object], iters: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def backward_fn(module: FusedScaleMaskSoftmax, scores: torch.Tensor, mask, grad: torch.Tensor) -> Callable[[], object]:
    leaf = scores.detach().requires_grad_()
    probs = module(leaf, mask)
    return lambda: torch.autograd.grad(probs, leaf, grad, retain_graph=True)


def bench_cuda(shapes, dtype: torch.dtype, iters: int) -> None:
    print(f"device: {torch.cuda.get_device_name()}  dtype: {dtype}  iters: {iters}")
    if not is_available():
        print(f"fused kernel unavailable: {unavailable_reason()}; timing the PyTorch path only")
    table = []
    for b, h, sq, sk in shapes:
        scores = torch.randn(b, h, sq, sk, device="cuda").to(dtype)
        grad = torch.randn_like(scores)
        nbytes = scores.numel() * scores.element_size()
        copy_out = torch.empty_like(scores)
        copy_gbs = 2 * nbytes / time_cuda(lambda: copy_out.copy_(scores), iters) / 1e9
        softmax_gbs = 2 * nbytes / time_cuda(lambda: torch.softmax(scores, -1), iters) / 1e9
        for kind in ("causal", "padding"):
            mask = None if kind == "causal" else torch.rand(b, 1, 1, sk, device="cuda") < 0.1
            fused = FusedScaleMaskSoftmax(kind, 0.125)
            eager = FusedScaleMaskSoftmax(kind, 0.125, masked_softmax_fusion=False)
            use_fused = fused.fused_unavailable_reason(scores, mask) is None
            rows = {}
            for name, module in (("fused", fused), ("torch", eager)):
                if name == "fused" and not use_fused:
                    rows[name] = (float("nan"), float("nan"))
                    continue
                fwd = time_cuda(lambda: module(scores, mask), iters)
                bwd = time_cuda(backward_fn(module, scores, mask, grad), iters)
                rows[name] = (2 * nbytes / fwd / 1e9, 3 * nbytes / bwd / 1e9)
            (ffwd, fbwd), (tfwd, tbwd) = rows["fused"], rows["torch"]
            table.append([f"{b}x{h}x{sq}x{sk}", kind, f"{copy_gbs:.0f}", f"{ffwd:.0f}", f"{tfwd:.0f}",
                          f"{softmax_gbs:.0f}", f"{fbwd:.0f}", f"{tbwd:.0f}", f"{ffwd / copy_gbs:.2f}",
                          f"{ffwd / tfwd:.2f}"])
        del scores, grad, copy_out
        torch.cuda.empty_cache()
    print_table(["shape", "mask", "copy", "fused fwd", "torch fwd", "softmax", "fused bwd", "torch bwd", "fwd/copy",
                 "fwd x torch"], table, title="GB/s (last two columns: ratios)")


def bench_cpu(dtype: torch.dtype, iters: int) -> None:
    print(f"no CUDA (torch {torch.__version__}): the fused kernel cannot run here; PyTorch path on the CPU only")
    table = []
    for b, h, sq, sk in [(1, 4, 256, 256), (1, 4, 512, 512)]:
        scores = torch.randn(b, h, sq, sk).to(dtype)
        grad = torch.randn_like(scores)
        nbytes = scores.numel() * scores.element_size()
        out = torch.empty_like(scores)
        copy_gbs = 2 * nbytes / time_cpu(lambda: out.copy_(scores), iters) / 1e9
        softmax_gbs = 2 * nbytes / time_cpu(lambda: torch.softmax(scores, -1), iters) / 1e9
        for kind in ("causal", "padding"):
            mask = None if kind == "causal" else torch.rand(b, 1, 1, sk) < 0.1
            module = FusedScaleMaskSoftmax(kind, 0.125)
            fwd = 2 * nbytes / time_cpu(lambda: module(scores, mask), iters) / 1e9
            bwd = 3 * nbytes / time_cpu(backward_fn(module, scores, mask, grad), iters) / 1e9
            table.append([f"{b}x{h}x{sq}x{sk}", kind, f"{copy_gbs:.2f}", f"{fwd:.2f}", f"{softmax_gbs:.2f}",
                          f"{bwd:.2f}"])
    print_table(["shape", "mask", "copy", "torch fwd", "softmax", "torch bwd"], table, title="GB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated BxNPxSQxSK")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    if torch.cuda.is_available():
        bench_cuda(parse_shapes(args.shapes), dtype, args.iters)
    else:
        bench_cpu(dtype, max(1, min(args.iters, 5)))


if __name__ == "__main__":
    main()
