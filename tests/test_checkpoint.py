"""Sharded checkpoints: exact resume (dropout on), crash safety of a save, layout checks, metadata.

Exact resume: training 6 steps straight must equal training 3 steps, saving, and resuming in a NEW setup for
steps 4-6: same per-step losses (bit for bit) and same final weights. Dropout is on (0.1), so the losses differ
unless every RNG stream (default generator and the TP tracker's) is restored; a control run that skips the RNG
restore must differ, which shows the comparison can fail.
"""
import glob
import json
import os

import pytest
import torch

import megagpt.training as training
from distributed import run_distributed
from megagpt.fileio import atomic_write
from megagpt.checkpoint import sharded
from megagpt.checkpoint.format import CheckpointError, read_tracker
from megagpt.training import config_for_test, setup, train_loop

TOTAL, FIRST = 6, 3


def _config(tp=1, pp=1, vl=None, zero=False, precision="fp32", **overrides):
    base = dict(
        num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=16, max_position_embeddings=16,
        vocab_size=300, hidden_dropout=0.1, attention_dropout=0.1,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, num_layers_per_virtual_pipeline_stage=vl,
        use_distributed_optimizer=zero, zero_stage=1, ddp_bucket_size=5_000,
        micro_batch_size=2, global_batch_size=8, train_iters=TOTAL, lr_decay_iters=TOTAL, eval_interval=0,
        eval_iters=0, log_interval=TOTAL, lr=1e-3, min_lr=1e-4, lr_warmup_iters=2, weight_decay=0.1, clip_grad=1.0,
        bf16=precision == "bf16", initial_loss_scale=2.0 ** 12, mock_data=True, tokenizer_type="ByteTokenizer",
        seed=1234)
    base.update(overrides)
    return config_for_test(**base)


def _run(config):
    trainer, ps = setup(config, log=False)
    result = train_loop(config, trainer, ps, log=False)
    weights = {f"{c}.{n}": p.detach().float().clone()
               for c, chunk in enumerate(trainer.chunks) for n, p in chunk.named_parameters()}
    return trainer, result, weights


def _resume_worker(layout: dict, ckpt: str, control: bool):
    """Straight run; 3 steps + save; new setup + load + steps 4-6; optionally a resume without RNG restore."""
    _, straight, straight_w = _run(_config(**layout))
    _, first, _ = _run(_config(train_iters=FIRST, save=ckpt, **layout))
    trainer, resumed, resumed_w = _run(_config(load=ckpt, **layout))
    out = {"straight": straight.losses, "first": first.losses, "resumed": resumed.losses,
           "start": trainer.start_iteration, "consumed": resumed.consumed_samples,
           "weights": (straight_w, resumed_w)}
    if control:
        saved = training.set_rng_state
        training.set_rng_state = lambda state, tracker: None   # resume without restoring the RNG streams
        try:
            out["no_rng"] = _run(_config(load=ckpt, **layout))[1].losses
        finally:
            training.set_rng_state = saved
    return out


