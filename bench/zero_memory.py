"""Per-rank memory of params, grads and optimizer state, and DP bytes per step, for DDP / ZeRO-1 / ZeRO-2.

Everything is measured from the tensors a rank holds after a training step (between steps) and from
comm.count_bytes() around one step, on a fixed toy model, next to the formula:
mixed-precision Adam holds 2 (bf16 param) + 4 (fp32 main_grad) + 4 (fp32 master) + 8 (two fp32 moments) = 18
bytes per parameter (the ZeRO paper's 16 assumes 2-byte grads; ours accumulate in fp32); ZeRO-1 shards
master + moments (12/DP), ZeRO-2 also the grads (4/DP). In fp32 the master is the parameter itself: 4 + 4 + 8.
Bytes per step are compared with one ring all-reduce of the fp32 grad buffer: ZeRO's reduce-scatter (fp32 grads)
+ all-gather (params) equals it exactly in fp32 and is 3/4 of it with bf16 params (the all-gather moves 2-byte
params).

    python bench/zero_memory.py [--hidden 512] [--layers 2]
"""
from __future__ import annotations

import argparse
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from _common import free_port, print_table
from megagpt.optim.grad_buffer import DataParallelGradReducer, finalize_model_grads
from megagpt.config import OptimConfig
from megagpt.optim.zero import build_dp_optimizer
from megagpt.parallel import comm
from megagpt.parallel.state import ParallelState

BUCKET = 1_000_000


def build_model(hidden: int, layers: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden), nn.LayerNorm(hidden)]
    return nn.Sequential(*blocks).to(dtype)


def measure(hidden: int, layers: int, dtype: torch.dtype, zero: int) -> dict:
    """One rank: build, train two steps (Adam state exists after the first), measure the second."""
    ps = ParallelState(1, 1)
    model = build_model(hidden, layers, dtype)
    reducer = DataParallelGradReducer(model.parameters(), ps, bucket_size=BUCKET, use_distributed_optimizer=zero > 0,
                                      overlap_grad_reduce=True, zero_stage=max(zero, 1))
    opt = build_dp_optimizer(ps, OptimConfig(lr=1e-3, bf16=dtype == torch.bfloat16), reducer)
    x = torch.randn(8, hidden, dtype=dtype)
    counted = None
    for step in range(2):
        opt.zero_grad()
        with comm.count_bytes() as counter:
            F.mse_loss(model(x).float(), torch.zeros(8, hidden)).backward()
            finalize_model_grads(model.parameters(), ps, reducer)
            opt.step()
        counted = counter
    mem = opt.memory_bytes()
    return {"n": sum(p.numel() for p in model.parameters()), "buffer": sum(b.numel for b in reducer.buffers),
            "comm": dict(counted), **mem}


def _worker(rank: int, world: int, port: int, args: tuple, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    try:
        result = measure(*args)
        if rank == world - 1:     # every rank holds the same amounts (equal shards); report one
            queue.put(result)
    finally:
        dist.destroy_process_group()


def run(world: int, *args) -> dict:
    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get()          # read before joining: the payload may exceed a pipe buffer
    for p in procs:
        p.join()
    return result


def formula(dtype: torch.dtype, zero: int, dp: int) -> tuple[float, float, float]:
    param = 2 if dtype == torch.bfloat16 else 4
    opt = 12 if dtype == torch.bfloat16 else 8        # fp32: no separate master
    grads = 4 / dp if zero == 2 else 4
    return param, grads, opt / dp if zero else opt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    print(f"toy model: {args.layers} x [Linear({args.hidden},{4 * args.hidden}) GELU Linear LayerNorm], "
          f"bucket {BUCKET:,} elements, gloo, bytes per rank after a step")
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for dp in (1, 2, 4):
            for zero in (0, 1, 2):
                r = run(dp, args.hidden, args.layers, dtype, zero)
                n = r["n"]
                per_param = (r["params"] + r["grads"] + r["optimizer"]) / n
                expected = sum(formula(dtype, zero, dp))
                sent = sum(r["comm"].values())
                allreduce = 2 * (dp - 1) / dp * r["buffer"] * 4
                ratio = f"{sent / allreduce:.2f}" if dp > 1 else "-"
                kinds = ", ".join(f"{k} {v / 1e6:.2f}" for k, v in sorted(r["comm"].items())) or "-"
                name = "bf16" if dtype == torch.bfloat16 else "fp32"
                rows.append((name, dp, zero, f"{r['params'] / 1e6:.2f}", f"{r['grads'] / 1e6:.2f}",
                             f"{r['optimizer'] / 1e6:.2f}", f"{per_param:.2f}", f"{expected:.2f}",
                             f"{sent / 1e6:.2f}", f"{allreduce / 1e6:.2f}", ratio, kinds))
    print_table(("dtype", "DP", "ZeRO", "params MB", "grads MB", "optim MB", "B/param", "formula", "sent MB",
                 "1 allreduce", "ratio", "sent by kind"), rows)
    print(f"parameters: {n:,}; grad buffer {r['buffer']:,} elements (padding {r['buffer'] - n:,})")


if __name__ == "__main__":
    main()
