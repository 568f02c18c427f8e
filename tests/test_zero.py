"""Plain DDP, ZeRO-1 and ZeRO-2 (with and without overlapped reduction) on 2 and 4 gloo ranks against
single-process torch.optim.AdamW on the full batch: losses, grad norms and final weights; sharded state sizes."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distributed import run_distributed

IN, HID, OUT, BATCH, STEPS = 12, 32, 6, 16, 5
LR, WD, CLIP, BUCKET = 1e-2, 0.1, 0.5, 200
BETAS = (0.9, 0.95)   # not torch's default, so a dropped setting shows
def pack(obj, out_dir: str) -> str:
    """Results go through a file: run_distributed's queue cannot carry tensors (shared-memory handles die with
    the child) nor payloads larger than a pipe buffer (the parent joins before it reads)."""
    import torch.distributed as dist
    path = os.path.join(out_dir, f"rank{dist.get_rank()}.pt")
    torch.save(obj, path)
    return path


def unpack(path: str):
    return torch.load(path, weights_only=False)


MODES = [(0, False), (0, True), (1, False), (1, True), (2, False), (2, True)]   # (zero stage, overlap); 0 = DDP


def build_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    """The same seeded master model on every rank and in the reference."""
    torch.manual_seed(1234)
    model = nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, HID), nn.Tanh(), nn.Linear(HID, OUT))
    return model.to(dtype)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, IN, generator=g), torch.randn(BATCH, OUT, generator=g)


def reference_run(steps: int = STEPS, clip: float = CLIP):
    """Single process, full batch, torch AdamW; biases undecayed. Returns losses, grad norms, final weights."""
    model = build_model()
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() > 1], "weight_decay": WD},
                             {"params": [p for p in params if p.dim() == 1], "weight_decay": 0.0}], lr=LR,
                            betas=BETAS)
    losses, norms = [], []
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))))
        opt.step()
        losses.append(loss.item())
    return losses, norms, {n: p.detach().clone() for n, p in model.named_parameters()}


def dp_train(zero_stage: int, overlap: bool, steps: int = STEPS, micro: int = 2, dtype=torch.float32,
             inject_inf_at: tuple = (), start_step: int = 0, resume: tuple = None, same_batch: bool = False,
             **config_overrides) -> dict:
    """Train the toy model data-parallel on this rank (runs inside run_distributed). `zero_stage` 0 = plain DDP.

    `resume` = (params by name, optimizer state_dict) continues a run saved after `start_step` steps.
    """
    import torch.distributed as dist

    from megagpt.optim.grad_buffer import DataParallelGradReducer, finalize_model_grads
    from megagpt.config import OptimConfig
    from megagpt.optim.zero import build_dp_optimizer
    from megagpt.parallel import comm
    from megagpt.parallel.state import ParallelState

    ps = ParallelState(1, 1)
    model = build_model(dtype)
    names = {p: n for n, p in model.named_parameters()}
    reducer = DataParallelGradReducer(model.parameters(), ps, bucket_size=BUCKET,
                                      use_distributed_optimizer=zero_stage > 0, overlap_grad_reduce=overlap,
                                      zero_stage=max(zero_stage, 1))
    config = OptimConfig(lr=LR, weight_decay=WD, clip_grad=CLIP, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
                         bf16=dtype == torch.bfloat16,
                         fp16=dtype == torch.float16, **config_overrides)
    opt = build_dp_optimizer(ps, config, reducer, names)
    if resume is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(resume[0][n])
        opt.load_state_dict(resume[1])
    local, rank = BATCH // ps.dp_size, ps.dp_rank
    mb = local // micro
    out = {k: [] for k in ("losses", "norms", "ok", "scales", "launched_mid", "launched_end", "grads")}
    out["snapshots"] = []
    for step in range(start_step, start_step + steps):
        x, y = batch(0 if same_batch else step)
        x, y = x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]
        opt.zero_grad()
        total = 0.0
        for i in range(micro):
            last = i == micro - 1
            with contextlib.nullcontext() if last else reducer.no_sync():
                loss = F.mse_loss(model(x[i * mb:(i + 1) * mb].to(dtype)).float(), y[i * mb:(i + 1) * mb]) / micro
                opt.scale_loss(loss).backward()
            total += loss.item()
            if not last:
                out["launched_mid"].append(sum(b.launched for b in reducer.buckets()))
        out["launched_end"].append(sum(b.launched for b in reducer.buckets()))
        finalize_model_grads(model.parameters(), ps, reducer)
        if zero_stage:
            grads = torch.cat([reducer.owned_grad(r) for buf in reducer.buffers for r in buf.shard_ranges(rank)])
        else:
            grads = torch.cat([p.main_grad.reshape(-1) for p in model.parameters()])
        out["grads"].append(grads.clone())
        if step in inject_inf_at and rank == ps.dp_size - 1:   # only one rank sees it: all must agree to skip
            grads_view = reducer.owned_grad(reducer.buffers[0].shard_ranges(rank)[0]) if zero_stage \
                else next(model.parameters()).main_grad.view(-1)
            grads_view[0] = float("inf")
        before = [p.detach().clone() for p in model.parameters()] + [s.master.detach().clone() for s in opt.slots]
        ok, norm, _ = opt.step()
        after = [p.detach().clone() for p in model.parameters()] + [s.master.detach().clone() for s in opt.slots]
        out["snapshots"].append(all(torch.equal(a, b) for a, b in zip(before, after)))
        t = torch.tensor([total], dtype=torch.float64)
        comm.all_reduce(t, ps.dp_group)
        out["losses"].append(t.item() / ps.dp_size)
        out["norms"].append(norm)
        out["ok"].append(ok)
        out["scales"].append(opt.loss_scale)
    out["params"] = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    out["state_numel"] = sum(v.numel() for st in opt.optimizer.state.values() for k, v in st.items()
                             if k == "exp_avg")
    out["state_bytes"] = sum(v.numel() * v.element_size() for st in opt.optimizer.state.values()
                             for k, v in st.items() if k in ("exp_avg", "exp_avg_sq"))
    out["master_numel"] = sum(s.master.numel() for s in opt.slots if s.separate_master)
    out["grad_bytes"] = reducer.grad_bytes()
    out["buffer_numel"] = sum(buf.numel for buf in reducer.buffers)
    out["padding"] = sum(buf.numel - buf.numel_unpadded for buf in reducer.buffers)
    out["state_dict"] = opt.state_dict()
    out["model_matches_master"] = all(torch.equal(s.model_view, s.master.to(s.model_view.dtype).view_as(s.model_view))
                                      for s in opt.slots)
    out["skipped"] = opt.skipped_iterations
    out["rank"] = dist.get_rank()
    return out


def _all_modes(out_dir: str) -> str:
    return pack({mode: dp_train(*mode) for mode in MODES}, out_dir)


@pytest.fixture(scope="module")
def reference():
    return reference_run()


@pytest.fixture(scope="module", params=[2, 4], ids=["dp2", "dp4"])
def runs(request, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp(f"dp{request.param}"))
    return request.param, [unpack(r) for r in run_distributed(_all_modes, request.param, out_dir)]


@pytest.mark.parametrize("mode", MODES, ids=[f"zero{z}{'-overlap' if o else ''}" for z, o in MODES])
def test_matches_single_process_adamw(runs, reference, mode):
    ref_losses, ref_norms, ref_params = reference
    _, per_rank = runs
    for res in per_rank:
        r = res[mode]
        assert all(r["ok"])
        torch.testing.assert_close(torch.tensor(r["losses"], dtype=torch.float64), torch.tensor(ref_losses).double(),
                                   rtol=1e-5, atol=0)
        torch.testing.assert_close(torch.tensor(r["norms"]), torch.tensor(ref_norms), rtol=1e-5, atol=0)
        for name, p in ref_params.items():
            torch.testing.assert_close(r["params"][name], p, rtol=1e-5, atol=1e-6, msg=f"{mode} {name}")
    assert any(n > CLIP for n in ref_norms), "the clip path is not exercised"


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_overlapped_reduction_gives_same_grads(runs, zero_stage):
    _, per_rank = runs
    for res in per_rank:
        plain, overlapped = res[(zero_stage, False)], res[(zero_stage, True)]
        for g0, g1 in zip(plain["grads"], overlapped["grads"]):
            assert torch.equal(g0, g1)
        assert all(n == 0 for n in overlapped["launched_mid"]), "no_sync micro-batch launched a reduction"
        assert all(n == 0 for n in plain["launched_end"])
        assert all(n == 3 for n in overlapped["launched_end"]), "every bucket launches during the last backward"


def test_sharded_state_is_one_over_dp(runs):
    dp, per_rank = runs
    total = sum(p.numel() for p in build_model().parameters())
    for mode in MODES:
        zero = mode[0]
        numels = [res[mode]["state_numel"] for res in per_rank]
        if zero == 0:
            assert numels == [total] * dp
            continue
        assert sum(numels) == total                      # a partition: nothing owned twice or by nobody
        padding = per_rank[0][mode]["padding"]
        for n in numels:
            assert abs(n - total / dp) <= padding, (mode, numels)
        for res in per_rank:
            assert res[mode]["state_bytes"] == 8 * res[mode]["state_numel"]
            assert res[mode]["master_numel"] == 0         # fp32 model: the masters are the params themselves


def test_zero2_releases_unowned_grads(runs):
    dp, per_rank = runs
    for res in per_rank:
        for mode in MODES:
            r = res[mode]
            expected = r["buffer_numel"] * 4 // dp if mode[0] == 2 else r["buffer_numel"] * 4
            assert r["grad_bytes"] == expected, mode


def _resume(zero_stage: int, out_dir: str) -> str:
    """3 steps, save, rebuild from the saved state, 2 more steps; and 5 uninterrupted steps (bf16)."""
    from megagpt.optim.grad_buffer import DataParallelGradReducer
    from megagpt.config import OptimConfig
    from megagpt.optim.zero import DistributedOptimizer
    from megagpt.parallel.state import ParallelState

    first = dp_train(zero_stage, True, steps=3, dtype=torch.bfloat16)
    saved = first["state_dict"]
    params = {n: p.to(torch.bfloat16) for n, p in first["params"].items()}
    second = dp_train(zero_stage, True, steps=2, dtype=torch.bfloat16, start_step=3, resume=(params, saved))
    full = dp_train(zero_stage, True, steps=5, dtype=torch.bfloat16)

    refused = zero_stage == 0          # (plain DDP: every rank holds the same full state, nothing to refuse)
    if zero_stage:
        ps = ParallelState(1, 1)
        model = build_model(torch.bfloat16)
        reducer = DataParallelGradReducer(model.parameters(), ps, BUCKET, True, False, zero_stage)
        opt = DistributedOptimizer(model.parameters(), ps, OptimConfig(lr=LR, bf16=True), reducer,
                                   {p: n for n, p in model.named_parameters()})
        try:
            opt.load_state_dict(dict(saved, dp_rank=(ps.dp_rank + 1) % ps.dp_size))
        except ValueError:
            refused = True
    return pack({"refused": refused, "layout": saved["shard_layout"], "second": second, "full": full,
                 "masters": {n: st["master"] for n, st in full["state_dict"]["param_state"].items()}}, out_dir)


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_resume_from_sharded_state_is_exact(zero_stage, tmp_path):
    per_rank = [unpack(r) for r in run_distributed(_resume, 2, zero_stage, str(tmp_path))]
    model = build_model()
    for r in per_rank:
        assert r["refused"], "a shard saved for another DP rank must not load"
        assert r["second"]["losses"] == r["full"]["losses"][3:]
        for n, p in r["full"]["params"].items():
            assert torch.equal(r["second"]["params"][n], p), n
    # ZeRO: the saved layouts tile every parameter exactly once, and the stitched fp32 masters round to the model
    # (plain DDP: every rank's layout is the whole parameter)
    for name, p in model.named_parameters():
        if zero_stage == 0:
            per_rank = per_rank[:1]
        covered = sorted((r["layout"][name]["start"], r["layout"][name]["end"]) for r in per_rank
                         if name in r["layout"])
        assert covered[0][0] == 0 and covered[-1][1] == p.numel()
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
        full = torch.full((p.numel(),), float("nan"))
        for r in per_rank:
            if name in r["layout"]:
                full[r["layout"][name]["start"]:r["layout"][name]["end"]] = r["masters"][name].reshape(-1)
        assert full.dtype == torch.float32 and torch.isfinite(full).all()
        model_value = per_rank[0]["full"]["params"][name].reshape(-1)
        assert torch.equal(full.to(torch.bfloat16).float(), model_value), name
