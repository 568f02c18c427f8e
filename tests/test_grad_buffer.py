"""Grad buffer layout (no processes), backward hooks, and finalize_model_grads on gloo: sequence-parallel grads
summed over TP and tied-embedding grads summed over the first/last stage before the DP average, for plain DDP,
ZeRO-1 and ZeRO-2, with and without overlapped reduction."""
from __future__ import annotations

import contextlib
import types

import pytest
import torch
from torch import nn

from distributed import run_distributed
from test_zero import pack, unpack
from megagpt.optim.grad_buffer import BUCKET_ALIGN, DataParallelGradReducer, GradBuffer
from megagpt.parallel.param_tags import tag

MODES = [(0, False), (0, True), (1, False), (1, True), (2, False), (2, True)]   # (zero stage, overlap)


def _params(*shapes, dtype=torch.float32) -> list[nn.Parameter]:
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(*s, dtype=dtype)) for s in shapes]


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_layout_reverse_order_padded_buckets(dp):
    params = _params((10, 3), (7,), (50,), (4, 4), (3,))
    buf = GradBuffer(params, {id(p): "dp" for p in params}, dp, bucket_size=40)
    order = [p for b in buf.buckets for p in b.params]
    assert [id(p) for p in order] == [id(p) for p in reversed(params)]       # backward order
    # bucket closes once it reaches 40 elements: [3, 16, 50] then [7, 30]
    assert [[p.numel() for p in b.params] for b in buf.buckets] == [[3, 16, 50], [7, 30]]
    for b in buf.buckets:
        assert b.numel % (BUCKET_ALIGN * dp) == 0
        assert b.numel >= sum(p.numel() for p in b.params)
    assert buf.numel % dp == 0 and buf.numel == sum(b.numel for b in buf.buckets)
    assert buf.numel_unpadded == sum(p.numel() for p in params)
    for p in params:                                # main_grad is a view of the buffer inside its bucket
        lo, hi = buf.param_range[id(p)]
        b = buf.param_bucket[id(p)]
        assert b.start <= lo < hi <= b.end
        buf.data[lo:hi] = 7.0
        assert p.main_grad.shape == p.shape and p.main_grad.dtype == torch.float32
        assert bool((p.main_grad == 7.0).all())


@pytest.mark.parametrize("dp", [2, 3, 4])
def test_shard_ranges_partition_every_param(dp):
    params = _params((10, 3), (7,), (130,), (4, 40), (3,))
    buf = GradBuffer(params, {id(p): "dp" for p in params}, dp, bucket_size=100)
    for p in params:
        covered = torch.zeros(p.numel(), dtype=torch.int64)
        for rank in range(dp):
            for r in buf.shard_ranges(rank):
                if r.param is p:
                    covered[r.param_start:r.param_end] += 1
                    lo, hi = r.bucket.owned_range(dp, rank)
                    assert lo <= r.buffer_start and r.buffer_start + r.numel <= hi
                    assert r.shard_offset == r.buffer_start - lo
        assert bool((covered == 1).all())
    for rank in range(dp):                           # every rank owns exactly 1/DP of every bucket
        for b in buf.buckets:
            lo, hi = b.owned_range(dp, rank)
            assert hi - lo == b.numel // dp


def test_pre_reduced_params_get_their_own_buckets_at_the_end():
    params = _params((8,), (4, 4), (8,), (6, 4))
    kinds = {id(params[0]): "tp_sync", id(params[1]): "dp", id(params[2]): "tp_sync",
             id(params[3]): "embedding_sync"}
    buf = GradBuffer(params, kinds, 2, bucket_size=None)
    assert [b.kind for b in buf.buckets] == ["dp", "tp_sync", "embedding_sync"]
    assert [[id(p) for p in b.params] for b in buf.buckets] == \
        [[id(params[1])], [id(params[2]), id(params[0])], [id(params[3])]]


def test_zero2_release_and_reallocate_keep_views_and_param_buffer():
    params = _params((5, 5), (5,), dtype=torch.bfloat16)
    values = [p.detach().clone() for p in params]
    buf = GradBuffer(params, {id(p): "dp" for p in params}, 2, None, separate_bucket_storage=True,
                     with_param_buffer=True)
    for p, v in zip(params, values):                 # params moved into the param buffer, values kept
        assert torch.equal(p.detach(), v)
        assert p.untyped_storage().data_ptr() == buf.param_data.untyped_storage().data_ptr()
    b = buf.buckets[0]
    b.release_()
    assert not b.allocated and b.data.untyped_storage().nbytes() == 0
    b.allocate_()
    params[0].main_grad.fill_(3.0)
    lo, hi = buf.param_range[id(params[0])]
    assert bool((b.data[lo - b.start:hi - b.start] == 3.0).all())
    assert bool((params[1].main_grad == 0).all())


