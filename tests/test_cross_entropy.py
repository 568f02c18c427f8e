"""vocab_parallel_cross_entropy against F.cross_entropy on the full (gathered) logits, forward and backward.

Every rank builds the full [s, b, V] logits from one seed, feeds its vocabulary slice to the parallel loss and
compares the per-token loss and its logits-gradient slice with a dense reference. One gloo launch per world size.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.testing import assert_close

from distributed import assert_check_passed, run_checks, run_distributed
from megagpt.parallel import comm
from megagpt.parallel.cross_entropy import vocab_parallel_cross_entropy

S, B, V = 6, 3, 32  # V divisible by 2 and 4


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dense_reference(logits: torch.Tensor, target: torch.Tensor, grad: torch.Tensor, label_smoothing: float = 0.0,
                    dtype: torch.dtype = torch.float32):
    """Per-token loss [s, b] and d(loss . grad)/d(logits) [s, b, V] from F.cross_entropy in `dtype`."""
    full = logits.detach().to(dtype).requires_grad_(True)
    loss = F.cross_entropy(full.view(-1, V), target.view(-1), reduction="none",
                           label_smoothing=label_smoothing).view(S, B)
    loss.backward(grad.to(dtype))
    return loss.detach(), full.grad


def parallel(logits: torch.Tensor, target: torch.Tensor, grad: torch.Tensor, group, r: int, n: int,
             label_smoothing: float = 0.0):
    shard = logits.chunk(n, dim=-1)[r].clone().requires_grad_(True)  # [s, b, V/tp]
    loss = vocab_parallel_cross_entropy(shard, target, group, label_smoothing=label_smoothing)
    loss.backward(grad)
    return loss.detach(), shard.grad


def check_matches_dense(group, r, n, label_smoothing):
    logits = 3.0 * torch.randn(S, B, V, generator=_gen(1))
    target = torch.randint(0, V, (S, B), generator=_gen(2))
    target[0, :] = torch.tensor([0, V - 1, (V // n) % V])[:B]  # first/last id, first id of shard 1
    grad = torch.rand(S, B, generator=_gen(3))
    loss_ref, grad_ref = dense_reference(logits, target, grad, label_smoothing)
    loss, dlogits = parallel(logits, target, grad, group, r, n, label_smoothing)
    assert loss.dtype == torch.float32 and loss.shape == (S, B)
    assert_close(loss, loss_ref)
    assert_close(dlogits, grad_ref.chunk(n, dim=-1)[r])


def check_large_logits_are_stable(group, r, n):
    """Logits of order 1e4 (exp overflows fp32 without the max shift); the max sits on a different rank per row."""
    logits = 1e4 + 50.0 * torch.randn(S, B, V, generator=_gen(4))
    for s in range(S):
        logits[s, :, (s * V // S) % V] += 2e4
    target = torch.randint(0, V, (S, B), generator=_gen(5))
    grad = torch.ones(S, B)
    loss_ref, grad_ref = dense_reference(logits, target, grad, dtype=torch.float64)
    loss, dlogits = parallel(logits, target, grad, group, r, n)
    assert torch.isfinite(loss).all() and torch.isfinite(dlogits).all()
    assert_close(loss, loss_ref.float())
    assert_close(dlogits, grad_ref.float().chunk(n, dim=-1)[r])


def check_masked_vocab_padding(group, r, n):
    """Padded vocabulary ids masked to -inf (as the GPT head does), covering a whole shard: finite loss and grads."""
    real = V - V // n - 2  # the last shard is all padding, the one before partly
    logits = torch.randn(S, B, V, generator=_gen(12))
    logits[..., real:] = float("-inf")
    target = torch.randint(0, real, (S, B), generator=_gen(13))
    grad = torch.rand(S, B, generator=_gen(14))
    loss_ref, grad_ref = dense_reference(logits, target, grad)
    loss, dlogits = parallel(logits, target, grad, group, r, n)
    assert torch.isfinite(loss).all() and torch.isfinite(dlogits).all()
    assert_close(loss, loss_ref)
    assert_close(dlogits, grad_ref.chunk(n, dim=-1)[r])


def check_bf16_logits_computed_in_fp32(group, r, n):
    logits = (4.0 * torch.randn(S, B, V, generator=_gen(6))).bfloat16()
    target = torch.randint(0, V, (S, B), generator=_gen(7))
    grad = torch.rand(S, B, generator=_gen(8))
    loss_ref, grad_ref = dense_reference(logits.float(), target, grad)  # exact fp32 math on the bf16 values
    shard = logits.chunk(n, dim=-1)[r].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(shard, target, group)
    loss.backward(grad)
    assert loss.dtype == torch.float32 and shard.grad.dtype == torch.bfloat16
    assert_close(loss, loss_ref)
    assert_close(shard.grad, grad_ref.chunk(n, dim=-1)[r].bfloat16())


def check_input_logits_untouched_and_reusable(group, r, n):
    """The caller's logits keep their values and can feed other ops in the same graph."""
    logits = torch.randn(S, B, V, generator=_gen(9))
    target = torch.randint(0, V, (S, B), generator=_gen(10))
    shard = logits.chunk(n, dim=-1)[r].clone().requires_grad_(True)
    before = shard.detach().clone()
    scaled = shard * 1.0
    loss = vocab_parallel_cross_entropy(scaled, target, group)
    assert torch.equal(scaled.detach(), before)
    (loss.sum() + scaled.square().sum()).backward()  # scaled is saved by square: an in-place change would raise
    _, grad_ref = dense_reference(logits, target, torch.ones(S, B))
    assert_close(shard.grad, grad_ref.chunk(n, dim=-1)[r] + 2.0 * before)


