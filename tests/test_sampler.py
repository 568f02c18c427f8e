"""PretrainingSampler: DP windows reproduce the DP=1 order, exact resume, validation; build_data_loader."""
import numpy as np
import pytest
import torch

from megagpt.data.gpt_dataset import MockGPTDataset
from megagpt.data.sampler import PretrainingSampler, build_data_loader


def batches(total, consumed, micro, rank, size, drop_last=True):
    return list(PretrainingSampler(total, consumed, micro, rank, size, drop_last))


@pytest.mark.parametrize("dp", [2, 4])
@pytest.mark.parametrize("micro", [1, 3])
def test_dp_windows_reproduce_dp1_order(dp, micro):
    total = 101
    per_rank = [batches(total, 0, micro, r, dp) for r in range(dp)]
    steps = len(per_rank[0])
    assert all(len(b) == steps for b in per_rank) and steps == total // (micro * dp)
    # One step = every rank's micro-batch, in rank order: together they are the next micro*dp samples.
    order = [i for step in range(steps) for r in range(dp) for i in per_rank[r][step]]
    dp1 = [i for b in batches(total, 0, micro * dp, 0, 1) for i in b]
    assert order == dp1 == list(range(steps * micro * dp))
    for r in range(dp):
        assert per_rank[r][0] == list(range(r * micro, (r + 1) * micro))
        assert all(len(b) == micro for b in per_rank[r])


@pytest.mark.parametrize("consumed", [0, 8, 24, 13])
def test_resume_continues_exactly(consumed):
    total, micro, dp = 64, 2, 4
    for r in range(dp):
        resumed = batches(total, consumed, micro, r, dp)
        # Reference: the samples after `consumed`, cut into windows of micro*dp, rank r's slice of each.
        remaining = list(range(consumed, total))
        windows = [remaining[k : k + micro * dp] for k in range(0, len(remaining) - micro * dp + 1, micro * dp)]
        assert resumed == [w[r * micro : (r + 1) * micro] for w in windows]
        if consumed % (micro * dp) == 0:  # resuming at a step boundary = the uninterrupted run's tail
            assert resumed == batches(total, 0, micro, r, dp)[consumed // (micro * dp) :]


def test_drop_last_false_tail_and_len():
    total, micro, dp = 21, 2, 4  # 2 full windows of 8, then a tail of 5
    per_rank = [batches(total, 0, micro, r, dp, drop_last=False) for r in range(dp)]
    assert [b[-1] for b in per_rank] == [[16, 17], [18, 19], [20], [14, 15]]
    assert [len(b) for b in per_rank] == [3, 3, 3, 2]
    for r in range(dp):
        assert len(PretrainingSampler(total, 0, micro, r, dp, drop_last=False)) == len(per_rank[r])
        assert len(PretrainingSampler(total, 0, micro, r, dp)) == 2 == len(batches(total, 0, micro, r, dp))
    assert sorted(i for b in per_rank for batch in b for i in batch) == list(range(total))


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 0, 1, 0, 1), "total_samples must be positive"),
        ((10, 10, 1, 0, 1), r"consumed_samples must be in \[0, total_samples=10\), got 10"),
        ((10, -1, 1, 0, 1), "consumed_samples"),
        ((10, 0, 0, 0, 1), "micro_batch_size must be positive, got 0"),
        ((10, 0, 1, 0, 0), "data_parallel_size must be positive"),
        ((10, 0, 1, 2, 2), r"data_parallel_rank must be in \[0, 2\), got 2"),
    ],
)
def test_sampler_validation(args, message):
    with pytest.raises(ValueError, match=message):
        PretrainingSampler(*args)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_data_loader_yields_long_batches(num_workers):
    dataset = MockGPTDataset(num_samples=40, seq_length=6, vocab_size=100, seed=0)
    loader = build_data_loader(dataset, consumed_samples=8, micro_batch_size=2, dp_rank=1, dp_size=2,
                               num_workers=num_workers)
    got = list(loader)
    assert len(got) == len(loader) == 8
    for step, batch in enumerate(got):
        text = batch["text"]
        assert text.dtype == torch.long and text.shape == (2, 7)
        first = 8 + step * 4 + 2  # window start + rank offset
        expected = np.stack([dataset[first]["text"], dataset[first + 1]["text"]])
        torch.testing.assert_close(text, torch.from_numpy(expected))


# ---- --dataloader-type cyclic --------------------------------------------------------------------------------
from megagpt.data.sampler import CyclicSampler  # noqa: E402


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_cyclic_covers_each_bucket_once_per_epoch_and_ranks_are_disjoint():
    total, micro, dp = 26, 2, 3                      # 24 usable samples: a bucket of 8 per rank, 4 batches each
    per_rank = [_take(CyclicSampler(total, 0, micro, r, dp), 8) for r in range(dp)]
    for r, batches in enumerate(per_rank):
        first, second = sum(batches[:4], []), sum(batches[4:], [])
        assert sorted(first) == sorted(second) == list(range(8 * r, 8 * r + 8))
        assert first != second                       # a new permutation every epoch
    assert not set(sum(per_rank[0], [])) & set(sum(per_rank[1], []))


def test_cyclic_resumes_mid_epoch_where_it_left_off():
    micro, dp = 2, 2
    straight = _take(CyclicSampler(20, 0, micro, 1, dp), 7)
    consumed = 3 * micro * dp                        # three steps of one micro-batch per rank done
    assert _take(CyclicSampler(20, consumed, micro, 1, dp), 4) == straight[3:]
