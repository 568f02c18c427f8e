"""Observability flags (#10 part 5): Megatron's timers, TensorBoard scalars, params norm and num zeros in the log line,
the torch.profiler window, manual garbage collection and W&B.

One 2-rank pipeline run (PP 2, so every pipeline exchange and the tied-embedding reduction happen) turns every flag
on at once; each flag family then has its own test reading that run's output, TensorBoard events and trace files.
"""
from __future__ import annotations

import contextlib
import gc
import glob
import gzip
import io
import json
import math
import os
import re

import pytest
import torch

from distributed import run_distributed
from model_utils import full_state
from megagpt.config import ConfigError, validate
from megagpt.optim.clip import get_params_norm
from megagpt.parallel.param_tags import is_embedding_copy
from megagpt.pipeline.executor import _exchange_timer
from megagpt.pipeline.instructions import Instr
from megagpt.profiling import Instruments
from megagpt.timers import Timers, format_timers, p2p_timer_name, timers_to_log
from megagpt.train_log import IterationStats, format_log_line, wandb_problems
from megagpt.training import config_for_test, environment_problems, setup, train_loop

ITERS, LOG_INTERVAL, GC_INTERVAL = 4, 2, 2
TIMER_LINE = re.compile(r"^    (\S+) \.*: \(([\d.]+), ([\d.]+)\)$")


def _config(tmp: str, **overrides):
    settings = dict(
        num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=16, max_position_embeddings=16,
        vocab_size=500, hidden_dropout=0.0, attention_dropout=0.0, micro_batch_size=2, global_batch_size=8,
        train_iters=ITERS, log_interval=LOG_INTERVAL, eval_interval=LOG_INTERVAL, eval_iters=1, lr=1e-3,
        mock_data=True, tokenizer_type="ByteTokenizer", seed=1234)
    settings.update(overrides)
    return config_for_test(**settings)


def _observed_run(tmp: str) -> dict:
    """Every observability flag on, PP 2; returns this rank's stdout, GC record and weights' sum of squares."""
    config = _config(
        tmp, pipeline_model_parallel_size=2, tensorboard_dir=os.path.join(tmp, "tb"),
        timing_log_level=2, log_timers_to_tensorboard=True, log_memory_to_tensorboard=True,
        log_validation_ppl_to_tensorboard=True, log_params_norm=True, log_num_zeros_in_grad=True,
        profile=True, profile_step_start=1, profile_step_end=3, profile_ranks=[1],
        manual_gc=True, manual_gc_interval=GC_INTERVAL, manual_gc_eval=False)
    events: list = []
    record_gc = lambda phase, info: events.append(("gc", info["generation"])) if phase == "start" else None  # noqa

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        trainer, ps = setup(config, log=True)
        step = trainer.train_step

        def observed_step():
            events.append(("step", gc.isenabled()))
            return step()

        trainer.train_step = observed_step
        gc.callbacks.append(record_gc)
        try:
            result = train_loop(config, trainer, ps, log=True)
        finally:
            gc.callbacks.remove(record_gc)
    squares = sum(float(p.detach().double().square().sum()) for chunk in trainer.chunks
                  for p in chunk.parameters() if not is_embedding_copy(p))
    return dict(stdout=out.getvalue(), losses=result.losses, events=events, gc_enabled_after=gc.isenabled(),
                squares=squares, rank=ps.rank, n_params=sum(p.numel() for c in trainer.chunks for p in c.parameters()))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("observed"))
    results = run_distributed(_observed_run, 2, tmp)
    return dict(tmp=tmp, ranks=results, log=results[1]["stdout"])


def _log_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if " iteration " in line and "consumed samples" in line]


def _timer_blocks(text: str) -> list[dict[str, tuple[float, float]]]:
    """Every `(min, max) time across ranks (ms):` block: name -> (min, max)."""
    blocks, current = [], None
    for line in text.splitlines():
        if line == "(min, max) time across ranks (ms):":
            current = {}
            blocks.append(current)
        elif current is not None and (m := TIMER_LINE.match(line)):
            current[m.group(1)] = (float(m.group(2)), float(m.group(3)))
        else:
            current = None
    return blocks


# ------------------------------------------------------------------------------------------------ timers

def test_p2p_timer_names_are_megatrons():
    assert p2p_timer_name({"forward"}, set()) == "forward-send"
    assert p2p_timer_name(set(), {"backward"}) == "backward-recv"
    assert p2p_timer_name({"forward"}, {"backward"}) == "forward-send-backward-recv"
    assert p2p_timer_name({"backward", "forward"}, {"forward", "backward"}) == \
        "forward-backward-send-forward-backward-recv"
    step = (Instr("send_backward", 0, 0), Instr("recv_forward", 1, 0))
    assert _exchange_timer(step) == "backward-send-forward-recv"
    names = timers_to_log(2)
    assert len(names) == len(set(names)) and timers_to_log(1) == names[:len(timers_to_log(1))]
    assert timers_to_log(0) == []


