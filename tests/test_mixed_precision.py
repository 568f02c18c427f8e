"""Dynamic loss scaler semantics (pure), and fp16/bf16 training with fp32 masters on 2 gloo ranks: an overflow on one
rank skips the step everywhere and leaves the weights untouched; bf16 learns and ZeRO matches DDP."""
from __future__ import annotations

import pytest
import torch

from distributed import run_distributed
from megagpt.config import OptimConfig, optimizer_problems
from megagpt.optim.mixed_precision import ConstantLossScaler, DynamicLossScaler, build_loss_scaler
from test_zero import dp_train, pack, reference_run, unpack


def test_dynamic_scaler_hysteresis_backoff_floor_and_growth():
    s = DynamicLossScaler(initial_scale=2.0 ** 10, min_scale=2.0 ** 8, growth_interval=3, hysteresis=2)
    events = [True, True, True, True, False, False, False, True, True, False]
    # hand-derived (Megatron): 1st overflow uses up hysteresis, then every overflow halves down to the floor;
    # 3 clean steps double the scale and refill the hysteresis
    expected = [1024, 512, 256, 256, 256, 256, 512, 512, 256, 256]
    got = []
    for found_inf in events:
        s.update(found_inf)
        got.append(s.scale)
    assert got == expected


def test_dynamic_scaler_state_round_trip():
    a = DynamicLossScaler(initial_scale=64.0, growth_interval=2, hysteresis=3)
    for found_inf in (True, False):
        a.update(found_inf)
    b = DynamicLossScaler(initial_scale=1.0, growth_interval=2, hysteresis=3)   # same config, fresh counters
    b.load_state_dict(a.state_dict())
    for found_inf in (True, True, False, False, True, False, False):
        a.update(found_inf)
        b.update(found_inf)
        assert a.state_dict() == b.state_dict()
    assert a.state_dict()["scale"] != 64.0


def test_scaler_choice():
    assert build_loss_scaler(OptimConfig(bf16=True)) is None
    assert build_loss_scaler(OptimConfig()) is None
    assert isinstance(build_loss_scaler(OptimConfig(fp16=True)), DynamicLossScaler)
    constant = build_loss_scaler(OptimConfig(fp16=True, loss_scale=128.0))
    assert isinstance(constant, ConstantLossScaler)
    constant.update(True)
    assert constant.scale == 128.0
    assert optimizer_problems(OptimConfig(bf16=True, fp16=True)) == ["--bf16 and --fp16 are mutually exclusive"]


def _fp16_overflow(out_dir: str) -> str:
    runs = {zero: dp_train(zero, zero == 2, steps=6, dtype=torch.float16, inject_inf_at=(1, 2),
                           initial_loss_scale=256.0, loss_scale_window=3, hysteresis=2)
            for zero in (0, 2)}
    return pack(runs, out_dir)


def test_fp16_overflow_skips_everywhere_and_scale_recovers(tmp_path):
    _, ref_norms, _ = reference_run(steps=1)
    for path in run_distributed(_fp16_overflow, 2, str(tmp_path)):
        for zero, r in unpack(path).items():
            assert r["ok"] == [True, False, False, True, True, True], zero
            assert r["snapshots"] == [False, True, True, False, False, False], zero   # weights untouched on skip
            assert r["scales"] == [256.0, 256.0, 128.0, 128.0, 128.0, 256.0], zero
            assert r["skipped"] == 2
            assert r["norms"][1] is None and r["norms"][2] is None
            # grads were unscaled before the norm: it matches the fp32 model's norm to fp16 accuracy
            assert r["norms"][0] == pytest.approx(ref_norms[0], rel=1e-2)
            assert r["model_matches_master"]


def _bf16(out_dir: str) -> str:
    return pack({zero: dp_train(zero, True, steps=12, dtype=torch.bfloat16, same_batch=True) for zero in (0, 1, 2)},
                out_dir)


def test_bf16_learns_with_fp32_masters_and_zero_matches_ddp(tmp_path):
    per_rank = [unpack(p) for p in run_distributed(_bf16, 2, str(tmp_path))]
    for runs in per_rank:
        for zero, r in runs.items():
            assert all(r["ok"])
            assert r["losses"][-1] < 0.8 * r["losses"][0], (zero, r["losses"])
            assert r["model_matches_master"]
            for st in r["state_dict"]["param_state"].values():
                assert st["master"].dtype == torch.float32
        for name, p in runs[0]["params"].items():    # same updates sharded or not, to bf16 resolution (2^-8)
            torch.testing.assert_close(runs[1]["params"][name], p, rtol=2 ** -8, atol=1e-6)
            torch.testing.assert_close(runs[2]["params"][name], p, rtol=2 ** -8, atol=1e-6)
    # fp32 masters: stitch the ZeRO-1 shards of both ranks and compare with DDP's full masters
    for name, st in per_rank[0][0]["state_dict"]["param_state"].items():
        full = torch.full((st["master"].numel(),), float("nan"))
        for runs in per_rank:
            zst = runs[1]["state_dict"]
            if name in zst["shard_layout"]:
                lo, hi = zst["shard_layout"][name]["start"], zst["shard_layout"][name]["end"]
                full[lo:hi] = zst["param_state"][name]["master"]
        torch.testing.assert_close(full, st["master"].reshape(-1), rtol=1e-5, atol=1e-7)
