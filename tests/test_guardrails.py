"""Numerical guardrails and pre-flight (#12): NaN/Inf agreed by every rank (abort saves nothing; skip drops the
update, counts the iteration, and a run resumed after it matches the uninterrupted one), loss spikes (warn, skip),
DP replicas whose parameters differ (the rank is named), the straggler line, and --check-schedule refusing an
unmatched send before the first step."""
from __future__ import annotations

import math
import os

import pytest
import torch

from distributed import run_distributed
from megagpt.config import ConfigError
from megagpt.diagnostics import preflight
from megagpt.diagnostics.faults import ENV, plan_from_env
from megagpt.diagnostics.guardrails import straggler_line
from megagpt.diagnostics.ledger import LEDGER
from megagpt.diagnostics.numerics import nonfinite_names, replica_mismatch
from megagpt.pipeline.instructions import Instr
from megagpt.training import config_for_test, setup, train_loop


def _config(**overrides):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, max_position_embeddings=16,
                vocab_size=300, hidden_dropout=0.0, attention_dropout=0.0, micro_batch_size=2, global_batch_size=4,
                train_iters=6, lr_decay_iters=6, lr=1e-3, min_lr=1e-4, eval_interval=0, eval_iters=0, log_interval=1,
                mock_data=True, tokenizer_type="ByteTokenizer", seed=5, watchdog_timeout_seconds=0)
    return config_for_test(**{**base, **overrides})


def _train(fault: str = "", **overrides) -> dict:
    """One run on this rank with `fault` armed (faults fire once per arming)."""
    os.environ[ENV] = fault
    LEDGER.faults = plan_from_env(LEDGER.rank) if fault else None
    config = _config(**overrides)
    trainer, ps = setup(config, log=False)
    result = train_loop(config, trainer, ps, log=False)
    return dict(losses=result.losses, skipped=result.skipped_iterations, start=trainer.start_iteration)


def _same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))


def _nan_skip_worker(ckpt: str) -> dict:
    layout = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, on_nan="skip")
    straight = _train("nan:rank=3:iteration=3", **layout)
    first = _train("nan:rank=3:iteration=3", save=ckpt, save_interval=2, exit_interval=4, **layout)
    resumed = _train(load=ckpt, **layout)
    return dict(straight=straight, first=first, resumed=resumed)


@pytest.mark.slow
def test_nan_skip_drops_the_update_and_resumes_exactly(tmp_path):
    r = run_distributed(_nan_skip_worker, 4, str(tmp_path / "ckpt"))[3]
    straight, first, resumed = r["straight"], r["first"], r["resumed"]
    assert math.isnan(straight["losses"][2]) and straight["skipped"] == 1
    assert all(math.isfinite(x) for i, x in enumerate(straight["losses"]) if i != 2)
    assert _same(first["losses"], straight["losses"][:4]) and first["skipped"] == 1
    assert resumed["start"] == 4 and resumed["losses"] == straight["losses"][4:]


def _abort_worker(ckpt: str) -> None:
    _train("nan:rank=1:iteration=2", pipeline_model_parallel_size=2, save=ckpt, save_interval=5)


def test_nan_abort_names_rank_iteration_and_parameters(tmp_path):
    with pytest.raises(RuntimeError) as info:
        run_distributed(_abort_worker, 2, str(tmp_path / "ckpt"))
    text = str(info.value)
    assert "ranks [0, 1] of 2 failed" in text                       # every rank agreed
    assert "NumericalAbort: NaN/Inf detected at iteration 2: loss computed on rank(s) [1], gradients on rank(s) " \
           "[0, 1]; first parameters: rank 0: embedding.word_embeddings.weight" in text
    assert not (tmp_path / "ckpt").exists()                          # abort saves nothing


def _spike_worker() -> dict:
    spiky = dict(pipeline_model_parallel_size=2, check_for_spiky_loss=True, spiky_loss_factor=10.0,
                 clip_grad=0.0)   # unclipped, so the x100 gradients change the update
    return dict(clean=_train(**spiky), warn=_train("spike:rank=1:iteration=4", **spiky),
                skip=_train("spike:rank=1:iteration=4", on_spike="skip", **spiky))


@pytest.mark.slow
def test_spike_warn_keeps_and_skip_drops_the_update():
    r = run_distributed(_spike_worker, 2)[1]
    clean, warn, skip = r["clean"]["losses"], r["warn"]["losses"], r["skip"]["losses"]
    assert warn[3] == pytest.approx(100 * clean[3], rel=1e-5) and r["warn"]["skipped"] == 0
    assert warn[4] != clean[4]                                       # the x100 gradients were applied
    assert skip[:4] == warn[:4] and r["skip"]["skipped"] == 1
    assert math.isfinite(skip[4]) and skip[4] != warn[4]            # the spiked update was not applied