def check_communication_is_per_token_scalars(group, r, n):
    """Logits are never gathered: forward all-reduces 2 fp32 scalars per token and one MAX; backward nothing."""
    shard = torch.randn(S, B, V // n, requires_grad=True)
    target = torch.randint(0, V, (S, B), generator=_gen(11))
    with comm.count_bytes() as fwd:
        loss = vocab_parallel_cross_entropy(shard, target, group)
    with comm.count_bytes() as bwd:
        loss.sum().backward()
    ring = 2 * (n - 1) / n
    assert dict(fwd) == {"all_reduce": int(ring * 2 * S * B * 4), "all_reduce_max": int(ring * S * B * 4)}, dict(fwd)
    assert not bwd, dict(bwd)


def check_second_backward_is_refused(group, r, n):
    shard = torch.randn(S, B, V // n, requires_grad=True)
    loss = vocab_parallel_cross_entropy(shard, torch.zeros(S, B, dtype=torch.long), group).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


CHECKS = {
    "matches_dense": functools.partial(check_matches_dense, label_smoothing=0.0),
    "matches_dense_label_smoothing": functools.partial(check_matches_dense, label_smoothing=0.1),
    "large_logits_are_stable": check_large_logits_are_stable,
    "masked_vocab_padding": check_masked_vocab_padding,
    "bf16_logits_computed_in_fp32": check_bf16_logits_computed_in_fp32,
    "input_logits_untouched_and_reusable": check_input_logits_untouched_and_reusable,
    "communication_is_per_token_scalars": check_communication_is_per_token_scalars,
    "second_backward_is_refused": check_second_backward_is_refused,
}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"tp{n}")
def rank_results(request):
    return run_distributed(run_checks, request.param, CHECKS, timeout_s=120)


@pytest.mark.parametrize("name", list(CHECKS))
def test_cross_entropy(rank_results, name):
    assert_check_passed(rank_results, name)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_single_process_matches_dense(label_smoothing):
    """group=None without torch.distributed is TP=1."""
    check_matches_dense(None, 0, 1, label_smoothing)


def test_rejects_bad_arguments():
    logits = torch.randn(S, B, V)
    with pytest.raises(ValueError, match="label_smoothing"):
        vocab_parallel_cross_entropy(logits, torch.zeros(S, B, dtype=torch.long), None, label_smoothing=1.0)
    with pytest.raises(ValueError, match="leading dims"):
        vocab_parallel_cross_entropy(logits, torch.zeros(B, S, dtype=torch.long), None)