def _check_resume(results):
    for r in results:
        assert r["start"] == FIRST
        assert r["consumed"] == TOTAL * 8
        assert len(r["resumed"]) == TOTAL - FIRST
        assert r["first"] == r["straight"][:FIRST]
        torch.testing.assert_close(torch.tensor(r["resumed"]), torch.tensor(r["straight"][FIRST:]), rtol=0, atol=0)
        straight_w, resumed_w = r["weights"]
        assert straight_w.keys() == resumed_w.keys()
        for name, w in straight_w.items():
            torch.testing.assert_close(resumed_w[name], w, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_exact_resume_single_rank(tmp_path):
    (r,) = run_distributed(_resume_worker, 1, {}, str(tmp_path), True)
    _check_resume([r])
    # Control: without the RNG restore dropout draws other masks, so the comparison above can fail.
    assert r["no_rng"] != r["straight"][FIRST:]
    files = sorted(os.path.relpath(p, tmp_path) for p in glob.glob(f"{tmp_path}/**", recursive=True)
                   if os.path.isfile(p))
    assert files == ["iter_0000003/metadata.json", "iter_0000003/mp_rank_00_000/model_optim_rng.pt",
                     "iter_0000003/mp_rank_00_000/rng_dp000.pt", "latest_checkpointed_iteration.txt"]
    assert read_tracker(str(tmp_path)) == FIRST


RESUME_LAYOUTS = {
    "tp2-dp2-zero1": (4, dict(tp=2, zero=True)),
    "pp2-interleaved": (2, dict(pp=2, vl=1)),
    "dp2-zero1-bf16": (2, dict(zero=True, precision="bf16")),      # fp32 masters come from the ZeRO shards
    "tp2-pp2-dp2-zero1": (8, dict(tp=2, pp=2, zero=True)),
}
SLOW = {"dp2-zero1-bf16", "tp2-pp2-dp2-zero1"}


@pytest.mark.parametrize("name", [pytest.param(k, marks=pytest.mark.slow if k in SLOW else ())
                                  for k in RESUME_LAYOUTS])
def test_exact_resume_parallel(tmp_path, name):
    world, layout = RESUME_LAYOUTS[name]
    results = run_distributed(_resume_worker, world, layout, str(tmp_path), False)
    _check_resume(results)
    step_dir = tmp_path / "iter_0000003"
    meta = json.loads((step_dir / "metadata.json").read_text())
    tp, pp = layout.get("tp", 1), layout.get("pp", 1)
    dp = world // (tp * pp)
    for t in range(tp):
        for p in range(pp):
            shard = step_dir / f"mp_rank_{t:02d}_{p:03d}"
            names = sorted(os.listdir(shard))
            expected = ["model_optim_rng.pt"] + [f"rng_dp{d:03d}.pt" for d in range(dp)]
            if layout.get("zero"):
                expected += [f"distrib_optim_dp{d:03d}.pt" for d in range(dp)]
            assert names == sorted(expected)
            state = torch.load(shard / "model_optim_rng.pt", weights_only=False)
            assert ("optimizer" in state) != bool(layout.get("zero"))
            assert ("model" in state) == (layout.get("vl") is None)
            assert ("model0" in state and "model1" in state) == (layout.get("vl") is not None)
    assert meta["layout"]["tensor_model_parallel_size"] == tp and meta["layout"]["data_parallel_size"] == dp
    assert meta["iteration"] == FIRST and meta["consumed_samples"] == FIRST * 8
    assert meta["tokenizer_type"] == "ByteTokenizer" and meta["config"]["model"]["hidden_size"] == 32
    tensors = {n: (v["shape"], v["split_dim"]) for n, v in meta["tensors"].items()}
    if pp == 1:
        assert tensors == _expected_tensors(tp)
    else:  # the last stage also holds the tied copy of the word embedding
        expected = _expected_tensors(tp)
        assert tensors == {**expected, "output_layer.weight": expected["embedding.word_embeddings.weight"]}
        assert meta["tensors"]["output_layer.weight"]["tied_to"] == "embedding.word_embeddings.weight"


def _expected_tensors(tp: int) -> dict:
    """Hand-written global shapes and TP split dims of the test model (h=32, ffn=128, 4 layers, vocab 300)."""
    h, ffn, vocab = 32, 128, 128 * tp * -(-300 // (128 * tp))        # vocab padded to a multiple of 128 * TP
    out = {"embedding.word_embeddings.weight": ([vocab, h], 0), "embedding.position_embeddings.weight": ([16, h], None),
           "decoder.final_layernorm.weight": ([h], None), "decoder.final_layernorm.bias": ([h], None)}
    for i in range(4):
        for name, shape, split in [("input_layernorm.weight", [h], None), ("input_layernorm.bias", [h], None),
                                   ("self_attention.linear_qkv.weight", [3 * h, h], 0),
                                   ("self_attention.linear_qkv.bias", [3 * h], 0),
                                   ("self_attention.linear_proj.weight", [h, h], 1),
                                   ("self_attention.linear_proj.bias", [h], None),
                                   ("pre_mlp_layernorm.weight", [h], None), ("pre_mlp_layernorm.bias", [h], None),
                                   ("mlp.linear_fc1.weight", [ffn, h], 0), ("mlp.linear_fc1.bias", [ffn], 0),
                                   ("mlp.linear_fc2.weight", [h, ffn], 1), ("mlp.linear_fc2.bias", [h], None)]:
            out[f"decoder.layers.{i}.{name}"] = (shape, split)
    return out


def _crash_worker(ckpt: str):
    """Save at 1, then a save at 2 whose second file fails mid-write: the iteration-1 checkpoint must survive."""
    trainer, _, weights_at_1 = _run(_config(train_iters=1, save=ckpt))
    real_save, calls = torch.save, []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(f.name)
        if len(calls) > 1:
            f.write(b"partial bytes")
            raise OSError("simulated crash: disk full")
        return real_save(obj, f, *args, **kwargs)

    torch.save = failing_save
    try:
        trainer.save(ckpt, 2)
        raised = None
    except OSError as exc:
        raised = str(exc)
    finally:
        torch.save = real_save
    reloaded, _ = setup(_config(train_iters=2, load=ckpt), log=False)
    reloaded_w = {f"{c}.{n}": p.detach().float().clone()
                  for c, chunk in enumerate(reloaded.chunks) for n, p in chunk.named_parameters()}
    return raised, len(calls), reloaded.start_iteration, weights_at_1, reloaded_w


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path):
    raised, calls, start, weights_at_1, reloaded_w = run_distributed(_crash_worker, 1, str(tmp_path))[0]
    assert raised is not None and "simulated crash" in raised and calls == 2
    assert read_tracker(str(tmp_path)) == 1 and start == 1
    assert set(weights_at_1) == set(reloaded_w)
    for name, w in weights_at_1.items():
        torch.testing.assert_close(reloaded_w[name], w, rtol=0, atol=0)
    leftovers = [p for p in glob.glob(f"{tmp_path}/**/*", recursive=True) if "tmp" in os.path.basename(p)]
    leftovers += glob.glob(f"{tmp_path}/**/.*", recursive=True)
    assert leftovers == []
    for path in glob.glob(f"{tmp_path}/**/*.pt", recursive=True):   # whatever carries a final name is complete
        torch.load(path, weights_only=False)
    assert not (tmp_path / "iter_0000002" / "metadata.json").exists()


def _mismatch_worker(ckpt: str):
    trainer, _ = setup(_config(tp=2), log=False)
    trainer.save(ckpt, 1)
    errors = []
    for overrides in (dict(pp=2), dict(tp=2, hidden_size=64)):
        try:
            setup(_config(train_iters=2, load=ckpt, **overrides), log=False)
            errors.append(None)
        except CheckpointError as exc:
            errors.append(str(exc))
    return errors


def test_layout_mismatch_is_a_clear_error(tmp_path):
    for layout_error, arch_error in run_distributed(_mismatch_worker, 2, str(tmp_path)):
        assert layout_error is not None
        assert "TP=2 PP=1 DP=1" in layout_error and "TP=1 PP=2 DP=1" in layout_error
        assert arch_error is not None and "hidden_size: saved 32, here 64" in arch_error


def test_missing_directory_and_tracker(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_tracker(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="latest_checkpointed_iteration.txt"):
        read_tracker(str(tmp_path))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release\n")
    with pytest.raises(CheckpointError, match="not an iteration number"):
        read_tracker(str(tmp_path))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7\n")
    with pytest.raises(CheckpointError, match="iteration 7 .* has no metadata.json"):
        sharded.read_metadata(str(tmp_path))


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "file.pt"
    sharded.atomic_torch_save({"v": torch.ones(3)}, str(target))

    def boom(f):
        f.write(b"half")
        raise OSError("interrupted")

    with pytest.raises(OSError, match="interrupted"):
        atomic_write(str(target), boom)
    assert os.listdir(tmp_path) == ["file.pt"]
    torch.testing.assert_close(torch.load(target)["v"], torch.ones(3))
