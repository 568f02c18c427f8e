"""Cluster run control (#10): --load of a missing or empty directory starts from scratch, --finetune and the
--no-load/--no-save options, --keep-last-n-checkpoints, --exit-interval, and --exit-signal-handler with SIGTERM
sent to one rank and to the torchrun launcher: every rank stops after the same iteration, saves, exits 0, and
--load resumes exactly (losses equal the uninterrupted run's, dropout on)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from distributed import run_distributed
from megagpt.checkpoint.format import CheckpointError, has_checkpoint, read_tracker
from megagpt.parallel.launch import free_port
from megagpt.training import config_for_test, setup, train_loop
from model_utils import PRETRAIN, tiny_cli


def _config(**overrides):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, max_position_embeddings=16,
                vocab_size=300, hidden_dropout=0.1, attention_dropout=0.1, micro_batch_size=2, global_batch_size=4,
                train_iters=6, lr_decay_iters=6, lr=1e-3, min_lr=1e-4, eval_interval=0, eval_iters=0,
                mock_data=True, tokenizer_type="ByteTokenizer", seed=3)
    return config_for_test(**{**base, **overrides})


def _train(**overrides):
    config = _config(**overrides)
    trainer, ps = setup(config, log=False)
    result = train_loop(config, trainer, ps, log=False)
    weights = {n: p.detach().clone() for n, p in trainer.chunks[0].named_parameters()}
    adam = trainer.engine.optimizer.optimizer.optimizer.state
    steps = sorted({int(s["step"]) for s in adam.values()}) if adam else []
    return dict(losses=result.losses, start=trainer.start_iteration, consumed=trainer.consumed_samples,
                validation=result.validation_losses,
                exit=result.exit_reason, weights=weights, adam_steps=steps)


def test_has_checkpoint_tells_scratch_from_broken(tmp_path):
    assert not has_checkpoint(str(tmp_path / "missing")) and not has_checkpoint(str(tmp_path))
    (tmp_path / "tensorboard").mkdir()                         # unrelated files: still a fresh start
    assert not has_checkpoint(str(tmp_path))
    (tmp_path / "iter_0000010").mkdir()
    with pytest.raises(CheckpointError, match=r"holds checkpoint folders \(iter_0000010\) but no "
                                              r"latest_checkpointed_iteration.txt"):
        has_checkpoint(str(tmp_path))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("10\n")
    assert has_checkpoint(str(tmp_path))


def _options_worker(ckpt: str) -> dict:
    out = {"straight": _train()}
    out["scratch"] = _train(load=ckpt + "-empty", save=ckpt + "-empty")      # --save X --load X from the first run
    out["first"] = _train(train_iters=3, save=ckpt, keep_last_n_checkpoints=1, save_interval=1)
    out["kept"] = sorted(os.listdir(ckpt))
    out["resumed"] = _train(load=ckpt)
    out["finetune"] = _train(load=ckpt, finetune=True, train_iters=1)
    out["no_optim"] = _train(load=ckpt, no_load_optim=True, train_iters=4)
    lean = ckpt + "-lean"
    _train(train_iters=3, save=lean, no_save_optim=True, no_save_rng=True)
    out["lean_files"] = sorted(os.listdir(os.path.join(lean, "iter_0000003", "mp_rank_00_000")))
    for name, extra in (("lean_refused_optim", {}), ("lean_refused_rng", {"no_load_optim": True})):
        try:
            _train(load=lean, **extra)
            out[name] = None
        except CheckpointError as exc:
            out[name] = str(exc)
    out["lean"] = _train(load=lean, no_load_optim=True, no_load_rng=True)
    evals = dict(eval_interval=2, eval_iters=1)
    out["valid_straight"] = _train(**evals)
    _train(train_iters=4, save=ckpt + "-valid", **evals)
    out["valid_resumed"] = _train(load=ckpt + "-valid", **evals)
    _train(train_iters=3, save=ckpt + "-np", save_interval=100, non_persistent_save_interval=1)
    out["np_files"] = sorted(os.listdir(os.path.join(ckpt + "-np", "non_persistent")))
    out["interval"] = _train(save=ckpt + "-interval", exit_interval=2)
    out["after_interval"] = _train(load=ckpt + "-interval")
    return out


def test_load_save_and_exit_options(tmp_path):
    (r,) = run_distributed(_options_worker, 1, str(tmp_path / "ckpt"))
    straight = r["straight"]["losses"]
    assert r["scratch"]["losses"] == straight and r["scratch"]["start"] == 0
    assert r["kept"] == ["iter_0000003", "latest_checkpointed_iteration.txt"]    # 1 and 2 pruned after 3 completed
    assert r["resumed"]["start"] == 3 and r["resumed"]["losses"] == straight[3:]
    ft = r["finetune"]
    assert (ft["start"], len(ft["losses"]), ft["adam_steps"]) == (0, 1, [1])       # fresh optimizer, from iteration 0
    assert ft["consumed"] == 4
    no_optim = r["no_optim"]
    assert no_optim["start"] == 3 and no_optim["adam_steps"] == [1] and no_optim["losses"][0] == straight[3]
    assert r["lean_files"] == ["model_optim_rng.pt"]
    assert "no optimizer state (saved with --no-save-optim): pass --no-load-optim" in r["lean_refused_optim"]
    assert "no RNG states (saved with --no-save-rng): pass --no-load-rng" in r["lean_refused_rng"]
    assert r["lean"]["start"] == 3
    assert r["interval"]["exit"] == "exit interval 2 reached" and r["interval"]["losses"] == straight[:2]
    assert r["after_interval"]["start"] == 2 and r["after_interval"]["losses"] == straight[2:]
    assert r["np_files"] == ["iter_0000003", "latest_checkpointed_iteration.txt"]   # only the newest kept
    # validation continues where it was: the resumed run's evaluation at 6 reads the batches the straight one did
    assert len(r["valid_straight"]["validation"]) == 3
    assert r["valid_resumed"]["validation"] == r["valid_straight"]["validation"][2:]


def test_resume_takes_the_newer_of_load_and_non_persistent(tmp_path, capsys):
    from megagpt.training import resume_directory

    load, scratch = tmp_path / "ckpt", tmp_path / "ckpt" / "non_persistent"
    scratch.mkdir(parents=True)
    (load / "latest_checkpointed_iteration.txt").write_text("2\n")
    (scratch / "latest_checkpointed_iteration.txt").write_text("5\n")
    config = _config(load=str(load), save=str(load), non_persistent_save_interval=1)
    assert resume_directory(config, verbose=True) == str(scratch)
    assert "newer non-persistent checkpoint" in capsys.readouterr().out
    (scratch / "latest_checkpointed_iteration.txt").write_text("1\n")
    assert resume_directory(config, verbose=False) == str(load)
    assert resume_directory(_config(load=str(tmp_path / "none")), verbose=False) is None


# ---- SIGTERM: a rank, and the launcher ------------------------------------------------------------------------
LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.* lm loss: (\S+) \|")


def _cli(ckpt: str, iters: int, *extra: str) -> list[str]:
    args = tiny_cli(global_batch_size=4, train_iters=iters)
    args = [a for a in args if a != sys.executable]
    i = args.index("--hidden-dropout")
    args[i + 1] = "0.1"                                   # dropout on: a resume is exact only if RNG is restored
    return args + ["--save", ckpt, "--load", ckpt, "--save-interval", "1000", "--lr-decay-iters", "200", *extra]


def _losses(text: str) -> dict[int, str]:
    return {int(i): loss for i, loss in LOSS.findall(text)}


def _rank_env(rank: int, world: int, port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    return dict(env, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port))


def _wait_for_iteration(proc: subprocess.Popen, lines: list[str], iteration: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = LOSS.search(line)
        if found and int(found.group(1)) >= iteration:
            return
    raise AssertionError("training did not reach iteration %d:\n%s" % (iteration, "".join(lines)[-2000:]))


def _straight(tmp_path, iters: int) -> dict[int, str]:
    port = free_port()
    procs = [subprocess.Popen([sys.executable] + _cli(str(tmp_path / "straight"), iters), env=_rank_env(r, 2, port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[-1][-2000:]
    return _losses(outs[-1])


@pytest.mark.slow
def test_sigterm_to_one_rank_saves_exits_zero_and_resumes_exactly(tmp_path):
    ckpt, iters = str(tmp_path / "ckpt"), 200
    port = free_port()
    procs = [subprocess.Popen([sys.executable] + _cli(ckpt, iters, "--exit-signal-handler"),
                              env=_rank_env(r, 2, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    lines: list[str] = []
    _wait_for_iteration(procs[1], lines, 3)               # rank 1 (the last) prints the log lines
    procs[0].send_signal(signal.SIGTERM)                  # one rank only: the others learn it from the agreement
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:]
    stopped = read_tracker(ckpt)
    assert 3 <= stopped < iters and f"exiting after iteration {stopped}: received SIGTERM" in outs[0]
    port = free_port()
    resumed = [subprocess.Popen([sys.executable] + _cli(ckpt, stopped + 3), env=_rank_env(r, 2, port),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in resumed]
    assert all(p.returncode == 0 for p in resumed), outs[-1][-2000:]
    after = _losses(outs[-1])
    straight = _straight(tmp_path, stopped + 3)
    assert sorted(after) == [stopped + 1, stopped + 2, stopped + 3]
    assert all(after[i] == straight[i] for i in after), (after, straight)


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_on_every_rank(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", str(free_port())] + _cli(ckpt, 200, "--exit-signal-handler"),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    _wait_for_iteration(proc, lines, 3)
    proc.send_signal(signal.SIGTERM)                      # torchrun forwards it to every rank
    out = proc.communicate(timeout=120)[0]
    stopped = read_tracker(ckpt)
    assert 3 <= stopped < 200 and f"exiting after iteration {stopped}: received SIGTERM" in "".join(lines) + out
    assert os.path.isfile(os.path.join(ckpt, f"iter_{stopped:07d}", "mp_rank_00_000", "model_optim_rng.pt"))
