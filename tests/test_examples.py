"""The cluster example scripts' flags parse and pass validation at the world size each is written for."""
import os
import subprocess

import pytest

from megagpt.cli import parse_args
from megagpt.config import num_model_chunks, num_parameters, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("size,world,layout,billions", [
    ("124m", 8, (1, 1, 8), 0.124), ("1.3b", 16, (2, 1, 8), 1.3), ("8.3b", 64, (8, 2, 4), 8.3)])
def test_cluster_example_flags_are_valid(size, world, layout, billions):
    flags = subprocess.run(["bash", os.path.join(REPO, "examples", "gpt_args.sh"), size], check=True,
                           capture_output=True, text=True).stdout.split()
    config = parse_args(flags + ["--mock-data"])
    validate(config, world_size=world)
    tp, pp = config.parallel.tensor_model_parallel_size, config.parallel.pipeline_model_parallel_size
    assert (tp, pp, world // (tp * pp)) == layout
    assert abs(num_parameters(config.model, vocab_size=50257) / 1e9 - billions) < 0.05 * billions
    if size == "8.3b":
        assert num_model_chunks(config) == 2 and config.parallel.sequence_parallel


def test_unknown_example_size_is_refused():
    run = subprocess.run(["bash", os.path.join(REPO, "examples", "gpt_args.sh"), "7b"], capture_output=True,
                         text=True)
    assert run.returncode == 2 and "unknown model size 7b" in run.stderr


@pytest.mark.parametrize("script", ["pretrain_gpt.sbatch", "pretrain_gpt_torchrun.sh", "run_cpu_demo.sh"])
def test_launch_scripts_parse_and_pass_the_run_control_flags(script):
    path = os.path.join(REPO, "examples", script)
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    text = open(path).read()
    if script != "run_cpu_demo.sh":     # cluster scripts: resume or start fresh from one directory, save on SIGTERM
        assert '--load "$CHECKPOINT_DIR"' in text and "--exit-signal-handler" in text
    if script.endswith(".sbatch"):
        assert "#SBATCH --signal=TERM@" in text and "scontrol requeue" in text


def test_gpu_check_commands_parse():
    """The prepared GPU check must not spend a lent GPU's minutes on a typo: its training run's flags validate as
    one rank, and each step-benchmark command names a preset bench/step.py knows."""
    import importlib.util
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(root, "bench", "gpu_check.py"))
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    steps = {name: argv for name, argv, _ in gpu_check.steps(sys.executable, quick=False)}
    train = steps["train-124m-bf16"]
    config = parse_args(train[train.index("examples/pretrain_gpt.py") + 1:])
    config.model.vocab_size = 50257
    validate(config, 1)
    from megagpt.cli import PRESETS
    for name, argv in steps.items():
        if name.startswith("step-"):
            assert argv[argv.index("--model-size") + 1] in PRESETS and "--device" in argv