def test_hooks_accumulate_fp32_main_grad_and_drop_grad():
    """bf16 params: each micro-batch's bf16 grad lands in the fp32 main_grad, and .grad is freed."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 3).to(torch.bfloat16)
    ps = types.SimpleNamespace(dp_size=2, dp_rank=0, tp_size=1, pp_size=1)   # no collective runs without overlap
    reducer = DataParallelGradReducer(lin.parameters(), ps, bucket_size=None)
    xs = [torch.randn(4, 6, dtype=torch.bfloat16) for _ in range(2)]
    expected = {n: torch.zeros(p.shape) for n, p in lin.named_parameters()}
    for x in xs:
        ref = nn.Linear(6, 3).to(torch.bfloat16)
        ref.load_state_dict(lin.state_dict())
        ref(x).float().square().sum().backward()
        for n, p in ref.named_parameters():
            expected[n] += p.grad.float()
        with reducer.no_sync():
            lin(x).float().square().sum().backward()
    for n, p in lin.named_parameters():
        assert p.grad is None
        assert p.main_grad.dtype == torch.float32
        assert torch.equal(p.main_grad, expected[n])


def _coeff(*key: int, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + sum(k * 31 ** i for i, k in enumerate(key)))
    return torch.randn(*shape, generator=g)


SHAPES = {"ln": (8,), "col": (4, 8), "bias": (8,), "emb": (6, 4), "w": (4, 4)}


def _finalize_case(tp: int, pp: int, out_dir: str) -> str:
    """Every mode: synthetic losses with known per-rank grads, 2 micro-batches; return reduced grads."""
    from megagpt.optim.grad_buffer import finalize_model_grads
    from megagpt.parallel.state import ParallelState

    ps = ParallelState(tp, pp)
    results = []
    for zero, overlap in MODES:
        params = {n: nn.Parameter(torch.zeros(s)) for n, s in SHAPES.items()}
        tag(params["ln"], sequence_parallel=True)
        tag(params["col"], tp_split_dim=0)
        tag(params["emb"], shared_embedding=True, embedding_copy=not ps.is_first_stage)
        reducer = DataParallelGradReducer(list(params.values()), ps, bucket_size=16,
                                          use_distributed_optimizer=zero > 0, overlap_grad_reduce=overlap,
                                          zero_stage=max(zero, 1))
        for micro in range(2):
            with reducer.no_sync() if micro == 0 else contextlib.nullcontext():
                loss = sum((p * _per_rank_coeff(n, ps.tp_rank, ps.pp_rank, ps.dp_rank, micro)).sum()
                           for n, p in params.items())
                loss.backward()
        kinds_launched = {b.kind for b in reducer.buckets() if b.launched}
        finalize_model_grads(list(params.values()), ps, reducer)
        grads = {}
        if zero:
            for buf in reducer.buffers:
                for r in buf.shard_ranges(ps.dp_rank):
                    name = next(n for n, p in params.items() if p is r.param)
                    grads.setdefault(name, []).append((r.param_start, r.param_end, reducer.owned_grad(r).clone()))
        else:
            grads = {n: [(0, p.numel(), p.main_grad.reshape(-1).clone())] for n, p in params.items()}
        results.append({"mode": (zero, overlap), "grads": grads, "kinds_launched": kinds_launched})
    return pack([(ps.tp_rank, ps.pp_rank, ps.dp_rank), results], out_dir)


def _per_rank_coeff(name: str, tp: int, pp: int, dp: int, micro: int) -> torch.Tensor:
    """What each rank's backward produces: replicated non-SP params get TP-identical grads, as in a real model."""
    key = {"ln": 1, "col": 2, "bias": 3, "emb": 4, "w": 5}[name]
    tp_key = tp if name in ("ln", "col") else 0
    return _coeff(key, tp_key, pp, dp, micro, shape=SHAPES[name])


def _expected(name: str, tp: int, pp: int, tp_size: int, pp_size: int, dp_size: int) -> torch.Tensor:
    total = torch.zeros(SHAPES[name])
    for dp in range(dp_size):
        for micro in range(2):
            if name == "ln" and tp_size > 1:           # sequence parallel: summed over TP
                total += sum(_per_rank_coeff(name, t, pp, dp, micro) for t in range(tp_size))
            elif name == "emb" and pp_size > 1:        # tied embedding: summed over first and last stage
                total += sum(_per_rank_coeff(name, tp, s, dp, micro) for s in (0, pp_size - 1))
            else:
                total += _per_rank_coeff(name, tp, pp, dp, micro)
    return (total / dp_size).reshape(-1)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2-dp2-sequence-parallel", "pp2-dp2-tied-embedding"])
def test_finalize_model_grads(tp, pp, tmp_path):
    world = 4
    dp_size = world // (tp * pp)
    owned_per_replica: dict = {}
    total = sum(torch.Size(s).numel() for s in SHAPES.values())
    for path in run_distributed(_finalize_case, world, tp, pp, str(tmp_path)):
        (tp_rank, pp_rank, _), results = unpack(path)
        for res in results:
            zero, overlap = res["mode"]
            if overlap:     # plain-DP buckets start in backward; pre-reduced ones wait for finalize
                assert res["kinds_launched"] == {"dp"}
            else:
                assert not res["kinds_launched"]
            owned = 0
            for name in SHAPES:
                expected = _expected(name, tp_rank, pp_rank, tp, pp, dp_size)
                for start, end, got in res["grads"].get(name, []):
                    torch.testing.assert_close(got, expected[start:end], rtol=1e-6, atol=1e-6,
                                               msg=f"{res['mode']} {name}")
                    owned += end - start
            key = (tp_rank, pp_rank, res["mode"])
            owned_per_replica[key] = owned_per_replica.get(key, 0) + owned
    for (_, _, (zero, _)), owned in owned_per_replica.items():    # ZeRO: the DP ranks' shards tile the model
        assert owned == (total * dp_size if zero == 0 else total)
