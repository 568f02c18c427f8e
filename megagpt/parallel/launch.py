"""init_distributed(): one bootstrap for torchrun, SLURM (srun) and mpirun; gloo on CPU, NCCL on GPU."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits, read from the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as 'gpu[003-005,007],cpu01' -> 'gpu003'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not match:
        raise ValueError(f"cannot parse SLURM_NODELIST {nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def detect_launch_env(env: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """Rank, world size, local rank and master address from torchrun, SLURM or MPI variables (in that order)."""
    env = os.environ if env is None else env
    port = int(env.get("MASTER_PORT", "29500"))
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")),
                         env.get("MASTER_ADDR", "127.0.0.1"), port, "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_NODELIST", env.get("SLURM_JOB_NODELIST", "")))
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0")),
                         addr, port, "slurm")
    for rank_key, size_key, local_key in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
                                          ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
                                          ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK")):
        if rank_key in env and size_key in env:
            return LaunchEnv(int(env[rank_key]), int(env[size_key]), int(env.get(local_key, "0")),
                             env.get("MASTER_ADDR", ""), port, "mpi")
    return LaunchEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), port, "single")


def free_port() -> int:
    """A TCP port free on this host right now (for one-machine runs that start their own group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mpi_master_addr(launch: LaunchEnv) -> str:
    """Under mpirun without MASTER_ADDR, rank 0 broadcasts its host name through mpi4py when installed."""
    if launch.master_addr:
        return launch.master_addr
    try:
        from mpi4py import MPI  # optional dependency
    except ImportError:
        if launch.world_size == 1:
            return "127.0.0.1"
        raise RuntimeError("mpirun launch without MASTER_ADDR: set MASTER_ADDR or install mpi4py") from None
    return MPI.COMM_WORLD.bcast(socket.gethostname() if launch.rank == 0 else None, root=0)


def init_distributed(backend: Optional[str] = None, timeout_s: int = 1800) -> tuple[LaunchEnv, torch.device]:
    """Initialise torch.distributed from the launcher's environment; returns (launch env, this rank's device).

    The device follows the backend: CUDA under NCCL (or when CUDA is present and none is asked for), the CPU under
    gloo, including a gloo group that already exists (so the CPU test suite runs unchanged on a GPU host)."""
    launch = detect_launch_env()
    if launch.launcher == "mpi":
        launch = LaunchEnv(launch.rank, launch.world_size, launch.local_rank, _mpi_master_addr(launch),
                           launch.master_port, launch.launcher)
    if dist.is_initialized():      # a group made by the caller (a test harness, a notebook): its backend rules
        backend = dist.get_backend()
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    backend = backend or ("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        keep_host_memory_mapped()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", launch.master_addr or "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(launch.master_port))
        dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size,
                                timeout=timedelta(seconds=timeout_s))
    return launch, device


def keep_host_memory_mapped() -> bool:
    """Stop glibc from returning freed memory to the kernel, so large CPU tensors reuse already-mapped pages.

    By default glibc serves every allocation above 32 MiB (logits, embedding grads) with a fresh mmap and unmaps
    it on free, so each training step page-faults and zero-fills its big tensors again: about 1.5 GB per step
    for GPT-2 124M-sized vocabularies, a sixth of a CPU step (bench/step.py). With mmap off and trimming off the
    heap keeps its peak size, as the CUDA caching allocator does on GPU. Returns False where libc is not glibc.
    """
    m_trim_threshold, m_mmap_max = -1, -4   # mallopt parameter numbers from glibc's malloc.h
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path)
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError, TypeError):
        return False
