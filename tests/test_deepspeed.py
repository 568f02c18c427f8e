"""Optional DeepSpeed backend: ZeRO 1/2/3, CPU offload and TP=2 x DP=2 train like the native single-rank run;
exact resume; a crash mid-save never moves `latest`.

The single-rank reference is tests/test_training.py's (native path, same init, data and schedule): losses within
rtol 1e-5 per step and final full weights (gathered under ZeRO-3) within 1e-5, as for every native layout.
"""
import glob
import importlib.util
import json
import os

import pytest
import torch

import megagpt.training as training
from distributed import run_distributed
from megagpt.config import ConfigError, raise_if, validate
from megagpt.training import environment_problems, setup, train_loop
from model_utils import gather_tp
from test_training import _config, reference

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="deepspeed not installed (optional: make install-deepspeed)")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# stage3_param_persistence_threshold 0: every param is partitioned (by default DeepSpeed keeps params under 100k
# elements whole on every rank, which is all of this tiny model).
ZERO = {
    "zero1": {"stage": 1},
    "zero2": {"stage": 2},
    "zero3": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero2-offload": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
    "zero3-offload": {"stage": 3, "stage3_param_persistence_threshold": 0, "offload_optimizer": {"device": "cpu"}},
}


def _write_ds_json(folder, zero: dict) -> str:
    path = os.path.join(folder, "ds.json")
    with open(path, "w") as f:   # train_batch_size is overwritten from megagpt's flags
        json.dump({"zero_optimization": zero, "train_batch_size": 999}, f)
    return path


def _ds_config(ds_path: str, **overrides):
    # DeepSpeed JIT-builds a small shared-memory op on CPU; keep it in the (git-ignored) repo cache.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".torch_extensions"))
    config = _config()
    config.parallel.deepspeed, config.parallel.deepspeed_config = True, ds_path
    for key, value in overrides.items():
        section = next(s for s in (config.model, config.parallel, config.optim, config.train) if hasattr(s, key))
        setattr(section, key, value)
    return config


