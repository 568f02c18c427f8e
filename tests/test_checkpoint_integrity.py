"""Damaged checkpoints (#12): digests recorded at save, verified by every rank at load, --ckpt-step, and the offline
`convert_checkpoint.py verify`.

One TP2 run with the distributed optimizer saves iterations 2 and 4; then one shard that only rank 1 reads is
truncated. Both ranks must refuse the load with the same message (naming the file, the iteration and the earlier
complete one), before any shard is unpickled, and `--ckpt-step 2` must resume from iteration 2 exactly.
"""
import importlib.util
import json
import os

import torch

from distributed import run_distributed
from megagpt.checkpoint.format import CheckpointError, iteration_dir
from megagpt.training import config_for_test, setup, train_loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("convert_checkpoint", os.path.join(ROOT, "tools", "convert_checkpoint.py"))
convert_checkpoint = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_checkpoint)
DAMAGED = os.path.join("mp_rank_01_000", "model_optim_rng.pt")


def _config(**overrides):
    return config_for_test(
        num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, max_position_embeddings=16,
        vocab_size=300, hidden_dropout=0.1, attention_dropout=0.1, tensor_model_parallel_size=2,
        use_distributed_optimizer=True, micro_batch_size=2, global_batch_size=4, train_iters=4, eval_interval=0,
        eval_iters=0, log_interval=4, lr=1e-3, mock_data=True, tokenizer_type="ByteTokenizer", seed=7, **overrides)


def _train(config):
    trainer, ps = setup(config, log=False)
    return trainer, train_loop(config, trainer, ps, log=False)


def _worker(ckpt: str) -> dict:
    _, straight = _train(_config(save=ckpt, save_interval=2))
    folder = iteration_dir(ckpt, 4)
    recorded = json.load(open(os.path.join(folder, "metadata.json")))["files"]
    on_disk = {os.path.relpath(os.path.join(root, n), folder): os.path.getsize(os.path.join(root, n))
               for root, _, names in os.walk(folder) for n in names if n != "metadata.json"}
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        path = os.path.join(folder, DAMAGED)
        os.truncate(path, os.path.getsize(path) // 2)
    torch.distributed.barrier()
    try:
        _train(_config(load=ckpt))
        message = None
    except CheckpointError as exc:
        message = str(exc)
    trainer, resumed = _train(_config(load=ckpt, ckpt_step=2))
    return {"recorded": {k: v["bytes"] for k, v in recorded.items()}, "on_disk": on_disk, "message": message,
            "straight": straight.losses, "resumed": resumed.losses, "start": trainer.start_iteration}


def _verify(capsys, *argv) -> tuple[int, str]:
    code = convert_checkpoint.main(["verify", *argv])
    return code, capsys.readouterr().out


def test_damaged_shard_is_named_by_every_rank_and_ckpt_step_resumes_earlier(tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    results = run_distributed(_worker, 2, ckpt)
    for r in results:
        assert r["recorded"] == r["on_disk"]   # every file of every rank, with its size
        assert "mp_rank_00_000/distrib_optim_dp000.pt" in r["recorded"] and "mp_rank_01_000/rng_dp000.pt" in r["recorded"]
        assert r["start"] == 2
        torch.testing.assert_close(torch.tensor(r["resumed"]), torch.tensor(r["straight"][2:]), rtol=0, atol=0)
    messages = {r["message"] for r in results}
    assert len(messages) == 1, messages          # rank 0 read intact files and says the same as rank 1
    (message,) = messages
    assert message is not None and "checkpoint of iteration 4" in message and DAMAGED in message, message
    assert "truncated" in message and "complete earlier iterations: 2" in message and "--ckpt-step" in message

    code, out = _verify(capsys, "--load", ckpt)
    assert code == 1 and "iteration 4: DAMAGED, 1 of" in out and DAMAGED in out, out
    code, out = _verify(capsys, "--load", ckpt, "--ckpt-step", "2")
    assert code == 0 and "iteration 2: intact" in out, out
    flipped = os.path.join(iteration_dir(ckpt, 2), "mp_rank_00_000", "model_optim_rng.pt")
    with open(flipped, "r+b") as f:          # same size, one byte changed: only the checksum can tell
        f.seek(os.path.getsize(flipped) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    code, out = _verify(capsys, "--load", ckpt, "--all")
    assert code == 1 and "iteration 2: DAMAGED" in out and "CRC-32" in out and "iteration 4: DAMAGED" in out, out
