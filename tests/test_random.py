"""RNG tracker, model_parallel_seed and RNG-replaying activation checkpointing.

Seeds are plain integers, so most checks run in this process by calling model_parallel_seed with different
tp/pp ranks; one gloo run on a TP=2 x PP=2 layout checks the same on real ranks.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.testing import assert_close

from distributed import run_distributed
from megagpt.parallel import comm
from megagpt.parallel.random import MODEL_PARALLEL_RNG, RNGStatesTracker, checkpoint, model_parallel_seed
from megagpt.parallel.state import ParallelState

CPU = torch.device("cpu")


def dropout_mask(n: int = 256) -> torch.Tensor:
    return F.dropout(torch.ones(n), p=0.5, training=True) != 0


@pytest.fixture(autouse=True)
def _restore_global_rng():
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


def test_model_parallel_seed_values():
    """Default generator: seed + 100*pp; model-parallel stream: seed + 2718 + tp + 100*pp."""
    tracker = model_parallel_seed(1234, tp_rank=3, pp_rank=2, device="cpu")
    default_draw = torch.rand(8)
    with tracker.fork():
        stream_draw = torch.rand(8)
    assert torch.equal(default_draw, torch.rand(8, generator=torch.Generator().manual_seed(1234 + 200)))
    assert torch.equal(stream_draw, torch.rand(8, generator=torch.Generator().manual_seed(1234 + 2718 + 3 + 200)))


def test_masks_differ_across_tp_inside_fork_and_agree_outside():
    masks = {}
    for pp in (0, 1):
        for tp in (0, 1):
            tracker = model_parallel_seed(7, tp_rank=tp, pp_rank=pp, device=CPU)
            outside = dropout_mask()
            with tracker.fork():
                inside = dropout_mask()
            masks[tp, pp] = outside, inside
    assert torch.equal(masks[0, 0][0], masks[1, 0][0]) and torch.equal(masks[0, 1][0], masks[1, 1][0])
    assert not torch.equal(masks[0, 0][0], masks[0, 1][0])  # stages differ
    insides = [m[1] for m in masks.values()]
    assert all(not torch.equal(a, b) for i, a in enumerate(insides) for b in insides[i + 1:])


def test_fork_leaves_default_stream_untouched_and_advances_its_own():
    tracker = RNGStatesTracker("cpu")
    tracker.add("a", 11)
    torch.manual_seed(5)
    first = torch.rand(4)
    with tracker.fork("a"):
        in_1 = torch.rand(4)
    with tracker.fork("a"):
        in_2 = torch.rand(4)
    second = torch.rand(4)
    torch.manual_seed(5)
    assert torch.equal(torch.cat([first, second]), torch.rand(8))  # as if the forks never happened
    assert torch.equal(torch.cat([in_1, in_2]), torch.rand(8, generator=torch.Generator().manual_seed(11)))


def test_fork_restores_default_state_on_exception():
    tracker = RNGStatesTracker("cpu")
    tracker.add("a", 3)
    before = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="boom"):
        with tracker.fork("a"):
            torch.rand(3)
            raise RuntimeError("boom")
    assert torch.equal(torch.get_rng_state(), before)


def test_get_set_states_round_trip():
    tracker = model_parallel_seed(99, tp_rank=1, pp_rank=0, device="cpu")
    saved = tracker.get_states()
    with tracker.fork():
        a = torch.rand(16)
    tracker.set_states(saved)
    with tracker.fork():
        b = torch.rand(16)
    assert torch.equal(a, b)  # setting saved states replays the stream exactly
    tracker.get_states()[MODEL_PARALLEL_RNG].zero_()  # get_states hands out copies...
    with tracker.fork():
        c = torch.rand(16)
    assert not torch.equal(c, a)  # ...so the stream simply went on
    tracker.set_states(saved)  # ...and set_states copied too: `saved` was not advanced by the forks above
    with tracker.fork():
        assert torch.equal(torch.rand(16), a)


def test_tracker_errors_and_reset():
    tracker = RNGStatesTracker("cpu")
    tracker.add("a", 1)
    with pytest.raises(ValueError, match="'a' already exists"):
        tracker.add("a", 2)
    with pytest.raises(ValueError, match="seed 1"):
        tracker.add("b", 1)
    with pytest.raises(KeyError, match="never added"):
        with tracker.fork("missing"):
            pass
    tracker.reset()
    assert tracker.get_states() == {}
    tracker.add("a", 1)  # name and seed are free again


def test_cpu_paths_never_touch_torch_cuda(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.cuda called on a CPU path")
    for name in ("get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all", "is_available"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    tracker = model_parallel_seed(1, tp_rank=0, pp_rank=0, device="cpu")
    x = torch.randn(4, 4, requires_grad=True)
    y = checkpoint(lambda t: F.dropout(t, 0.5), tracker, x)
    with tracker.fork():
        y.sum().backward()
    assert x.grad is not None


class _Block(torch.nn.Module):
    """Dropout on a replicated region (default generator) and on a TP-split one (tracker stream)."""

    def __init__(self, tracker: RNGStatesTracker) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.fc1 = torch.nn.Parameter(torch.randn(32, 16, generator=gen))
        self.fc2 = torch.nn.Parameter(torch.randn(16, 32, generator=gen))
        self.tracker = tracker

    def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        h = F.gelu(F.linear(x, self.fc1))  # [s, b, 32]
        with self.tracker.fork():
            h = F.dropout(h, p=0.3)
        y = F.linear(h, self.fc2) * scale  # [s, b, 16]
        return F.dropout(y, p=0.3)


def _train_step(use_checkpoint: bool):
    tracker = model_parallel_seed(42, tp_rank=1, pp_rank=0, device="cpu")
    block = _Block(tracker)
    x = torch.randn(5, 2, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = checkpoint(block, tracker, x, 2.0) if use_checkpoint else block(x, 2.0)
    # random work between forward and backward moves both streams: the recompute must not see it
    torch.rand(7)
    with tracker.fork():
        torch.rand(7)
    y.backward(torch.ones_like(y))
    return (y.detach(), x.grad, block.fc1.grad, block.fc2.grad, torch.get_rng_state(),
            tracker.get_states()[MODEL_PARALLEL_RNG], saved)


def test_checkpoint_recompute_replays_dropout():
    plain, ckpt = _train_step(False), _train_step(True)
    for a, b in zip(plain[:4], ckpt[:4]):
        assert_close(a, b, rtol=0, atol=0)  # same masks, same math: bit-identical
    assert torch.equal(plain[4], ckpt[4]) and torch.equal(plain[5], ckpt[5])  # streams end where they would
    assert len(ckpt[6]) == 1 and len(plain[6]) > 4  # only the input is kept by the checkpointed forward
    assert (plain[0] == 0).any()  # dropout was really on


def test_checkpoint_tuple_outputs_and_no_grad():
    tracker = model_parallel_seed(3, tp_rank=0, pp_rank=0, device="cpu")
    w = torch.randn(4, 4, requires_grad=True)

    def fn(a, b):
        with tracker.fork():
            a = F.dropout(a @ w, 0.5)
        return a, b * 3.0

    a = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(3, 4, requires_grad=True)
    torch.manual_seed(0)
    out1, out2 = checkpoint(fn, tracker, a, b)
    (out1.sum() + out2.sum()).backward()
    grads = a.grad.clone(), b.grad.clone(), w.grad.clone()
    a.grad = b.grad = w.grad = None
    tracker2 = model_parallel_seed(3, tp_rank=0, pp_rank=0, device="cpu")
    tracker.set_states(tracker2.get_states())
    ref1, ref2 = fn(a, b)
    (ref1.sum() + ref2.sum()).backward()
    for got, ref in zip(grads, (a.grad, b.grad, w.grad)):
        assert_close(got, ref)
    with torch.no_grad():
        assert checkpoint(fn, tracker, a, b)[1].grad_fn is None
    with pytest.raises(ValueError, match="requires grad"):
        checkpoint(fn, tracker, a.detach(), b.detach())


def _rank_masks():
    state = ParallelState(tp=2, pp=2)
    tracker = model_parallel_seed(2024, state.tp_rank, state.pp_rank, device="cpu")
    outside = dropout_mask().float()
    with tracker.fork():
        inside = dropout_mask().float()
    both = torch.stack([outside, inside])  # [2, 256]
    gathered = torch.empty(4 * 2, 256)
    comm.all_gather_into(gathered, both, dist.group.WORLD)
    masks = gathered.view(4, 2, 256)
    # does rank j's mask equal rank 0's? [outside fork, inside fork]
    return [[torch.equal(masks[0, k], masks[j, k]) for j in range(4)] for k in (0, 1)]


def test_masks_on_real_ranks_tp2_pp2():
    """Ranks 0,1 = stage 0 and 2,3 = stage 1: outside fork equal within a stage only; inside fork all differ."""
    results = run_distributed(_rank_masks, 4, timeout_s=120)
    assert all(res == results[0] for res in results)  # every rank gathered the same masks
    outside, inside = results[0]
    assert outside == [True, True, False, False]
    assert inside == [True, False, False, False]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tracker_swaps_cuda_generator_only():
    tracker = model_parallel_seed(5, tp_rank=1, pp_rank=0, device="cuda")
    cpu_before = torch.get_rng_state()
    with tracker.fork():
        inside = torch.rand(8, device="cuda")
    ref = torch.rand(8, device="cuda", generator=torch.Generator("cuda").manual_seed(5 + 2718 + 1))
    assert torch.equal(inside, ref)
    assert torch.equal(torch.get_rng_state(), cpu_before)
    outside = torch.rand(8, device="cuda")
    assert torch.equal(outside, torch.rand(8, device="cuda", generator=torch.Generator("cuda").manual_seed(5)))


def test_checkpoint_rng_from_the_other_device_kind_reseeds_the_streams(monkeypatch):
    """A CPU-written checkpoint resumed on a GPU (and the reverse): the generators' state formats differ, so the
    device streams keep their fresh seeds with a notice instead of crashing in torch.cuda.set_rng_state; the host
    generators are restored either way. The "GPU" run is a tracker that reports a CUDA device (torch.cuda unused)."""
    from megagpt.checkpoint.sharded import get_rng_state, set_rng_state

    def forbidden(*args, **kwargs):
        raise AssertionError("a CPU-format state reached torch.cuda")
    monkeypatch.setattr(torch.cuda, "set_rng_state", forbidden)
    cpu_state = get_rng_state(model_parallel_seed(1, tp_rank=0, pp_rank=0, device="cpu"))
    expected_host = torch.rand(3)
    gpu_tracker = RNGStatesTracker("cpu")
    gpu_tracker.add("model-parallel-rng", 99)
    fresh = gpu_tracker.get_states()
    gpu_tracker.device = torch.device("cuda")
    notice = set_rng_state(cpu_state, gpu_tracker)
    assert notice is not None and "saved on cpu, this run is on cuda" in notice
    assert all(torch.equal(fresh[k], v) for k, v in gpu_tracker.get_states().items())
    assert torch.equal(torch.rand(3), expected_host)            # host generator restored from the checkpoint
    gpu_state = {**cpu_state, "device_type": "cuda", "device": torch.zeros(16, dtype=torch.uint8)}
    cpu_tracker = model_parallel_seed(2, tp_rank=0, pp_rank=0, device="cpu")
    assert "saved on cuda, this run is on cpu" in set_rng_state(gpu_state, cpu_tracker)
    assert set_rng_state(get_rng_state(cpu_tracker), cpu_tracker) is None    # same kind: restored, no notice