def test_timer_block_format():
    text = format_timers({"forward-backward": [12.345, 0.0, 20.0], "optimizer": [1.0, 2.0, 3.0]})
    assert text == ("(min, max) time across ranks (ms):\n"
                    "    forward-backward ...............................: (12.35, 20.00)\n"
                    "    optimizer ......................................: (1.00, 3.00)")
    assert format_timers({"optimizer": [1.0, 2.0]}, "max") == \
        "max time across ranks (ms):\n    optimizer ......................................: 2.00"
    assert format_timers({"optimizer": [1.0, 0.0]}, "all") == "times across ranks (ms):\n  optimizer:\n     rank  0: 1.00"
    assert format_timers({}) is None


def test_timers_above_the_level_record_nothing():
    timers = Timers(log_level=1, barrier_with_l1_time=False)
    with timers("forward-compute", 2):
        pass
    with timers("optimizer", 1):
        sum(range(10000))
    assert list(timers._timers) == ["optimizer"]
    assert timers._timers["optimizer"].elapsed() > 0.0
    assert timers._timers["optimizer"].elapsed() == 0.0          # reset by the first read


def test_timers_print_min_max_over_two_ranks(run):
    blocks = _timer_blocks(run["log"])
    assert len(blocks) == ITERS // LOG_INTERVAL, run["log"]
    lines = _log_lines(run["log"])
    for block, line in zip(blocks, lines):
        level_1 = {"forward-backward", "embedding-grads-all-reduce", "grads-all-reduce", "all-grads-sync", "optimizer"}
        level_2 = {"batch-generator", "forward-compute", "backward-compute", "forward-send", "backward-recv",
                   "forward-recv", "backward-send"}
        assert level_1 | level_2 <= block.keys(), block.keys()
        assert "params-all-gather" not in block                  # no ZeRO in this run
        for lo, hi in block.values():
            assert 0.0 < lo <= hi
        iteration_ms = float(re.search(r"elapsed time per iteration \(ms\): ([\d.]+)", line).group(1))
        # The level-1 spans are disjoint and start together on both ranks (barrier): they fit in one iteration.
        parts = sum(block[n][1] for n in ("batch-generator", "forward-backward", "all-grads-sync", "optimizer"))
        assert parts <= iteration_ms * 1.05 + 1.0, (parts, iteration_ms)
        assert block["forward-compute"][1] + block["backward-compute"][1] <= block["forward-backward"][1] * 1.05 + 1
        optimizer_parts = ("optimizer-copy-to-main-grad", "optimizer-clip-main-grad", "optimizer-inner-step",
                           "optimizer-copy-main-to-model-params")   # Megatron's sub-timers (fp32: no unscale)
        assert set(optimizer_parts) <= block.keys() and "optimizer-unscale-and-check-inf" not in block
        assert sum(block[n][0] for n in optimizer_parts) <= block["optimizer"][1] * 1.05 + 1.0   # nested
    assert not _timer_blocks(run["ranks"][0]["stdout"])          # printed once, by the last rank


# ------------------------------------------------------------------------------------------------ log line

def test_log_line_fields_in_megatrons_order():
    st = IterationStats(iteration=10, train_iters=100, consumed_samples=320, elapsed_ms=812.34, tflops_per_gpu=0.44,
                        tokens_per_second=10086.0, learning_rate=1e-4, global_batch_size=32, lm_loss=7.0,
                        loss_scale=1.0, grad_norm=1.2345, skipped_iterations=0, nan_iterations=0, num_zeros=17,
                        params_norm=123.4567)
    assert " loss scale: 1.0 | grad norm: 1.234 | num zeros: 17 | params norm: 123.457 | number of skipped" \
        in format_log_line(st)


def test_params_and_num_zeros_in_the_log_line(run):
    lines = _log_lines(run["log"])
    assert len(lines) == ITERS // LOG_INTERVAL
    final = lines[-1]
    printed = float(re.search(r" params norm: ([\d.]+) \|", final).group(1))
    # the gathered weights of both stages, the tied embedding once: the norm one rank holding the model computes
    assert printed == pytest.approx(math.sqrt(sum(r["squares"] for r in run["ranks"])), abs=1e-3)
    zeros = int(re.search(r" num zeros: (\d+) \|", final).group(1))
    assert 0 < zeros < sum(r["n_params"] for r in run["ranks"])   # unused vocabulary rows have zero grads


def _params_norm_tp2() -> tuple[float, float, float]:
    config = _config("", tensor_model_parallel_size=2, sequence_parallel=True)
    trainer, ps = setup(config, log=False)
    params = [p for c in trainer.chunks for p in c.parameters()]
    naive = torch.stack([p.detach().double().square().sum() for p in params]).sum()
    torch.distributed.all_reduce(naive)
    full = full_state(trainer.chunks[0], ps.tp_group)
    reference = math.sqrt(sum(float(t.double().square().sum()) for t in full.values()))
    return get_params_norm(params, ps), reference, math.sqrt(float(naive))


