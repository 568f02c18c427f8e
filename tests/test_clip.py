"""Global grad norm and clipping under TP, PP (tied embedding) and ZeRO sharding equal the single-process
norm of the full, unsharded gradients."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distributed import run_distributed
from megagpt.parallel.param_tags import tag

FULL = {"col": (8, 6), "row": (5, 8), "bias": (5,), "ln": (6,)}    # unsharded shapes
SPLIT = {"col": 0, "row": 1}                                        # TP partition dim (others replicated)


def full_grads() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {n: torch.randn(*s, generator=g) for n, s in FULL.items()}


def reference_norm(grads: dict[str, torch.Tensor], norm_type: float = 2.0) -> float:
    return float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads.values()]), norm_type))


def _tp_params(ps, grads: dict[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    """This TP rank's params (TP-split ones sliced) with attributes as the model's layers set them."""
    params = {}
    for n, g in grads.items():
        if n in SPLIT:
            piece = g.chunk(ps.tp_size, dim=SPLIT[n])[ps.tp_rank]
            p = nn.Parameter(torch.zeros_like(piece))
            tag(p, tp_split_dim=SPLIT[n])
        else:
            piece = g
            p = nn.Parameter(torch.zeros_like(g))
            tag(p, sequence_parallel=n == "ln")
        p.grad = piece.clone()
        params[n] = p
    return params


def _tp_norms(max_norm: float) -> dict:
    from megagpt.optim.clip import clip_grad_norm, get_grad_norm
    from megagpt.parallel.state import ParallelState

    ps = ParallelState(tp=2)
    params = _tp_params(ps, full_grads())
    out = {"l2": get_grad_norm(params.values(), ps), "inf": get_grad_norm(params.values(), ps, norm_type=math.inf)}
    out["clip_returned"] = clip_grad_norm(params.values(), max_norm, ps)
    out["clipped"] = {n: p.grad.tolist() for n, p in params.items()}
    out["tp_rank"] = ps.tp_rank
    return out


def test_tp_sharded_norm_counts_replicated_params_once():
    grads = full_grads()
    ref = reference_norm(grads)
    max_norm = ref / 3
    for r in run_distributed(_tp_norms, 2, max_norm):
        assert r["l2"] == pytest.approx(ref, rel=1e-5)
        assert r["inf"] == pytest.approx(reference_norm(grads, math.inf), rel=1e-6)
        assert r["clip_returned"] == pytest.approx(ref, rel=1e-5)
        coeff = max_norm / (ref + 1e-6)
        for n, g in grads.items():
            piece = g.chunk(2, dim=SPLIT[n])[r["tp_rank"]] if n in SPLIT else g
            torch.testing.assert_close(torch.tensor(r["clipped"][n]), piece * coeff, rtol=1e-5, atol=1e-7)
    # the double-counting alternative differs, so the test can tell them apart
    doubled = math.sqrt(ref ** 2 + sum(float(grads[n].square().sum()) for n in ("bias", "ln")))
    assert abs(doubled - ref) / ref > 1e-3


def _pp_norm() -> float:
    from megagpt.optim.clip import get_grad_norm
    from megagpt.parallel.state import ParallelState

    ps = ParallelState(tp=1, pp=2)
    g = full_grads()
    emb = nn.Parameter(torch.zeros(6, 4))
    emb.grad = torch.arange(24, dtype=torch.float32).view(6, 4) / 10    # identical on both stages (tied)
    tag(emb, shared_embedding=True, embedding_copy=not ps.is_first_stage)
    stage_param = nn.Parameter(torch.zeros_like(g["col"] if ps.is_first_stage else g["row"]))
    stage_param.grad = (g["col"] if ps.is_first_stage else g["row"]).clone()
    return get_grad_norm([emb, stage_param], ps)


def test_pp_tied_embedding_counted_once():
    g = full_grads()
    emb = torch.arange(24, dtype=torch.float32) / 10
    ref = reference_norm({"emb": emb, "col": g["col"], "row": g["row"]})
    for norm in run_distributed(_pp_norm, 4):
        assert norm == pytest.approx(ref, rel=1e-5)


def _optimizer_norms() -> list:
    """TP=2 x DP=2: real backward with known grads (SP grads partial per TP rank), finalize, optimizer step."""
    from megagpt.optim.grad_buffer import DataParallelGradReducer, finalize_model_grads
    from megagpt.config import OptimConfig
    from megagpt.optim.zero import build_dp_optimizer
    from megagpt.parallel.state import ParallelState

    ps = ParallelState(tp=2)
    grads = full_grads()
    norms = []
    for zero in (0, 1, 2):
        params = _tp_params(ps, grads)
        targets = {n: p.grad.clone() for n, p in params.items()}
        targets["ln"] *= (ps.tp_rank + 1) / 3          # partial sums over TP: 1/3 + 2/3 of the full grad
        for p in params.values():
            p.grad = None
        reducer = DataParallelGradReducer(list(params.values()), ps, bucket_size=20,
                                          use_distributed_optimizer=zero > 0, zero_stage=max(zero, 1))
        opt = build_dp_optimizer(ps, OptimConfig(lr=0.0, clip_grad=1.0), reducer)
        opt.zero_grad()
        sum((p * targets[n]).sum() for n, p in params.items()).backward()
        finalize_model_grads(list(params.values()), ps, reducer)
        ok, norm, _ = opt.step()
        norms.append((zero, ok, norm))
    return norms


def test_zero_sharded_norm_matches_single_process():
    ref = reference_norm(full_grads())
    for per_rank in run_distributed(_optimizer_norms, 4):
        for zero, ok, norm in per_rank:
            assert ok
            assert norm == pytest.approx(ref, rel=1e-5), f"zero stage {zero}"
