"""The launcher reads rank and world size from torchrun, SLURM and MPI environments."""
import importlib.util

import pytest

from megagpt.parallel.launch import _first_slurm_host, detect_launch_env


def test_torchrun_env():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "6000"}
    e = detect_launch_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == \
        (3, 8, 1, "node7", 6000, "torchrun")


def test_slurm_env_takes_master_from_nodelist():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NODELIST": "gpu[003-005,009]"}
    e = detect_launch_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.launcher) == (5, 16, 1, "gpu003", "slurm")


def test_slurm_nodelist_forms():
    assert _first_slurm_host("node12") == "node12"
    assert _first_slurm_host("a[1-4],b7") == "a1"
    assert _first_slurm_host("x[07,09]") == "x07"


def test_openmpi_and_mpich_env():
    e = detect_launch_env({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
                           "OMPI_COMM_WORLD_LOCAL_RANK": "0", "MASTER_ADDR": "h0"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.launcher) == (2, 4, 0, "h0", "mpi")
    e = detect_launch_env({"PMI_RANK": "1", "PMI_SIZE": "2"})
    assert (e.rank, e.world_size, e.launcher) == (1, 2, "mpi")


def test_no_launcher_is_single_process():
    e = detect_launch_env({})
    assert (e.rank, e.world_size, e.launcher) == (0, 1, "single")


def test_keep_host_memory_mapped_reuses_pages_of_freed_large_tensors():
    """After the call, freed 64 MiB tensors' pages serve later ones instead of fresh, zero-filled pages (glibc).

    The first few rounds may still fault while the heap grows (an aligned request does not fit a hole of exactly
    its own size until neighbouring holes merge); without the call every round faults ~16k pages of 4 KiB.
    """
    import resource

    import torch

    from megagpt.parallel.launch import keep_host_memory_mapped
    if not keep_host_memory_mapped():
        pytest.skip("libc is not glibc: mallopt unavailable")

    def faults_of_one_large_tensor() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.ones(16 * 2**20)   # 64 MiB, written in full
        del t
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    assert min(faults_of_one_large_tensor() for _ in range(12)) < 100


def _losses(stdout: str) -> list[float]:
    import re
    return [float(x) for x in re.findall(r"lm loss: ([0-9.E+-]+) \|", stdout)]


def test_mpiexec_launch_trains_like_a_single_process():
    """`mpiexec -n 2` (MPICH wheel) with TP=2: ranks come from the MPI environment, the master address from
    mpi4py, and the losses equal a one-process run of the same model."""
    import os
    import shutil
    import subprocess
    import sys

    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable))
    if mpiexec is None or importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py/mpiexec not installed (optional: make install-mpi)")
    from megagpt.parallel.launch import free_port
    from model_utils import tiny_cli
    args = tiny_cli(global_batch_size=4, train_iters=3)
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    mpi = subprocess.run([mpiexec, "-n", "2"] + args + ["--tensor-model-parallel-size", "2"], capture_output=True,
                         text=True, timeout=180, env=dict(clean, MASTER_PORT=str(free_port())))
    assert mpi.returncode == 0, mpi.stderr[-2000:]
    assert "rank 1 (tp 1, pp 0, dp 0)" in mpi.stdout
    single = subprocess.run(args, capture_output=True, text=True, timeout=180,
                            env=dict(clean, MASTER_PORT=str(free_port())))
    assert single.returncode == 0, single.stderr[-2000:]
    assert len(_losses(mpi.stdout)) == 3
    assert _losses(mpi.stdout) == pytest.approx(_losses(single.stdout), rel=1e-5)


def _init_on_a_gpu_host_with_a_gloo_group() -> str:
    import torch
    from megagpt.parallel import launch
    torch.cuda.is_available = lambda: True      # a GPU host, as far as init_distributed can tell
    torch.cuda.set_device = lambda *_: (_ for _ in ()).throw(AssertionError("set a CUDA device under gloo"))
    _, device = launch.init_distributed()
    return str(device)


def test_an_existing_gloo_group_keeps_the_cpu_on_a_gpu_host():
    """The test harness makes a gloo group before setup(): CUDA being present must not switch the run to it."""
    from distributed import run_distributed
    assert run_distributed(_init_on_a_gpu_host_with_a_gloo_group, 2) == ["cpu", "cpu"]