def test_params_norm_counts_tp_replicas_once():
    for norm, reference, naive in run_distributed(_params_norm_tp2, 2):
        assert norm == pytest.approx(reference, rel=1e-6)
        assert abs(naive - reference) > 1e-3 * reference         # replicated LayerNorms would count twice


# ------------------------------------------------------------------------------------------------ TensorBoard

def test_tensorboard_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run["tmp"], "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"lm loss", "lm loss vs samples", "learning-rate", "batch-size", "loss-scale", "grad-norm", "num-zeros",
                "iteration-time", "throughput", "params-norm", "forward-backward-time", "optimizer-time",
                "forward-send-time", "mem-max-rss-bytes", "mem-params-bytes", "lm loss validation",
                "lm loss validation ppl"}
    assert expected <= tags, expected - tags
    losses = acc.Scalars("lm loss")
    assert [e.step for e in losses] == list(range(1, ITERS + 1))           # every iteration (interval 1)
    assert [e.value for e in losses] == pytest.approx(run["ranks"][1]["losses"], rel=1e-6)
    assert [e.step for e in acc.Scalars("forward-backward-time")] == [2, 4]   # timers at log intervals
    assert [e.step for e in acc.Scalars("lm loss validation ppl")] == [2, 4]


def test_validation_ppl_needs_its_flag(tmp_path):
    config = _config(str(tmp_path), tensorboard_dir=str(tmp_path / "tb"), train_iters=2)
    run_distributed(_train_quietly, 1, config)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert "lm loss validation" in acc.Tags()["scalars"]
    assert "lm loss validation ppl" not in acc.Tags()["scalars"]


def _train_quietly(config):
    with contextlib.redirect_stdout(io.StringIO()):
        trainer, ps = setup(config, log=True)
        return train_loop(config, trainer, ps, log=True).losses


# ------------------------------------------------------------------------------------------------ profiler

def test_profiler_trace_for_the_profiled_rank_only(run):
    traces = sorted(glob.glob(os.path.join(run["tmp"], "torch_profile", "*")))
    assert [os.path.basename(p) for p in traces] == ["rank-1.json.gz"]
    with gzip.open(traces[0], "rt") as f:
        trace = json.load(f)
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#1", "ProfilerStep#2"}        # iterations 2 and 3: (start 1, end 3]
    assert any(e.get("name", "").startswith("aten::") for e in trace["traceEvents"])


def test_profile_flags_are_checked():
    config = _config("", profile=True)
    with pytest.raises(ConfigError, match="--tensorboard-dir or --save"):
        validate(config, 1)
    config = _config("", profile=True, save="/tmp/x", profile_step_start=5, profile_step_end=5)
    with pytest.raises(ConfigError, match="profile-step-start"):
        validate(config, 1)


# ------------------------------------------------------------------------------------------------ manual GC

def test_manual_gc_disables_the_collector_and_collects_at_the_interval(run):
    rank0 = run["ranks"][0]
    assert rank0["gc_enabled_after"] is True
    events = rank0["events"]
    assert [enabled for kind, enabled in events if kind == "step"] == [False] * ITERS
    # after each step: which generations were collected before the next step started
    collected, after = {}, 0
    for kind, value in events:
        if kind == "step":
            after += 1
            collected[after] = []
        elif after:
            collected[after].append(value)
    assert collected == {i: ([2] if i % GC_INTERVAL == 0 else []) for i in range(1, ITERS + 1)}


def test_manual_gc_around_evaluation():
    config = _config("", manual_gc=True)
    generations: list[int] = []
    record = lambda phase, info: generations.append(info["generation"]) if phase == "start" else None  # noqa: E731
    was = gc.isenabled()
    instruments = Instruments(config, 0, torch.device("cpu"), 0)
    try:
        assert not gc.isenabled()
        gc.callbacks.append(record)
        with instruments.evaluation():
            generations.append("eval")
        config.logging.manual_gc_eval = False
        with instruments.evaluation():
            generations.append("eval")
    finally:
        gc.callbacks.remove(record)
        instruments.close()
    assert generations == [2, "eval", 0, "eval"]
    assert gc.isenabled() == was


# ------------------------------------------------------------------------------------------------ W&B

def test_missing_wandb_is_a_message_before_start_up(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    config = _config("", wandb_project="megagpt-test")
    assert any("make install-wandb" in p for p in environment_problems(config))
    assert wandb_problems(_config("")) == []


def test_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = _config(str(tmp_path), train_iters=2, eval_interval=0, wandb_project="megagpt-test",
                     wandb_exp_name="observability", wandb_save_dir=str(tmp_path / "wandb"))
    run_distributed(_train_quietly, 1, config)
    runs = glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1 and os.path.getsize(runs[0]) > 0
