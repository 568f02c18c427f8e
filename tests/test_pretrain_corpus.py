"""End to end on real text: preprocess the bundled Shakespeare subset, train 30 steps, the loss goes down;
and the command line stops on bad configurations with a clear message before any process group exists."""
import os
import subprocess
import sys

import pytest

from distributed import run_distributed
from megagpt.data.preprocess import PreprocessConfig, preprocess
from megagpt.training import config_for_test, pretrain

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "data", "shakespeare_small.jsonl")
REPO = os.path.dirname(HERE)


def _train_on(prefix: str, cache: str):
    config = config_for_test(
        num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64, max_position_embeddings=64,
        hidden_dropout=0.0, attention_dropout=0.0, micro_batch_size=4, global_batch_size=8, train_iters=30,
        lr=3e-3, min_lr=3e-4, lr_warmup_iters=3, eval_interval=15, eval_iters=2, log_interval=10,
        data_path=[prefix], split="90,10,0", data_cache_path=cache, tokenizer_type="GPT2BPETokenizer",
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    result = pretrain(config, log=False)
    return result.losses, result.validation_losses


@pytest.mark.slow
def test_training_on_bundled_corpus_lowers_the_loss(tmp_path):
    summary = preprocess(PreprocessConfig(input=CORPUS, output_prefix=str(tmp_path / "shakespeare"),
                                          append_eod=True, progress=False, log_interval=0))
    assert summary.documents > 50 and summary.skipped == 0
    prefix = str(tmp_path / "shakespeare_text_document")
    losses, validation = run_distributed(_train_on, 1, prefix, str(tmp_path / "cache"))[0]
    assert len(losses) == 30 and len(validation) == 2
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first > 10.0 and last < first - 2.0, (first, last)
    assert validation[-1] < first - 2.0


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RANK="0", WORLD_SIZE="4", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    return subprocess.run([sys.executable, os.path.join(REPO, "examples", "pretrain_gpt.py"), "--mock-data",
                           "--tokenizer-type", "ByteTokenizer", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_rejects_bad_layout_before_starting():
    # World 4 from the environment, TP 4 with 6 heads: refused before init_process_group (port 1 would hang).
    proc = _cli("--tensor-model-parallel-size", "4", "--num-attention-heads", "6", "--hidden-size", "96")
    assert proc.returncode == 2
    assert "num-attention-heads 6 is not divisible by tensor-model-parallel-size 4" in proc.stderr


def test_cli_rejects_missing_data(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", "pretrain_gpt.py"), "--data-path",
                           str(tmp_path / "missing_text_document"), "--tokenizer-type", "ByteTokenizer",
                           "--train-iters", "1"],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, RANK="0", WORLD_SIZE="1", MASTER_PORT="1"))
    assert proc.returncode == 2 and "missing_text_document.bin does not exist" in proc.stderr


def test_cli_reports_parameters_and_measured_memory_after_the_first_step():
    import re

    from megagpt.parallel.launch import free_port
    from model_utils import tiny_cli
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    proc = subprocess.run(tiny_cli(global_batch_size=2, train_iters=2), capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    n = int(re.search(r"> rank 0 \(tp 0, pp 0, dp 0\): ([\d,]+) parameters", proc.stdout).group(1).replace(",", ""))
    mem = re.search(r"> rank 0 memory after iteration 1: params ([\d.]+) MiB \| grads ([\d.]+) MiB \| "
                    r"optimizer ([\d.]+) MiB", proc.stdout)
    params, grads, optimizer = (float(x) * 2**20 for x in mem.groups())
    mib = 0.05 * 2**20   # printed to 0.1 MiB
    assert abs(params - 4 * n) < mib and abs(optimizer - 8 * n) < mib   # fp32: masters are the params; 2 moments
    assert grads >= 4 * n - mib                                           # fp32 grad buffer (plus bucket padding)
