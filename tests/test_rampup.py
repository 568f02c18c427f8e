"""--rampup-batch-size on gloo: DP2 reproduces one rank over a ramp (Megatron's sampler keeps the sample order),
the log line shows the running global batch size, and a resume in the middle of the ramp is exact."""
from __future__ import annotations

import contextlib
import io

import torch

from distributed import run_distributed
from megagpt.training import config_for_test, setup, train_loop

# micro 2: DP1 takes 2..6 micro-batches per step, DP2 1..3. Ramp 4 -> 8 -> 12 over 32 samples (16 per increment).
RAMP = [4, 4, 32]
EXPECTED_SIZES = [4, 4, 4, 4, 8, 8, 12, 12, 12, 12]    # consumed 0, 4, 8, 12 | 16, 24 | 32 (<= 32), 44, 56, 68


def _config(train_samples: int, **overrides):
    settings = dict(
        num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, max_position_embeddings=16,
        vocab_size=300, hidden_dropout=0.1, attention_dropout=0.1, micro_batch_size=2, global_batch_size=12,
        rampup_batch_size=RAMP, train_iters=None, train_samples=train_samples, lr_decay_samples=80,
        lr_warmup_samples=8, lr=1e-3, min_lr=1e-4, eval_interval=0, eval_iters=0, log_interval=1,
        mock_data=True, tokenizer_type="ByteTokenizer", seed=7)
    return config_for_test(**{**settings, **overrides})


def _run(config, log: bool = False):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        trainer, ps = setup(config, log=log)
        result = train_loop(config, trainer, ps, log=log)
    return result.losses, result.global_batch_sizes, trainer.start_iteration, out.getvalue()


def _straight_and_resumed(ckpt: str):
    straight = _run(_config(80), log=True)
    first = _run(_config(24, save=ckpt))                  # stops after 6 steps, 32 samples: inside the ramp
    resumed = _run(_config(80, load=ckpt))
    return straight, first, resumed


def test_dp2_follows_the_single_rank_ramp():
    (one, sizes, _, _), = run_distributed(_one, 1)
    two = run_distributed(_one, 2)
    assert sizes == EXPECTED_SIZES
    for losses, sizes2, _, _ in two:
        assert sizes2 == EXPECTED_SIZES
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(one), rtol=1e-5, atol=0)


def _one():
    config = _config(80, hidden_dropout=0.0, attention_dropout=0.0)
    return _run(config)


def test_resume_in_the_middle_of_the_ramp_is_exact(tmp_path):
    results = run_distributed(_straight_and_resumed, 2, str(tmp_path / "ckpt"))
    (straight, straight_sizes, _, log), (first, _, _, _), (resumed, resumed_sizes, start, _) = results[-1]
    assert straight_sizes == EXPECTED_SIZES and len(first) == 6 and start == 6
    assert resumed_sizes == EXPECTED_SIZES[6:]
    assert resumed == straight[6:]                         # dropout on: bit-exact only with every RNG restored
    assert "global batch size:     4 |" in log and "global batch size:    12 |" in log


def _step_schedule_run():
    config = _config(40, rampup_batch_size=None, global_batch_size=None,
                     step_batch_size_schedule="0:4 128:8 384:12")   # tokens: 128 / 16 = 8 samples, 384 -> 24
    return _run(config, log=True)


def test_step_batch_size_schedule_drives_the_steps():
    (losses, sizes, _, log), = run_distributed(_step_schedule_run, 1)
    assert sizes == [4, 4, 8, 8, 12, 12] and len(losses) == 6     # consumed 0 4 8 16 24 36 -> 48 >= 40
    assert "global batch size:     8 |" in log and "global batch size:    12 |" in log
