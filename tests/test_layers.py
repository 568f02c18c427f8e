"""Tensor-parallel layers against dense F.linear / F.embedding built from the SAME master tensor.

For every variant each rank compares its output, its input gradient and its parameter-gradient shard with the
matching slice of a dense single-process computation done in the same rank. One gloo launch per world size runs
every check; each check is reported as its own test.
"""
from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.testing import assert_close

from distributed import assert_check_passed, run_checks, run_distributed
from megagpt.parallel import comm
from megagpt.config import pad_vocab_size
from megagpt.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megagpt.parallel.param_tags import ParamTag, tags_of
from megagpt.parallel.state import ParallelState

S, B = 8, 2  # sequence divisible by 2 and 4
IN, OUT, VOCAB, H = 20, 24, 32, 12


def init_method(seed: int):
    """Deterministic in-place init with its own generator (what the model supplies per parameter)."""
    def fill(t: torch.Tensor) -> None:
        t.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed))
    return fill


def master(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    t = torch.empty(shape)
    init_method(seed)(t)
    return t


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def dense_linear(x, w, b, dy):
    """Dense reference: output and grads of x, w, b for upstream gradient dy."""
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True) if b is not None else None
    y = F.linear(x, w, b)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, (b.grad if b is not None else None)


def check_column(group, r, n, gather_output, skip_bias_add, sequence_parallel):
    x, bias_full, dy = randn(S, B, IN, seed=1), randn(OUT, seed=2), randn(S, B, OUT, seed=3)
    w_full = master((OUT, IN), 10)
    y_ref, dx_ref, dw_ref, db_ref = dense_linear(x, w_full, None if skip_bias_add else bias_full, dy)

    layer = ColumnParallelLinear(IN, OUT, group, init_method=init_method(10), gather_output=gather_output,
                                 skip_bias_add=skip_bias_add, sequence_parallel=sequence_parallel)
    assert torch.equal(layer.bias.detach(), torch.zeros(OUT // n))  # biases start at zero
    with torch.no_grad():
        layer.bias.copy_(bias_full.chunk(n)[r])  # non-zero so a missing bias add is caught
    x_in = (x.chunk(n, dim=0)[r] if sequence_parallel else x).clone().requires_grad_(True)
    out, bias = layer(x_in)
    out.backward(dy if gather_output else dy.chunk(n, dim=-1)[r])
    # every collective is done: assertions may now fail on some ranks only without desynchronising the rest
    assert (bias is layer.bias) if skip_bias_add else (bias is None)
    assert_close(out.detach(), y_ref if gather_output else y_ref.chunk(n, dim=-1)[r])
    assert_close(x_in.grad, dx_ref.chunk(n, dim=0)[r] if sequence_parallel else dx_ref)
    assert_close(layer.weight.grad, dw_ref.chunk(n, dim=0)[r])
    if not skip_bias_add:
        assert_close(layer.bias.grad, db_ref.chunk(n)[r])


def check_row(group, r, n, input_is_parallel, skip_bias_add, sequence_parallel):
    x, bias_full, dy = randn(S, B, OUT, seed=4), randn(IN, seed=5), randn(S, B, IN, seed=6)
    w_full = master((IN, OUT), 11)  # row layer maps OUT -> IN here
    y_ref, dx_ref, dw_ref, db_ref = dense_linear(x, w_full, None if skip_bias_add else bias_full, dy)

    layer = RowParallelLinear(OUT, IN, group, init_method=init_method(11), input_is_parallel=input_is_parallel,
                              skip_bias_add=skip_bias_add, sequence_parallel=sequence_parallel)
    assert torch.equal(layer.bias.detach(), torch.zeros(IN))
    with torch.no_grad():
        layer.bias.copy_(bias_full)
    x_in = (x.chunk(n, dim=-1)[r] if input_is_parallel else x).clone().requires_grad_(True)
    out, bias = layer(x_in)
    out.backward(dy.chunk(n, dim=0)[r] if sequence_parallel else dy)
    db = layer.bias.grad.clone() if not skip_bias_add else None
    if sequence_parallel and db is not None:  # each rank saw only its slice of s: finalisation all-reduces it
        comm.all_reduce(db, group)
    assert (bias is layer.bias) if skip_bias_add else (bias is None)
    assert_close(out.detach(), y_ref.chunk(n, dim=0)[r] if sequence_parallel else y_ref)
    assert_close(x_in.grad, dx_ref.chunk(n, dim=-1)[r] if input_is_parallel else dx_ref)
    assert_close(layer.weight.grad, dw_ref.chunk(n, dim=1)[r])
    if db is not None:
        assert_close(db, db_ref)


def check_embedding(group, r, n):
    ids = torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(7))
    ids[0, :4] = torch.tensor([0, VOCAB - 1, VOCAB // n, VOCAB // n - 1])  # shard boundaries
    dy = randn(B, S, H, seed=8)
    w_full = master((VOCAB, H), 12).requires_grad_(True)
    y_ref = F.embedding(ids, w_full)
    y_ref.backward(dy)

    layer = VocabParallelEmbedding(VOCAB, H, group, init_method=init_method(12))
    out = layer(ids)
    out.backward(dy)
    assert out.shape == (B, S, H)
    assert_close(out.detach(), y_ref.detach())
    assert_close(layer.weight.grad, w_full.grad.chunk(n, dim=0)[r])


def check_mlp_block_and_communication(group, r, n, sequence_parallel):
    """Column -> gelu -> Row equals the dense MLP; forward and backward each cost one all-reduce (or SP pair)."""
    x, dy = randn(S, B, IN, seed=9), randn(S, B, IN, seed=10)
    w1, w2 = master((OUT, IN), 13), master((IN, OUT), 14)
    xd, w1d, w2d = (t.clone().requires_grad_(True) for t in (x, w1, w2))
    y_ref = F.linear(F.gelu(F.linear(xd, w1d)), w2d)
    y_ref.backward(dy)

    fc1 = ColumnParallelLinear(IN, OUT, group, init_method=init_method(13), bias=False,
                               sequence_parallel=sequence_parallel)
    fc2 = RowParallelLinear(OUT, IN, group, init_method=init_method(14), bias=False,
                            sequence_parallel=sequence_parallel)
    x_in = (x.chunk(n, dim=0)[r] if sequence_parallel else x).clone().requires_grad_(True)
    with comm.count_bytes() as fwd:
        out = fc2(F.gelu(fc1(x_in)[0]))[0]
    with comm.count_bytes() as bwd:
        out.backward(dy.chunk(n, dim=0)[r] if sequence_parallel else dy)
    full = S * B * IN * 4
    if sequence_parallel:  # all-gather in + reduce-scatter out, mirrored in backward
        expected = {"all_gather": (n - 1) * full // n, "reduce_scatter": (n - 1) * full // n}
    else:
        expected = {"all_reduce": int(2 * (n - 1) / n * full)}
    assert dict(fwd) == expected, dict(fwd)
    assert dict(bwd) == expected, dict(bwd)
    assert_close(out, y_ref.chunk(n, dim=0)[r] if sequence_parallel else y_ref.detach())
    assert_close(x_in.grad, xd.grad.chunk(n, dim=0)[r] if sequence_parallel else xd.grad)
    assert_close(fc1.weight.grad, w1d.grad.chunk(n, dim=0)[r])
    assert_close(fc2.weight.grad, w2d.grad.chunk(n, dim=1)[r])


def _gather_shards(param: torch.Tensor, dim: int, state: ParallelState) -> torch.Tensor:
    moved = param.detach().transpose(0, dim).contiguous()
    out = torch.empty((moved.size(0) * state.tp_size,) + tuple(moved.shape[1:]))
    comm.all_gather_into(out, moved, state.tp_group)
    return out.transpose(0, dim)


def check_every_tp_size_builds_the_same_model(group, r, n):
    """TP=1, 2, ..., n: gathering each layer's shards gives exactly the master tensor, bit for bit."""
    gathered = []
    for tp in sorted({1, 2, n}):
        state = ParallelState(tp=tp)
        col = ColumnParallelLinear(IN, OUT, state.tp_group, init_method=init_method(20))
        row = RowParallelLinear(OUT, IN, state.tp_group, init_method=init_method(21))
        emb = VocabParallelEmbedding(VOCAB, H, state.tp_group, init_method=init_method(22))
        for param, dim, seed in ((col.weight, 0, 20), (row.weight, 1, 21), (emb.weight, 0, 22)):
            gathered.append((tp, param, dim, seed, _gather_shards(param, dim, state)))
    for tp, param, dim, seed, full in gathered:  # compare after all collectives
        assert tags_of(param) == ParamTag(tp_split_dim=dim)
        assert torch.equal(full, master(tuple(full.shape), seed)), f"tp={tp} dim={dim}"


def check_parameter_attributes_and_repr(group, r, n):
    col = ColumnParallelLinear(IN, OUT, group, init_method=init_method(1))
    row = RowParallelLinear(OUT, IN, group, init_method=init_method(2), sequence_parallel=True)
    row_plain = RowParallelLinear(OUT, IN, group, init_method=init_method(2))
    emb = VocabParallelEmbedding(VOCAB, H, group, init_method=init_method(3))
    assert col.weight.shape == (OUT // n, IN) and row.weight.shape == (IN, OUT // n)
    assert emb.weight.shape == (VOCAB // n, H)
    assert tags_of(col.bias) == ParamTag(tp_split_dim=0) and col.bias.shape == (OUT // n,)
    assert tags_of(row.bias) == ParamTag(sequence_parallel=True) and row.bias.shape == (IN,)
    assert tags_of(row_plain.bias) == ParamTag()
    assert f"in={IN}, out={OUT} (tp={n}: out/tp={OUT // n})" in repr(col)
    assert f"in={OUT}, out={IN} (tp={n}: in/tp={OUT // n})" in repr(row)
    assert f"num_embeddings={VOCAB}, embedding_dim={H} (tp={n}: vocab/tp={VOCAB // n}" in repr(emb)


def check_params_dtype(group, r, n):
    col = ColumnParallelLinear(IN, OUT, group, init_method=init_method(30), params_dtype=torch.bfloat16)
    assert col.weight.dtype == torch.bfloat16 and col.bias.dtype == torch.bfloat16
    assert torch.equal(col.weight.detach(), master((OUT, IN), 30).chunk(n)[r].bfloat16())


def check_tied_weight_passed_to_forward(group, r, n):
    """skip_weight_param_allocation: the LM head borrows the embedding shard [V/tp, h] as its weight."""
    emb = VocabParallelEmbedding(VOCAB, H, group, init_method=init_method(31))
    head = ColumnParallelLinear(H, VOCAB, group, init_method=init_method(99), bias=False,
                                skip_weight_param_allocation=True)
    assert list(head.parameters()) == []
    x = randn(S, B, H, seed=32)
    logits, _ = head(x, weight=emb.weight)  # [s, b, V/tp]
    assert_close(logits, F.linear(x, master((VOCAB, H), 31)).chunk(n, dim=-1)[r])


def check_indivisible_sizes_raise(group, r, n):
    cases = [(lambda: VocabParallelEmbedding(VOCAB + 1, H, group, init_method=init_method(1)), VOCAB + 1),
             (lambda: ColumnParallelLinear(IN, OUT + 1, group, init_method=init_method(1)), OUT + 1),
             (lambda: RowParallelLinear(OUT + 1, IN, group, init_method=init_method(1)), OUT + 1)]
    for build, bad in cases:
        with pytest.raises(ValueError) as info:
            build()
        assert str(bad) in str(info.value) and f"size {n}" in str(info.value), str(info.value)


CHECKS = {
    **{f"column[gather={int(g)},skip_bias={int(k)},sp={int(sp)}]": functools.partial(check_column, gather_output=g,
                                                                                   skip_bias_add=k,
                                                                                   sequence_parallel=sp)
       for g, k, sp in itertools.product([False, True], repeat=3)},
    **{f"row[input_parallel={int(p)},skip_bias={int(k)},sp={int(sp)}]": functools.partial(
        check_row, input_is_parallel=p, skip_bias_add=k, sequence_parallel=sp)
       for p, k, sp in itertools.product([False, True], repeat=3) if p or not sp},
    "embedding": check_embedding,
    "mlp_block[sp=0]": functools.partial(check_mlp_block_and_communication, sequence_parallel=False),
    "mlp_block[sp=1]": functools.partial(check_mlp_block_and_communication, sequence_parallel=True),
    "every_tp_size_builds_the_same_model": check_every_tp_size_builds_the_same_model,
    "parameter_attributes_and_repr": check_parameter_attributes_and_repr,
    "params_dtype": check_params_dtype,
    "tied_weight_passed_to_forward": check_tied_weight_passed_to_forward,
    "indivisible_sizes_raise": check_indivisible_sizes_raise,
}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"tp{n}")
def rank_results(request):
    return run_distributed(run_checks, request.param, CHECKS, timeout_s=180)


@pytest.mark.parametrize("name", list(CHECKS))
def test_layer(rank_results, name):
    assert_check_passed(rank_results, name)


def test_single_process_layers_are_dense():
    """group=None without torch.distributed is TP=1: plain dense layers with the master weights."""
    assert not dist.is_initialized()
    x = randn(S, B, IN, seed=40)
    col = ColumnParallelLinear(IN, OUT, None, init_method=init_method(41))
    row = RowParallelLinear(OUT, IN, None, init_method=init_method(42))
    emb = VocabParallelEmbedding(VOCAB, H, None, init_method=init_method(43))
    assert_close(col(x)[0], F.linear(x, master((OUT, IN), 41)))
    h = randn(S, B, OUT, seed=44)
    assert_close(row(h)[0], F.linear(h, master((IN, OUT), 42)))
    ids = torch.arange(VOCAB).view(2, -1)
    assert_close(emb(ids), F.embedding(ids, master((VOCAB, H), 43)))
    assert "(tp=1: out/tp=24)" in repr(col)


@pytest.mark.parametrize("vocab, tp, divisible_by, expected", [
    (50257, 1, 128, 50304), (50257, 2, 128, 50432), (50257, 8, 128, 51200), (256, 2, 128, 256),
    (1, 4, 128, 512), (100, 3, 1, 102),
])
def test_pad_vocab_size(vocab, tp, divisible_by, expected):
    padded = pad_vocab_size(vocab, tp, divisible_by)
    assert padded == expected and padded >= vocab and padded % (divisible_by * tp) == 0


def test_pad_vocab_size_rejects_nonpositive():
    with pytest.raises(ValueError, match="tp_size=0"):
        pad_vocab_size(100, 0)
