"""The planner's arithmetic without training: parameter counts against instantiated presets (meta device), the
activation terms against Korthikanti et al. 2022, micro-batches in flight, the layout search, the CLI's answers."""
from __future__ import annotations

import dataclasses
import json

import pytest

from distributed import run_distributed
from megagpt.cli import PRESETS, parse_args
from megagpt.config import num_parameters
from megagpt.plan import cluster as clusters
from megagpt.plan.command import run
from megagpt.plan.memory import dims, layer_activation_terms, padded_vocab_size, rank_params, stage_memory
from megagpt.plan.report import dry_run, startup_report
from megagpt.plan.search import PlanError, search
from megagpt.plan.step_time import step_time

H100 = clusters.PRESETS["h100-80gb"]


def _preset_counts(names):
    """Parameters of each preset instantiated at TP = PP = 1 on the meta device (masters redirected to meta)."""
    import torch
    real_empty = torch.empty
    torch.empty = lambda *a, **k: real_empty(*a, **{**k, "device": "meta"})
    torch.Tensor.normal_ = lambda self, *a, **k: self          # this process only: nothing is initialised
    from megagpt.config import ModelConfig
    from megagpt.model.gpt import build_model_chunks
    from megagpt.parallel import random as tp_random
    from megagpt.parallel.state import ParallelState
    out = {}
    for name in names:
        cfg = ModelConfig(**PRESETS[name], vocab_size=50257)
        model = build_model_chunks(cfg, ParallelState(1, 1), seed=1, device="meta",
                                   tracker=tp_random.model_parallel_seed(1, 0, 0, "cpu"))[0]
        out[name] = sum(p.numel() for p in model.parameters())
    return out


def test_preset_parameter_counts_match_the_instantiated_model():
    measured = run_distributed(_preset_counts, 1, sorted(PRESETS))[0]
    for name, count in measured.items():
        config = parse_args(["--model-size", name])
        d = dims(config, 1)
        assert sum(n for _, n, _ in rank_params(config, d, 0)) == count, name
        assert num_parameters(config.model, padded_vocab_size(config)) == count, name
    assert measured["megatron-8.3b"] == 8_314_288_128


@pytest.mark.parametrize("tp", [1, 2, 8])
def test_layer_activations_are_korthikanti_table_2(tp):
    """fp16 on CUDA, dropout on, no fp32 softmax, the softmax attention path the paper models: s b h (10 + 24/t +
    5 a s / (h t)) bytes, plus LayerNorm stats; selective recompute drops the 5as/h term; full keeps 2 s b h.
    The flash path keeps no s x s tensor: only an fp32 log-sum-exp (4 a s b / t) beyond the context."""
    base = ["--model-size", "gpt-1.3b", "--seq-length", "2048", "--micro-batch-size", "2", "--fp16",
            "--tensor-model-parallel-size", str(tp), "--attention-backend", "unfused"]
    config = parse_args(base)
    config.model.attention_softmax_in_fp32 = False
    d = dims(config, tp, "cuda")
    s, b, h, a = d.s, d.b, d.h, d.a
    terms = layer_activation_terms(config, d)
    stats = terms.pop("LayerNorm statistics")
    assert stats == 4 * 4 * s * b
    assert sum(terms.values()) == s * b * h * (10 + 24 / tp) + 5 * a * s * s * b / tp
    config.model.recompute_granularity = "selective"
    assert sum(layer_activation_terms(config, d).values()) - stats == s * b * h * (10 + 24 / tp)
    config.model.recompute_granularity = "full"
    assert sum(layer_activation_terms(config, d).values()) == 2 * s * b * h
    config.model.recompute_granularity, config.model.attention_backend = None, "flash"
    assert sum(layer_activation_terms(config, d).values()) - stats == \
        s * b * h * (10 + 24 / tp) + 4 * a * s * b / tp


def test_micro_batches_in_flight_follow_the_schedule():
    config = parse_args(["--num-layers", "8", "--hidden-size", "64", "--num-attention-heads", "4",
                         "--global-batch-size", "64", "--micro-batch-size", "1", "--pipeline-model-parallel-size", "4"])
    assert [stage_memory(config, 4, r).in_flight for r in range(4)] == [4, 3, 2, 1]      # 1F1B: p - r
    config.parallel.num_layers_per_virtual_pipeline_stage = 1
    # interleaved, v = 2: warm-up 2 (p - r - 1) + (v - 1) p, plus one
    assert [stage_memory(config, 4, r).in_flight for r in range(4)] == [11, 9, 7, 5]   # v = 2