def _replica_worker() -> dict:
    config = _config(check_replica_consistency_interval=1)
    trainer, ps = setup(config, log=False)
    train_loop(config, trainer, ps, log=False)                      # consistent: no complaint at any iteration
    named = [(n, p) for n, p in trainer.chunks[0].named_parameters()]
    before = replica_mismatch(named, ps, trainer.device)
    if ps.rank == 1:
        with torch.no_grad():
            named[3][1].view(-1)[0] += 1e-3
    return dict(before=before, after=replica_mismatch(named, ps, trainer.device), name=named[3][0])


@pytest.mark.slow
def test_replica_divergence_names_the_rank():
    r = run_distributed(_replica_worker, 2)[0]
    assert r["before"] is None
    assert "rank 1 (first differing parameter " + r["name"] + ")" in r["after"]


def test_nonfinite_names_and_straggler_line():
    grads = [("a", torch.ones(3)), ("b", None), ("c", torch.tensor([1.0, float("inf")])), ("d", torch.ones(2))]
    assert nonfinite_names(grads) == ["c"] and nonfinite_names(grads[:2]) == []
    assert straggler_line(10, [0.1, 0.1, 0.3, 0.12]) == (
        " straggler report at iteration 10: median step 110.0 ms; slowest: rank 2 300.0 ms (2.73x), "
        "rank 3 120.0 ms (1.09x), rank 0 100.0 ms (0.91x)")


def test_check_schedule_refuses_an_unmatched_send(monkeypatch):
    config = _config(pipeline_model_parallel_size=4, global_batch_size=8)
    preflight.check_schedules(config, pp_size=4, dp_size=1)         # the real lists run
    real = preflight.build_schedule

    def dropped_recv(count, pp, rank, *args):
        instrs = real(count, pp, rank, *args)
        if rank == 2:   # stage 2 never receives micro-batch 1's activation
            instrs = [i for i in instrs if i != Instr("recv_forward", 1)]
        return instrs
    monkeypatch.setattr(preflight, "build_schedule", dropped_recv)
    with pytest.raises(ConfigError, match=r"--check-schedule: .* 4 micro-batches over 4 stages.*stage 1's "
                                          r"send_forward of micro-batch 1 \(chunk 0\)"):
        preflight.check_schedules(config, pp_size=4, dp_size=1)


def _rollback_worker(ckpt: str) -> dict:
    layout = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, hidden_dropout=0.1,
                  attention_dropout=0.1, train_iters=8, lr_decay_iters=8, check_for_spiky_loss=True,
                  spiky_loss_factor=10.0, clip_grad=0.0)
    rolled = _train("spike:rank=3:iteration=6", on_spike="rollback", save=ckpt, save_interval=4, **layout)
    skip_file = open(os.path.join(ckpt, "iterations_to_skip.json")).read()
    reference = _train(iterations_to_skip=[5, 6], **layout)          # never saw the spike: skips the same data
    resumed = _train(load=ckpt, ckpt_step=4, **layout)               # the checkpoint from before the rollback
    return dict(rolled=rolled, reference=reference, resumed=resumed, skip_file=skip_file)


@pytest.mark.slow
def test_spike_rollback_reloads_skips_the_window_and_a_resume_skips_it_too(tmp_path):
    """Spike at 6 with checkpoints every 4: back to 4, iterations 5-6 only read their data, then 7-8 train. With
    dropout on, equality with a run given --iterations-to-skip 5 6 needs weights, optimizer, schedule, data position
    and every RNG stream restored exactly."""
    r = run_distributed(_rollback_worker, 4, str(tmp_path / "ckpt"))[3]
    rolled, reference, resumed = r["rolled"]["losses"], r["reference"]["losses"], r["resumed"]["losses"]
    assert len(rolled) == 8 and len(reference) == 6 and r["rolled"]["skipped"] == 1
    assert rolled[:4] == reference[:4] and rolled[5] > 10 * rolled[4]   # the spike (x100) was seen, then dropped
    assert rolled[6:] == reference[4:]                                  # bit-exact after the rollback
    assert r["resumed"]["start"] == 4 and resumed == reference[4:]      # the resume skipped 5-6 as well
    assert '"iterations_to_skip": [5, 6]' in r["skip_file"]
