"""The pipeline executor on gloo: toy stages cut from one seeded model match the single-process model.

The full model is L layers of Linear + tanh, built from one seed in every process; a stage (or virtual stage)
keeps a contiguous slice of it, so pipelined and single-process runs do the same arithmetic. Loss is the mean
squared error per micro-batch, divided by the number of micro-batches as the training loop does. Every
layout must reproduce the reference per-layer summed gradients and per-micro-batch losses (fp32, rtol 1e-5).
Each world size is spawned once and runs all its scenarios (process start-up dominates the runtime).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distributed import run_distributed
from megagpt.parallel.layers import linear
from megagpt.config import virtual_stage
from megagpt.parallel.state import ParallelState
from megagpt.pipeline.executor import broadcast_losses, forward_backward

HIDDEN, BATCH, LAYERS, SEED = 8, 3, 8, 1234


@dataclass(frozen=True)
class Scenario:
    pp: int
    chunks: int
    microbatches: int
    forward_only: bool = False
    schedule: Optional[str] = None

    @property
    def name(self) -> str:
        return (f"pp{self.pp}-v{self.chunks}-m{self.microbatches}" + ("-fwd" if self.forward_only else "")
                + (f"-{self.schedule}" if self.schedule else ""))

    @property
    def v_shape(self) -> bool:
        return self.schedule == "zb-v"


SCENARIOS = {
    2: [Scenario(2, 1, 4), Scenario(2, 1, 1), Scenario(2, 1, 3), Scenario(2, 2, 4), Scenario(2, 2, 2),
        Scenario(2, 2, 6), Scenario(1, 1, 3), Scenario(2, 1, 4, forward_only=True),
        Scenario(2, 2, 4, forward_only=True), Scenario(2, 1, 4, schedule="zb-h1"), Scenario(2, 1, 3, schedule="zb-h1"),
        Scenario(2, 2, 4, schedule="zb-v"), Scenario(2, 2, 3, schedule="zb-v"),
        Scenario(2, 2, 4, forward_only=True, schedule="zb-v")],
    4: [Scenario(4, 1, 8), Scenario(4, 1, 3), Scenario(4, 2, 8), Scenario(2, 2, 4), Scenario(4, 1, 8, schedule="zb-h1"),
        Scenario(4, 2, 8, schedule="zb-v"), Scenario(4, 2, 5, schedule="zb-v")],
}


def full_model() -> nn.ModuleList:
    torch.manual_seed(SEED)
    return nn.ModuleList(nn.Linear(HIDDEN, HIDDEN) for _ in range(LAYERS))


def micro_batches(m: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + m)
    return torch.randn(m, BATCH, HIDDEN, generator=g), torch.randn(m, BATCH, HIDDEN, generator=g)


def run_layers(layers, x: torch.Tensor) -> torch.Tensor:
    """The deferrable linear of parallel/layers.py (F.linear's arithmetic), so split backwards defer real W."""
    for layer in layers:
        x = torch.tanh(linear(x, layer.weight, layer.bias))   # [b, h]
    return x


def reference(m: int, forward_only: bool) -> tuple[dict, list[torch.Tensor]]:
    """Single process: every micro-batch through all layers, loss / m backpropagated and accumulated."""
    model = full_model()
    xs, ys = micro_batches(m)
    losses = []
    for mb in range(m):
        loss = F.mse_loss(run_layers(model, xs[mb]), ys[mb])
        if not forward_only:
            (loss / m).backward()
        losses.append(loss.detach())
    grads = {} if forward_only else {i: (l.weight.grad, l.bias.grad) for i, l in enumerate(model)}
    return grads, losses


def _np(t: Optional[torch.Tensor]):
    """Tensors cross the process boundary as numpy arrays (torch would share memory with a dead child)."""
    return None if t is None else t.detach().numpy().copy()


def _run_scenario(sc: Scenario) -> dict:
    ps = ParallelState(tp=1, pp=sc.pp, virtual_pp=sc.chunks if sc.chunks > 1 else None, pipeline_schedule=sc.schedule)
    per_chunk = LAYERS // (sc.pp * sc.chunks)
    model = full_model()
    # Virtual stage s owns layers [s * per_chunk, (s + 1) * per_chunk).
    stage = {c: virtual_stage(sc.pp, ps.pp_rank, c, sc.chunks, sc.v_shape) for c in range(sc.chunks)}
    owned = {c: list(range(stage[c] * per_chunk, (stage[c] + 1) * per_chunk)) for c in range(sc.chunks)}
    xs, ys = micro_batches(sc.microbatches)
    outputs: list[weakref.ref] = []

    def forward_step(chunk: int, mb: int, inp: Optional[torch.Tensor]):
        first = stage[chunk] == 0
        assert (inp is None) == first
        out = run_layers([model[i] for i in owned[chunk]], xs[mb] if first else inp)
        outputs.append(weakref.ref(out))
        if stage[chunk] == sc.pp * sc.chunks - 1:
            loss = F.mse_loss(out, ys[mb])
            return loss / sc.microbatches, loss.detach()
        return out, None

    live, trace = [], []

    def on_instruction(ins) -> None:
        trace.append(ins)
        live.append(sum(ref() is not None for ref in outputs))

    losses = forward_backward(forward_step, sc.microbatches, ps, (BATCH, HIDDEN), torch.float32,
                              torch.device("cpu"), num_chunks=sc.chunks, forward_only=sc.forward_only,
                              on_instruction=on_instruction, schedule=sc.schedule)
    mean = broadcast_losses(losses, ps)
    grads = {i: (_np(model[i].weight.grad), _np(model[i].bias.grad)) for c in owned for i in owned[c]}
    return {"pp_rank": ps.pp_rank, "dp_rank": ps.dp_rank, "losses": [_np(x) for x in losses], "mean": mean,
            "grads": grads,
            "peak_live": max(live), "alive_after": sum(ref() is not None for ref in outputs),
            "forwards": sum(i.op == "forward" for i in trace),
            "backwards": sum(i.op in ("backward", "backward_input") for i in trace),
            "weights": sum(i.op == "backward_weight" for i in trace), "last": ps.is_last_stage}


def _worker(scenarios: list[Scenario]) -> dict:
    return {sc.name: _run_scenario(sc) for sc in scenarios}


@pytest.fixture(scope="module")
def results():
    """world size -> per-rank results, each world spawned once, on first use (so -k can pick one world)."""
    cache: dict[int, object] = {}

    def get(world: int) -> list:
        if world not in cache:   # a failed spawn is remembered too: its scenarios fail without re-spawning
            try:
                cache[world] = run_distributed(_worker, world, SCENARIOS[world], timeout_s=60)
            except RuntimeError as exc:
                cache[world] = exc
        if isinstance(cache[world], RuntimeError):
            raise cache[world]
        return cache[world]
    return get


CASES = [(world, sc) for world, scs in SCENARIOS.items() for sc in scs]


@pytest.mark.parametrize("world,sc", CASES, ids=[f"w{w}-{sc.name}" for w, sc in CASES])
def test_pipeline_matches_single_process(results, world, sc):
    ranks = [r[sc.name] for r in results(world)]
    ref_grads, ref_losses = reference(sc.microbatches, sc.forward_only)
    ref_mean = torch.stack(ref_losses).mean().item()
    for r in ranks:
        last = r["pp_rank"] == (0 if sc.v_shape else sc.pp - 1)
        assert r["last"] == last
        assert r["forwards"] == sc.microbatches * sc.chunks
        assert r["backwards"] == (0 if sc.forward_only else sc.microbatches * sc.chunks)
        split = sc.schedule in ("zb-h1", "zb-v") and not sc.forward_only
        assert r["weights"] == (sc.microbatches * sc.chunks if split else 0)
        assert r["alive_after"] == 0, "activations outlived forward_backward"
        if last:
            torch.testing.assert_close(torch.from_numpy(np.stack(r["losses"])), torch.stack(ref_losses),
                                       rtol=1e-5, atol=1e-6)
        else:
            assert r["losses"] == []
        assert r["mean"] == pytest.approx(ref_mean, rel=1e-5)
        if sc.forward_only:
            assert all(w is None and b is None for w, b in r["grads"].values())
            assert r["peak_live"] <= 1, "forward_only must not keep activations"
            continue
        for i, (w, b) in r["grads"].items():
            torch.testing.assert_close(torch.from_numpy(w), ref_grads[i][0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(torch.from_numpy(b), ref_grads[i][1], rtol=1e-5, atol=1e-6)
        if sc.v_shape:       # ZB-V: at most 2 PP chunk-micro-batches between F and W (1F1B's first stage)
            assert r["peak_live"] <= 2 * sc.pp
        elif sc.chunks == 1:  # 1F1B and ZB-H1: at most PP - stage micro-batches between F and B
            assert r["peak_live"] == min(sc.pp - r["pp_rank"], sc.microbatches) <= sc.pp - r["pp_rank"]
        else:                # interleaved: Megatron's warm-up count + 1 chunk-micro-batches
            m, p, v, rank = sc.microbatches, sc.pp, sc.chunks, r["pp_rank"]
            warmup = m * v if m == p else min(2 * (p - rank - 1) + (v - 1) * p, m * v)
            assert r["peak_live"] == min(warmup + 1, m * v)
    # Every layer is owned by exactly one stage of each pipeline.
    for dp in {r["dp_rank"] for r in ranks}:
        owned = sorted(i for r in ranks if r["dp_rank"] == dp for i in r["grads"])
        assert owned == list(range(LAYERS))