def test_zero_and_sequence_parallel_shrink_what_they_should():
    argv = ["--model-size", "gpt-1.3b", "--bf16", "--tensor-model-parallel-size", "2", "--micro-batch-size", "1",
            "--global-batch-size", "64"]
    plain, zero, sp = parse_args(argv), parse_args(argv + ["--use-distributed-optimizer"]), \
        parse_args(argv + ["--sequence-parallel"])
    m_plain, m_zero, m_sp = (stage_memory(c, 16, 0, H100).terms for c in (plain, zero, sp))
    assert m_zero["optimizer state"] < m_plain["optimizer state"] / 7           # 12 bytes/param over DP 8
    act = next(k for k in m_plain if k.startswith("activations"))
    assert m_sp[act] < m_plain[act]


def test_search_ranks_fitting_valid_layouts_and_json_has_the_fields():
    config = parse_args(["--model-size", "gpt-1.3b", "--seq-length", "2048", "--global-batch-size", "512",
                         "--bf16", "--use-distributed-optimizer"])
    cluster = dataclasses.replace(H100, num_gpus=16)
    best = search(config, cluster)
    assert 1 <= len(best) <= 10
    times = [float(f"{c.time.total:.3g}") for c in best]      # equal to 3 digits: less memory first
    assert times == sorted(times)
    for c in best:
        assert c.max_memory <= 80 * 2 ** 30
        j = c.to_json()
        assert {"tensor_model_parallel_size", "pipeline_model_parallel_size", "data_parallel_size",
                "micro_batch_size", "recompute", "memory_gib", "max_memory_gib", "step_time_s", "tflops_per_gpu",
                "tokens_per_s"} <= j.keys()
        assert len(j["memory_gib"]) == j["pipeline_model_parallel_size"]
        assert j["tokens_per_s"] == pytest.approx(512 * 2048 / j["step_time_s"], rel=1e-3)


def test_step_time_adds_the_pipeline_bubble():
    config = parse_args(["--model-size", "gpt-1.3b", "--global-batch-size", "8", "--micro-batch-size", "1",
                         "--bf16", "--pipeline-model-parallel-size", "4"])
    t = step_time(config, 4, dataclasses.replace(H100, num_gpus=4))
    per_mb = t.terms["GEMM compute"] / 8        # m = 8 micro-batches, nearly equal stages
    assert t.terms["pipeline bubble"] == pytest.approx(3 * per_mb, rel=0.35)


def test_model_that_fits_nowhere_and_bad_heads_get_one_sentence():
    with pytest.raises(PlanError, match=r"fits nowhere on 1 GPUs of 40 GiB.*needs [\d.]+ GiB"):
        search(parse_args(["--model-size", "megatron-8.3b"]), dataclasses.replace(
            clusters.PRESETS["a100-40gb"], num_gpus=1, gpus_per_node=1))
    text, status = run(["--num-layers", "4", "--hidden-size", "70", "--num-attention-heads", "7",
                        "--tensor-model-parallel-size", "2", "--cluster", "h100-80gb", "--num-gpus", "16"])
    assert status == 2 and "\n" not in text and "num-attention-heads 7 is not divisible" in text
    text, status = run(["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4"])
    assert status == 2 and "no cluster described" in text
    text, status = run(["--model-size", "gpt-1.3b", "--cluster", "h100-80gb", "--achievable-mfu", "1.5"])
    assert status == 2 and "--achievable-mfu" in text


def test_cli_json_explain_and_launch_line():
    argv = ["--model-size", "gpt-1.3b", "--seq-length", "2048", "--global-batch-size", "512", "--bf16",
            "--cluster", "h100-80gb", "--num-gpus", "16"]
    text, status = run(argv + ["--json"])
    assert status == 0 and json.loads(text)[0]["step_time_s"] > 0
    text, status = run(argv)
    assert status == 0 and "torchrun --nnodes 2 --nproc-per-node 8" in text and "sbatch --nodes 2" in text
    text, status = run(argv + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                               "--explain"])
    assert status == 0 and "stage 1:" in text and "TP collectives" in text and "fits: yes" in text