def _full_weights(trainer) -> dict:
    """Full fp32 weights by name: ZeRO-3 partitions gathered over DP (a no-op for stages 1 and 2), then TP shards."""
    import deepspeed
    named = list(trainer.chunks[0].named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        return {n: gather_tp(p.float(), p, trainer.ps.tp_group) for n, p in named}


def _train_deepspeed(ds_paths: dict, tp: int) -> dict:
    """Train each DeepSpeed config in turn in this one process group (one spawn for several cases)."""
    out = {}
    for case, ds_path in ds_paths.items():
        config = _ds_config(ds_path, tensor_model_parallel_size=tp)
        trainer, ps = setup(config, log=False)
        partitions = {n: (p.ds_tensor.numel(), p.ds_numel) for n, p in trainer.chunks[0].named_parameters()
                      if hasattr(p, "ds_tensor")}
        result = train_loop(config, trainer, ps, log=False)
        out[case] = (result.losses, result.grad_norms, _full_weights(trainer), partitions,
                     trainer.engine.engine.zero_cpu_offload())
    return out


def _check_case(zero: dict, losses, norms, weights, partitions, offload) -> None:
    ref_losses, ref_norms, ref_weights, _ = reference()
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-5, atol=0)
    assert offload == ("offload_optimizer" in zero)
    if zero["stage"] == 3:   # every param (TP shard) really is split over DP=2: each rank holds half, rounded up
        assert partitions.keys() == ref_weights.keys()
        assert all(local == -(-full // 2) for local, full in partitions.values()), partitions
    else:
        assert partitions == {}
    assert weights.keys() == ref_weights.keys()
    for name, w in ref_weights.items():
        torch.testing.assert_close(weights[name], w, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("tp,cases", [(1, list(ZERO)), (2, ["zero1", "zero3"])], ids=["dp2", "tp2-dp2"])
def test_deepspeed_matches_single_rank(tmp_path, tp, cases):
    """Every case of the layout is checked and every failing one reported, by case name and rank."""
    paths = {}
    for case in cases:
        (tmp_path / case).mkdir()
        paths[case] = _write_ds_json(tmp_path / case, ZERO[case])
    results = run_distributed(_train_deepspeed, 2 * tp, paths, tp)
    errors = []
    for rank, per_case in enumerate(results):
        for case in cases:
            try:
                _check_case(ZERO[case], *per_case[case])
            except AssertionError as exc:
                errors.append(f"{case} rank {rank}: {exc}")
    assert not errors, "\n".join(errors)


TOTAL, FIRST = 4, 2


def _resume_worker(ds_path: str, ckpt: str, tp: int):
    """Straight 4 iterations; 2 + save; a NEW setup loading at 2 and training to 4; a resume without RNG restore.
    Dropout is on, so the resumed losses equal the straight ones only if every RNG stream is restored."""
    from megagpt.checkpoint.format import checkpoint_format_problem

    def run(**overrides):
        config = _ds_config(ds_path, **{**dict(train_iters=TOTAL, lr_decay_iters=TOTAL, hidden_dropout=0.1,
                                               attention_dropout=0.1, tensor_model_parallel_size=tp), **overrides})
        trainer, ps = setup(config, log=False)
        result = train_loop(config, trainer, ps, log=False)
        return trainer, result.losses, _full_weights(trainer)

    _, straight, straight_w = run()
    _, first, _ = run(train_iters=FIRST, save=ckpt)
    files = sorted(os.path.relpath(p, ckpt) for p in glob.glob(f"{ckpt}/**", recursive=True) if os.path.isfile(p))
    format_problem = checkpoint_format_problem(ckpt, deepspeed=False)
    trainer, resumed, resumed_w = run(load=ckpt)
    saved = training.set_rng_state
    training.set_rng_state = lambda state, tracker: None   # control: resume without restoring the RNG streams
    try:
        no_rng = run(load=ckpt)[1]
    finally:
        training.set_rng_state = saved
    return dict(straight=straight, first=first, resumed=resumed, no_rng=no_rng, start=trainer.start_iteration,
                consumed=trainer.consumed_samples, weights=(straight_w, resumed_w), files=files,
                format_problem=format_problem)


@pytest.mark.slow
@pytest.mark.parametrize("case,tp", [("zero1", 1), ("zero3", 1), ("zero1", 2)],
                         ids=["dp2-zero1", "dp2-zero3", "tp2-dp2-zero1"])
def test_deepspeed_exact_resume(tmp_path, case, tp):
    ckpt = str(tmp_path / "ckpt")
    results = run_distributed(_resume_worker, 2 * tp, _write_ds_json(tmp_path, ZERO[case]), ckpt, tp)
    for r in results:
        assert r["start"] == FIRST and r["consumed"] == TOTAL * 8
        assert r["first"] == r["straight"][:FIRST]
        assert r["resumed"] == r["straight"][FIRST:]              # bit for bit
        assert r["no_rng"] != r["straight"][FIRST:]               # the comparison can fail
        straight_w, resumed_w = r["weights"]
        assert straight_w.keys() == resumed_w.keys()
        for name, w in straight_w.items():
            torch.testing.assert_close(resumed_w[name], w, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
        assert "holds a DeepSpeed checkpoint" in r["format_problem"]
    files = results[0]["files"]
    assert (tmp_path / "ckpt" / "latest").read_text() == f"global_step{FIRST}"
    assert {"latest", "global_step2/metadata.json"} | {f"global_step2/rng_rank{r:05d}.pt" for r in range(2 * tp)} \
        <= set(files)
    assert len([f for f in files if f.endswith("optim_states.pt")]) == 2 * tp     # one ZeRO shard per rank
    for t in range(tp):   # the module of every TP rank
        assert any(f.endswith(f"mp_rank_{t:02d}_model_states.pt") for f in files), files
    assert not [f for f in files if "tmp" in f or "old" in f]


def _crash_worker(ds_path: str, ckpt: str, weights_path: str):
    """Save at 1, then a save at 2 in which rank 1's first file fails while rank 0 writes all of its own.
    DeepSpeed alone would let rank 0 write `latest` -> global_step2 here; megagpt's rank 0 waits for every rank."""
    import torch.distributed as dist
    trainer, ps = setup(_ds_config(ds_path, train_iters=1, lr_decay_iters=2, save=ckpt), log=False)
    train_loop(trainer.config, trainer, ps, log=False)
    weights = _full_weights(trainer)          # collective under ZeRO-3
    if ps.rank == 0:
        torch.save(weights, weights_path)
    dist.barrier()
    if ps.rank == 1:
        def failing_save(*args, **kwargs):
            raise OSError("simulated crash: disk full")
        torch.save = failing_save
    trainer.save(ckpt, 2)


def _load_worker(ds_path: str, ckpt: str):
    trainer, _ = setup(_ds_config(ds_path, train_iters=2, lr_decay_iters=2, load=ckpt), log=False)
    return trainer.start_iteration, _full_weights(trainer)


@pytest.mark.slow
def test_deepspeed_crash_mid_save_keeps_previous_checkpoint(tmp_path):
    ckpt, weights_path = str(tmp_path / "ckpt"), str(tmp_path / "w1.pt")
    ds_path = _write_ds_json(tmp_path, ZERO["zero1"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_distributed(_crash_worker, 2, ds_path, ckpt, weights_path)
    assert (tmp_path / "ckpt" / "latest").read_text() == "global_step1"
    assert "global_step2" not in os.listdir(ckpt)   # only the unfinished temporary tag, never pointed to
    weights_at_1 = torch.load(weights_path)
    for start, weights in run_distributed(_load_worker, 2, ds_path, ckpt):
        assert start == 1 and weights.keys() == weights_at_1.keys()
        for name, w in weights_at_1.items():
            torch.testing.assert_close(weights[name], w, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"saved with layout .*'data_parallel_size': 2.* but this run uses .*"
                                           r"'data_parallel_size': 1"):
        run_distributed(_load_worker, 1, ds_path, ckpt)   # another DP size: named before DeepSpeed reads a shard


def test_checkpoint_format_mismatch_is_a_config_error(tmp_path):
    """--load of the other backend's checkpoint is refused by set-up's file checks, before any process group."""
    ds_dir, native_dir = tmp_path / "ds", tmp_path / "native"
    ds_dir.mkdir(), native_dir.mkdir()
    (ds_dir / "latest").write_text("global_step2")
    (native_dir / "latest_checkpointed_iteration.txt").write_text("2\n")
    config = _config()
    config.train.load = str(ds_dir)
    with pytest.raises(ConfigError, match="holds a DeepSpeed checkpoint .* --deepspeed was not given"):
        raise_if(environment_problems(config))
    config.parallel.deepspeed, config.train.load = True, str(native_dir)
    with pytest.raises(ConfigError, match="holds a native megagpt checkpoint .* but --deepspeed was given"):
        raise_if(environment_problems(config))
    config.train.load = str(ds_dir)
    assert environment_problems(config) == []


def test_deepspeed_rejects_pipeline_sequence_parallel_and_native_zero():
    config = _config(pp=2, sp=True, tp=2, zero=1)
    config.parallel.deepspeed = True
    with pytest.raises(ConfigError) as err:
        validate(config, world_size=4)
    for message in ("got pipeline-model-parallel-size 2: pipelining under DeepSpeed needs its PipelineModule",
                    "--deepspeed and --use-distributed-optimizer both shard the optimizer",
                    "--deepspeed does not run --sequence-parallel"):
        assert message in str(err.value)
