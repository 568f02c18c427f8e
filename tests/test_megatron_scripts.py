"""Megatron-LM's own GPT launch scripts run unchanged: their flag arrays (copied as data from
examples/gpt3/train_gpt3_857m_distributed.sh and train_gpt3_175b_distributed.sh at the commits that still had
--rampup-batch-size, and examples/pretrain_gpt_distributed_with_mp.sh) parse, validate and train 4 iterations.

Only sizes and paths are changed: model dimensions, batch sizes, iteration counts and parallel sizes shrunk to a
few CPU processes, paths pointed at the committed Shakespeare sample. Every flag name, and every value that is not
a size, is the script's."""
from __future__ import annotations

import os

import pytest

from distributed import run_distributed
from megagpt.cli import parse_args
from megagpt.data.tokenizer import _bundled_gpt2_dir
from megagpt.training import pretrain

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "shakespeare_small.jsonl")
TINY_MODEL = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
              "--max-position-embeddings", "64"]      # 24 x 1024 / 96 x 12288 / 24 x 1024 in the scripts


def _857m(paths: dict) -> list[str]:
    return [
        *TINY_MODEL, "--attention-backend", "auto",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "4",       # 8 / 128 / 500000
        "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--init-method-std", "0.006",
        "--clip-grad", "1.0", "--fp16", "--lr", "6.0e-5", "--lr-decay-style", "cosine", "--min-lr", "6.0e-6",
        "--lr-warmup-fraction", ".001", "--lr-decay-iters", "430000",
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "1",        # TP 8
        "--data-path", paths["data"], "--vocab-file", paths["vocab"], "--merge-file", paths["merges"],
        "--split", "949,50,1",
        "--log-interval", "100", "--save-interval", "10000", "--eval-interval", "1000", "--save", paths["ckpt"],
        "--load", paths["ckpt"], "--eval-iters", "10", "--tensorboard-dir", paths["tb"]]


def _175b(paths: dict) -> list[str]:
    return [
        *TINY_MODEL, "--attention-backend", "auto",
        "--micro-batch-size", "1", "--global-batch-size", "8",                              # 1 / 1536
        "--rampup-batch-size", "4", "4", "8",                                              # 16 16 5859375
        "--train-iters", "4", "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
        "--init-method-std", "0.006", "--clip-grad", "1.0", "--fp16", "--lr", "6.0e-5", "--lr-decay-style", "cosine",
        "--min-lr", "6.0e-6", "--lr-warmup-fraction", ".001", "--lr-decay-iters", "430000",
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",        # TP 8 PP 16
        "--data-path", paths["data"], "--vocab-file", paths["vocab"], "--merge-file", paths["merges"],
        "--split", "949,50,1",
        "--log-interval", "100", "--save-interval", "10000", "--eval-interval", "1000", "--save", paths["ckpt"],
        "--load", paths["ckpt"], "--eval-iters", "10", "--tensorboard-dir", paths["tb"]]


def _with_mp(paths: dict) -> list[str]:
    return [
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--attention-softmax-in-fp32",
        "--sequence-parallel", *TINY_MODEL,
        "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "0.00015", "--train-iters", "4",  # 4/16/500000
        "--lr-decay-iters", "320000", "--lr-decay-style", "cosine", "--min-lr", "1.0e-5", "--weight-decay", "1e-2",
        "--lr-warmup-fraction", ".01", "--clip-grad", "1.0", "--bf16",
        "--data-path", paths["data"], "--vocab-file", paths["vocab"], "--merge-file", paths["merges"],
        "--split", "949,50,1",
        "--log-interval", "100", "--save-interval", "10000", "--eval-interval", "1000", "--eval-iters", "10",
        "--distributed-backend", "gloo",                                                   # nccl: no GPU here
        "--save", paths["ckpt"], "--load", paths["ckpt"]]


SCRIPTS = {"train_gpt3_857m_distributed": (_857m, 2), "train_gpt3_175b_distributed": (_175b, 4),
           "pretrain_gpt_distributed_with_mp": (_with_mp, 4)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    from megagpt.data.preprocess import PreprocessConfig, preprocess

    out = tmp_path_factory.mktemp("corpus")
    preprocess(PreprocessConfig(input=CORPUS, output_prefix=str(out / "sh"), append_eod=True, progress=False,
                                log_interval=0))
    return str(out / "sh_text_document")


def _run(argv: list[str]) -> tuple[list[float], list[int], int]:
    config = parse_args(argv)
    result = pretrain(config, log=True)         # log lines and TensorBoard, as the scripts run
    return result.losses, result.global_batch_sizes, config.optim.fp16 + 2 * config.optim.bf16


@pytest.mark.slow
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_megatron_script_flags_train_four_iterations(script, corpus, tmp_path):
    build, world = SCRIPTS[script]
    gpt2 = _bundled_gpt2_dir()
    paths = {"data": corpus, "vocab": os.path.join(gpt2, "encoder.json"), "merges": os.path.join(gpt2, "vocab.bpe"),
             "ckpt": str(tmp_path / "ckpt"), "tb": str(tmp_path / "tb")}
    losses, sizes, _ = run_distributed(_run, world, build(paths))[-1]
    assert len(losses) == 4 and all(10.0 < x < 11.5 for x in losses), losses    # ln(50257) = 10.8 at the start
    if script == "train_gpt3_175b_distributed":
        assert sizes == [4, 4, 8, 8]                       # the ramp: 4 until 8 samples are consumed, then 8
    assert os.path.isfile(os.path.join(paths["ckpt"], "latest_checkpointed_iteration.txt"))   # --save at the end
    assert os.listdir(paths["tb"] if script != "pretrain_gpt_distributed_with_mp" else paths["ckpt"])