def test_dry_run_and_startup_report_for_the_8b_preset_allocate_nothing():
    config = parse_args(["--model-size", "megatron-8.3b", "--bf16", "--tensor-model-parallel-size", "8",
                         "--pipeline-model-parallel-size", "2", "--micro-batch-size", "1", "--global-batch-size",
                         "64"])
    line = startup_report(config, 64)
    assert line.startswith(" > plan: TP 8 x PP 2 x DP 4") and "stage 0" in line and "stage 1" in line
    text = dry_run(config, 64, dataclasses.replace(H100, num_gpus=64))
    assert "weights" in text and "step time on h100-80gb" in text


def test_dry_run_plans_8_3b_without_allocating():
    """--dry-run prints the plan and exits 0 before any process group (port 1 would hang) or model allocation."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, RANK="0", WORLD_SIZE="64", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    proc = subprocess.run([sys.executable, os.path.join(repo, "examples", "pretrain_gpt.py"), "--model-size",
                           "megatron-8.3b", "--tensor-model-parallel-size", "8", "--pipeline-model-parallel-size", "2",
                           "--sequence-parallel", "--bf16", "--use-distributed-optimizer", "--seq-length", "2048",
                           "--max-position-embeddings", "2048", "--micro-batch-size", "1", "--global-batch-size", "512",
                           "--train-iters", "10", "--mock-data", "--dry-run"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "TP 8 x PP 2 x DP 4" in proc.stdout, proc.stdout[:500]
    assert "predicted peak memory per rank: stage 0" in proc.stdout and "stage 1" in proc.stdout


def test_cpu_terms_follow_their_cluster_fields():
    """Each CPU-measured field drives its own term only: a per-call latency adds latency x calls to the TP term
    (4 all-reduces per layer per micro-batch, 1 for the embedding, 1 for the LM head, 2 in cross-entropy: counted
    here by hand, as the model code makes them) and to the per-step grad-norm all-reduce,
    the attention and elementwise rates scale their terms inversely, and unset they fall back to the GEMM rate and
    the memory bandwidth (so the GPU presets' numbers are unchanged); host overhead is per layer and micro-batch."""
    config = parse_args(["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "8", "--seq-length",
                         "128", "--max-position-embeddings", "128", "--vocab-size", "2048", "--micro-batch-size", "4",
                         "--global-batch-size", "16", "--tensor-model-parallel-size", "2"])
    base = clusters.Cluster(num_gpus=2, gpus_per_node=2, gpu_memory_gib=8, gpu_peak_tflops=0.1, intra_node_gbps=1.0,
                            inter_node_gbps=1.0, achievable_mfu=1.0, memory_gbps=20.0, latency_us=100.0, device="cpu")
    t0 = step_time(config, 2, base)
    explicit = step_time(config, 2, dataclasses.replace(base, elementwise_gbps=20.0, attention_tflops=0.1))
    assert explicit.terms == pytest.approx(t0.terms, rel=1e-12)
    slow = step_time(config, 2, dataclasses.replace(base, latency_us=1100.0, elementwise_gbps=5.0,
                                                    attention_tflops=0.025))
    calls = 4 * (4 * 4 + 1 + 1 + 2)              # 4 micro-batches per step
    assert slow.terms["TP collectives"] - t0.terms["TP collectives"] == pytest.approx(calls * 1e-3, rel=1e-9)
    assert slow.terms["grad-norm and loss collectives"] == pytest.approx(1.1e-3, rel=1e-9)   # over TP only
    assert slow.terms["attention core"] == pytest.approx(4 * t0.terms["attention core"], rel=1e-9)
    assert slow.terms["elementwise ops"] == pytest.approx(4 * t0.terms["elementwise ops"], rel=1e-9)
    assert slow.terms["GEMM compute"] == t0.terms["GEMM compute"]
    assert t0.terms["host overhead"] == 0.0              # GPUs: launches run ahead of the kernels
    host = step_time(config, 2, dataclasses.replace(base, layer_overhead_us=500.0, microbatch_overhead_us=300.0))
    assert host.terms["host overhead"] == pytest.approx(4 * (4 * 500e-6 + 300e-6), rel=1e-9)   # m x (L x layer + mb)
    # attention core FLOPs: 4 s^2 h per layer forward, x3 with backward, over TP, 4 layers, 4 micro-batches
    assert t0.terms["attention core"] == pytest.approx(4 * 4 * 3 * 4 * 128 ** 2 * 256 * 4 / 2 / 0.1e12, rel=1e-9)
    text, status = run(["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--cluster",
                        "h100-80gb", "--latency-us", "0", "--explain"])
    assert status == 2 and "--latency-us must be > 0" in text
