"""TP autograd collectives (f, g, scatter/gather, SP gather/reduce-scatter) against dense single-process math.

Every rank builds all ranks' inputs and gradients from one seed, so the expected forward value and input gradient
of each collective can be written with torch.cat / sum / chunk locally. One gloo launch per world size runs every
check (launching is the slow part); each check is reported as its own test.
"""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from distributed import assert_check_passed, run_checks, run_distributed
from megagpt.parallel import comm
from megagpt.parallel.mappings import (
    copy_to_tp_region,
    gather_from_sequence_parallel_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tp_region,
)

S, B, H = 8, 3, 12  # divisible by 2 and 4


def _per_rank(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """[n, *shape]: entry r is rank r's tensor; identical on every rank."""
    return torch.randn((n,) + shape, generator=torch.Generator().manual_seed(seed))


def _run(op, x: torch.Tensor, grad: torch.Tensor, *args):
    x = x.clone().requires_grad_(True)
    y = op(x, *args)
    y.backward(grad)
    return y.detach(), x.grad


def check_copy_to_tp_region(group, r, n):
    xs, gs = _per_rank(n, (S, B, H), 1), _per_rank(n, (S, B, H), 2)
    y, dx = _run(copy_to_tp_region, xs[r], gs[r], group)
    assert_close(y, xs[r])  # identity forward
    assert_close(dx, gs.sum(0))  # all-reduce backward


def check_reduce_from_tp_region(group, r, n):
    xs, gs = _per_rank(n, (S, B, H), 3), _per_rank(n, (S, B, H), 4)
    y, dx = _run(reduce_from_tp_region, xs[r], gs[r], group)
    assert_close(y, xs.sum(0))
    assert_close(dx, gs[r])  # identity backward


def check_scatter_to_tp_region(group, r, n):
    x, gs = _per_rank(1, (S, B, H), 5)[0], _per_rank(n, (S, B, H // n), 6)
    y, dx = _run(scatter_to_tp_region, x, gs[r], group)
    assert_close(y, x.chunk(n, dim=-1)[r])
    assert y.is_contiguous()
    assert_close(dx, torch.cat(list(gs), dim=-1))


def check_gather_from_tp_region(group, r, n):
    xs, gs = _per_rank(n, (S, B, H // n), 7), _per_rank(n, (S, B, H), 8)
    y, dx = _run(gather_from_tp_region, xs[r], gs[r], group)
    assert_close(y, torch.cat(list(xs), dim=-1))
    assert_close(dx, gs[r].chunk(n, dim=-1)[r])


def check_gather_from_tp_region_2d_noncontiguous(group, r, n):
    xs = _per_rank(n, (H // n, 5), 9).transpose(1, 2)  # [n, 5, H/n], each a non-contiguous view
    gs = _per_rank(n, (5, H), 10)
    y, dx = _run(gather_from_tp_region, xs[r], gs[r], group)
    assert_close(y, torch.cat(list(xs), dim=-1))
    assert_close(dx, gs[r].chunk(n, dim=-1)[r])


def check_scatter_to_sequence_parallel_region(group, r, n):
    x, gs = _per_rank(1, (S, B, H), 11)[0], _per_rank(n, (S // n, B, H), 12)
    y, dx = _run(scatter_to_sequence_parallel_region, x, gs[r], group)
    assert_close(y, x.chunk(n, dim=0)[r])
    assert_close(dx, torch.cat(list(gs), dim=0))


def check_gather_from_sequence_parallel_region(group, r, n):
    xs, gs = _per_rank(n, (S // n, B, H), 13), _per_rank(n, (S, B, H), 14)
    y, dx = _run(gather_from_sequence_parallel_region, xs[r], gs[r], group)  # default: TP output grad
    assert_close(y, torch.cat(list(xs), dim=0))
    assert_close(dx, gs.sum(0).chunk(n, dim=0)[r])  # reduce-scatter backward


def check_gather_from_sequence_parallel_region_replicated_grad(group, r, n):
    xs, gs = _per_rank(n, (S // n, B, H), 15), _per_rank(n, (S, B, H), 16)
    y, dx = _run(gather_from_sequence_parallel_region, xs[r], gs[r], group, False)
    assert_close(y, torch.cat(list(xs), dim=0))
    assert_close(dx, gs[r].chunk(n, dim=0)[r])  # split backward


def check_reduce_scatter_to_sequence_parallel_region(group, r, n):
    xs, gs = _per_rank(n, (S, B, H), 17), _per_rank(n, (S // n, B, H), 18)
    y, dx = _run(reduce_scatter_to_sequence_parallel_region, xs[r], gs[r], group)
    assert_close(y, xs.sum(0).chunk(n, dim=0)[r])
    assert_close(dx, torch.cat(list(gs), dim=0))


def check_inputs_and_grads_not_modified(group, r, n):
    """The collectives allocate fresh outputs: the caller's tensors (and shared grads) stay intact."""
    x = _per_rank(n, (S, B, H), 19)[r]
    before = x.clone()
    reduce_from_tp_region(x, group)
    reduce_scatter_to_sequence_parallel_region(x, group)
    leaf = x.clone().requires_grad_(True)
    a = copy_to_tp_region(leaf * 1.0, group)
    b = leaf * 1.0
    (a + b).sum().backward()  # the same ones-gradient object flows into both branches
    assert torch.equal(x, before)
    assert_close(leaf.grad, torch.full_like(x, n + 1.0))


def check_indivisible_split_names_sizes(group, r, n):
    x = torch.randn(S, B, n * 2 + 1)
    try:
        scatter_to_tp_region(x, group)
    except ValueError as err:
        assert str(n * 2 + 1) in str(err) and str(n) in str(err), err
    else:
        raise AssertionError("scatter of an indivisible last dim did not raise")


def check_communication_volume(group, r, n):
    """f costs nothing forward and one all-reduce backward; g the reverse (bytes from comm.count_bytes)."""
    x = torch.randn(S, B, H, requires_grad=True)
    nbytes = S * B * H * 4
    with comm.count_bytes() as fwd:
        y = reduce_from_tp_region(copy_to_tp_region(x, group) * 2.0, group)
    with comm.count_bytes() as bwd:
        y.sum().backward()
    expected = {"all_reduce": int(2 * (n - 1) / n * nbytes)}
    assert dict(fwd) == expected, dict(fwd)
    assert dict(bwd) == expected, dict(bwd)


def check_size_one_group_is_free_identity(group, r, n):
    """Every mapping on a size-1 group returns its input object, with no autograd node and no communication."""
    singles = [dist.new_group([i]) for i in range(n)]  # new_group is collective: every rank creates all
    single = singles[r]
    x = torch.randn(S, B, H, requires_grad=True)
    ops = [copy_to_tp_region, reduce_from_tp_region, scatter_to_tp_region, gather_from_tp_region,
           scatter_to_sequence_parallel_region, gather_from_sequence_parallel_region,
           reduce_scatter_to_sequence_parallel_region]
    with comm.count_bytes() as counter:
        for op in ops:
            assert op(x, single) is x, op.__name__
    assert not counter, dict(counter)


CHECKS = {name[len("check_"):]: fn for name, fn in dict(globals()).items() if name.startswith("check_")}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"tp{n}")
def rank_results(request):
    return run_distributed(run_checks, request.param, CHECKS, timeout_s=120)


@pytest.mark.parametrize("name", list(CHECKS))
def test_mapping(rank_results, name):
    assert_check_passed(rank_results, name)


def test_single_process_without_distributed_is_identity():
    """group=None before torch.distributed is initialised means TP=1: usable in plain single-process code."""
    assert not dist.is_initialized()
    x = torch.randn(2, 3)
    assert copy_to_tp_region(x, None) is x
    assert reduce_scatter_to_sequence_parallel_region(x, None) is x
