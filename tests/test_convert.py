"""Checkpoint conversion: resharding TP/PP (weights and optimizer state), Hugging Face GPT-2 export/import, CLI.

Resharding copies tensors, so resharded weights must equal the source's bit for bit; forward losses of the loaded
model equal the source's within fp32 tolerance (other TP/PP reduction order), and training resumed from a resharded
checkpoint continues the source run's losses (rtol 1e-5): that holds only if the Adam moments, step and schedule
were carried and re-split correctly. The vocabulary 300 pads to 512 at TP=2 and 4 but to 384 at TP=1, so the
padding is really re-made.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed
from model_utils import gather_tp
from megagpt.checkpoint import sharded
from megagpt.checkpoint.convert import ConversionError, reshard
from megagpt.checkpoint.format import CheckpointError
from megagpt.model.transformer import is_glu_fc1
from megagpt.training import config_for_test, setup, train_loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERS, SAVED = 4, 2
TIED_COPY = "output_layer.weight"


def _config(tp=1, pp=1, zero=False, **overrides):
    base = dict(
        num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=16, max_position_embeddings=16,
        vocab_size=300, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, use_distributed_optimizer=zero,
        ddp_bucket_size=20_000, micro_batch_size=2, global_batch_size=8, train_iters=ITERS, lr_decay_iters=ITERS,
        eval_interval=1000, eval_iters=1, log_interval=100, lr=1e-3, min_lr=1e-4, lr_warmup_iters=1,
        weight_decay=0.1, clip_grad=1.0, mock_data=True, tokenizer_type="ByteTokenizer", seed=1234)
    base.update(overrides)
    return config_for_test(**base)


def _weights(trainer, ps) -> dict:
    """Full (TP-gathered) weights of this rank's stage, vocabulary rows trimmed to the real 300."""
    out = {}
    for chunk in trainer.chunks:
        for name, p in chunk.named_parameters():
            full = gather_tp(p.float(), p, ps.tp_group, glu=is_glu_fc1(name, chunk.cfg))
            out[name] = full[:300] if name in ("embedding.word_embeddings.weight", TIED_COPY) else full
    return out if ps.dp_rank == 0 else {}


def _merge(results) -> dict:
    merged = {}
    for r in results:
        merged.update(r["weights"])
    return merged


# ---- resharding ---------------------------------------------------------------------------------------------
def _source_worker(layout: dict, ckpt: str):
    """Train ITERS steps, saving at SAVED and ITERS; the validation loss is the fixed batch to compare."""
    config = _config(save=ckpt, save_interval=SAVED, **layout)
    trainer, ps = setup(config, log=False)
    losses = train_loop(config, trainer, ps, log=False).losses
    return {"losses": losses, "eval": trainer.evaluate(), "weights": _weights(trainer, ps)}


def _target_worker(layout: dict, final: str, resume_from: str = None, save: str = None):
    """Load the resharded final checkpoint (eval + weights); optionally resume from the resharded SAVED one."""
    trainer, ps = setup(_config(load=final, **layout), log=False)
    out = {"start": trainer.start_iteration, "consumed": trainer.consumed_samples, "eval": trainer.evaluate(),
           "weights": _weights(trainer, ps)}
    if resume_from is not None:
        config = _config(load=resume_from, save=save, **layout)
        trainer, ps = setup(config, log=False)
        out["resumed"] = train_loop(config, trainer, ps, log=False).losses
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A TP=2 PP=2 training run and its checkpoints, resharded to TP=1 PP=1 and TP=4 PP=1 (both iterations)."""
    root = tmp_path_factory.mktemp("reshard")
    ckpt = str(root / "tp2pp2")
    results = run_distributed(_source_worker, 4, dict(tp=2, pp=2), ckpt)
    out = {"root": root, "ckpt": ckpt, "losses": results[-1]["losses"], "eval": results[-1]["eval"],
           "weights": _merge(results)}
    for tp, pp in ((1, 1), (4, 1)):
        out[(tp, pp)] = reshard(ckpt, str(root / f"tp{tp}pp{pp}"), tp, pp)
    out["saved_tp1"] = reshard(ckpt, str(root / "tp1pp1-it2"), 1, 1, iteration=SAVED)
    return out


def _check_loaded(src, results, pp=1):
    for r in results:
        assert r["start"] == ITERS and r["consumed"] == ITERS * 8
        torch.testing.assert_close(r["eval"], src["eval"], rtol=1e-5, atol=0)
    weights = _merge(results)
    tied_copy = weights.pop(TIED_COPY, None)          # exists iff the target has PP > 1
    assert (tied_copy is not None) == (pp > 1)
    if tied_copy is not None:
        torch.testing.assert_close(tied_copy, weights["embedding.word_embeddings.weight"], rtol=0, atol=0)
    src_weights = dict(src["weights"])
    torch.testing.assert_close(src_weights.pop(TIED_COPY), src_weights["embedding.word_embeddings.weight"],
                               rtol=0, atol=0)
    assert weights.keys() == src_weights.keys()
    for name, w in src_weights.items():   # resharding copies: bit-exact
        torch.testing.assert_close(weights[name], w, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def _tp1_resume(source) -> dict:
    """The TP=1 load of the resharded checkpoint, resumed from iteration SAVED into resumed-tp1 (run once per module,
    by whichever test needs it first)."""
    if "tp1_resume" not in source:
        root = source["root"]
        (source["tp1_resume"],) = run_distributed(_target_worker, 1, {}, str(root / "tp1pp1"),
                                                  str(root / "tp1pp1-it2"), str(root / "resumed-tp1"))
    return source["tp1_resume"]


@pytest.mark.slow
def test_reshard_tp2pp2_to_tp1_loads_equal_and_resumes(source):
    root = source["root"]
    r = _tp1_resume(source)
    _check_loaded(source, [r])
    torch.testing.assert_close(torch.tensor(r["resumed"]), torch.tensor(source["losses"][SAVED:]), rtol=1e-5, atol=0)
    meta = sharded.read_metadata(str(root / "tp1pp1"))
    assert meta["layout"]["data_parallel_size"] is None and meta["padded_vocab_size"] == 384
    assert meta["tensors"]["embedding.word_embeddings.weight"]["shape"] == [384, 64]
    assert sorted(os.listdir(root / "tp1pp1" / "iter_0000004" / "mp_rank_00_000")) == ["model_optim_rng.pt"]


@pytest.mark.slow
def test_reshard_tp2pp2_to_tp4_loads_equal(source):
    results = run_distributed(_target_worker, 4, dict(tp=4), str(source["root"] / "tp4pp1"))
    _check_loaded(source, results)


@pytest.mark.slow
def test_reshard_to_interleaved_pp2_loads_equal(source):
    """Target PP=2 with 2 virtual chunks per stage (layers 0, 2 on stage 0; 1, 3 on stage 1), read back too."""
    from megagpt.checkpoint.hf_gpt2 import export_hf

    root = source["root"]
    reshard(source["ckpt"], str(root / "pp2v2"), 1, 2, num_chunks=2)
    results = run_distributed(_target_worker, 2, dict(pp=2, num_layers_per_virtual_pipeline_stage=1),
                              str(root / "pp2v2"))
    _check_loaded(source, results, pp=2)
    (interleaved, _), (plain, _) = export_hf(str(root / "pp2v2")), export_hf(str(root / "tp1pp1"))
    assert all(torch.equal(interleaved[k], v) for k, v in plain.items())


@pytest.mark.slow
def test_resharded_optimizer_state_loads_under_zero_and_zero_shards_merge(source):
    """Whole-parameter state cut into ZeRO DP=2 shards at load; the ZeRO run's own checkpoint merged back by
    reshard matches the non-ZeRO resume's optimizer state (a wrong merge order would not)."""
    root = source["root"]
    results = run_distributed(_target_worker, 2, dict(zero=True), str(root / "tp1pp1"), str(root / "tp1pp1-it2"),
                              str(root / "resumed-zero"))
    _check_loaded(source, results)
    for r in results:
        torch.testing.assert_close(torch.tensor(r["resumed"]), torch.tensor(source["losses"][SAVED:]),
                                   rtol=1e-5, atol=0)
    _tp1_resume(source)                                  # the non-ZeRO resume to compare with
    merged = _optimizer_states(reshard(str(root / "resumed-zero"), str(root / "zero-merged"), 1, 1))
    plain = _optimizer_states(reshard(str(root / "resumed-tp1"), str(root / "plain-merged"), 1, 1))
    assert merged.keys() == plain.keys() and len(plain) == 4 * 12 + 4
    for name, entry in plain.items():
        assert entry.keys() == merged[name].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for key, value in entry.items():
            # The two runs reduce grads in different orders (DP=2 vs 1); Adam's first moment sums signed grads, so
            # entries that cancel to ~0 carry fp32 noise of the tensor's scale: atol is relative to that scale.
            atol = 1e-6 * float(value.abs().max())
            torch.testing.assert_close(merged[name][key], value, rtol=1e-5, atol=atol,
                                       msg=lambda m, n=f"{name} {key}": f"{n}: {m}")


def _optimizer_states(iteration_dir: str) -> dict:
    state = torch.load(os.path.join(iteration_dir, "mp_rank_00_000", "model_optim_rng.pt"), weights_only=False)
    assert state["optimizer"]["scheduler"]["num_steps"] == ITERS * 8   # the schedule counts samples (global batch 8)
    return state["optimizer"]["optimizer"]["param_state"]


# ---- Hugging Face -------------------------------------------------------------------------------------------
def _hf_model(seed: int = 0, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=64, bos_token_id=None,
                        eos_token_id=None, **overrides)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():   # non-trivial LayerNorms and biases, so a mis-mapped one shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _hf_logits(state: dict, config, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(config).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(tokens).logits


def _hf_config_for_megagpt(**overrides):
    return _config(tp=2, num_layers=2, vocab_size=500, max_position_embeddings=64, **overrides)


def _megagpt_logits_worker(imported: str, trained: str, tokens: torch.Tensor):
    """Logits of the imported checkpoint, then of the same model after one training step (saved to `trained`)."""
    out = []
    config = _hf_config_for_megagpt(load=imported, train_iters=1, save=trained, lr_warmup_iters=0)
    trainer, ps = setup(config, log=False)
    for step in range(2):
        model = trainer.chunks[0].eval()
        with torch.no_grad():
            local = model(tokens=tokens)                                      # [s, b, v/tp], padding -inf
        parts = [torch.empty_like(local) for _ in range(ps.tp_size)]
        dist.all_gather(parts, local.contiguous(), group=ps.tp_group)
        out.append(torch.cat(parts, dim=-1)[..., :500].transpose(0, 1).contiguous())   # [b, s, v]
        if step == 0:
            out.append(trainer.start_iteration)
            train_loop(config, trainer, ps, log=False)
    return out


@pytest.mark.slow
def test_hf_logits_match_megagpt_both_ways(tmp_path):
    from megagpt.checkpoint.hf_gpt2 import export_hf, import_hf

    hf = _hf_model()
    tokens = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(3))
    import_hf(hf.state_dict(), str(tmp_path / "imported"), 2, 1, config=hf.config)
    imported_logits, start, trained_logits = run_distributed(
        _megagpt_logits_worker, 2, str(tmp_path / "imported"), str(tmp_path / "trained"), tokens)[0]
    assert start == 0
    with torch.no_grad():
        expected = hf(tokens).logits
    torch.testing.assert_close(imported_logits, expected, rtol=0, atol=1e-5)     # import -> megagpt forward
    state, config = export_hf(str(tmp_path / "trained"))                        # megagpt (trained) -> HF
    assert (trained_logits - imported_logits).abs().max() > 1e-4               # the step changed the model
    torch.testing.assert_close(_hf_logits(state, config, tokens), trained_logits, rtol=0, atol=1e-5)
    # the imported metadata (split dims from hf_gpt2's table) equals what training itself writes
    saved = sharded.read_metadata(str(tmp_path / "trained"))["tensors"]
    imported = sharded.read_metadata(str(tmp_path / "imported"))["tensors"]
    assert {n: (v["shape"], v["split_dim"]) for n, v in imported.items()} == \
        {n: (v["shape"], v["split_dim"]) for n, v in saved.items()}


def test_hf_round_trip_is_bit_exact(tmp_path):
    from megagpt.checkpoint.hf_gpt2 import export_hf, import_hf, save_hf

    hf = _hf_model()
    expected = hf.state_dict()
    import_hf(expected, str(tmp_path / "tp2pp2"), 2, 2, config=hf.config)
    state, config = export_hf(str(tmp_path / "tp2pp2"))
    assert state.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(state[k], v), k
    assert state["lm_head.weight"] is state["transformer.wte.weight"]
    assert (config.n_layer, config.n_embd, config.n_head, config.vocab_size, config.n_positions) == (2, 64, 4, 500, 64)
    assert config.activation_function == "gelu_new" and config.layer_norm_epsilon == 1e-5
    save_hf(state, config, str(tmp_path / "hf"))                      # save_pretrained dir -> TP=1 -> HF again
    import_hf(str(tmp_path / "hf"), str(tmp_path / "tp1"), 1, 1)
    again, _ = export_hf(str(tmp_path / "tp1"))
    for k, v in expected.items():
        assert torch.equal(again[k], v), k
    meta = sharded.read_metadata(str(tmp_path / "tp2pp2"))
    assert meta["iteration"] == 0 and meta["padded_vocab_size"] == 512
    assert meta["config"]["model"]["layernorm_epsilon"] == 1e-5


# ---- bad input ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    """A converted TP=2 PP=1 checkpoint of a 2-layer HF model (no training needed)."""
    from megagpt.checkpoint.hf_gpt2 import import_hf

    hf = _hf_model()
    path = str(tmp_path_factory.mktemp("small") / "ckpt")
    import_hf(hf.state_dict(), path, 2, 1, config=hf.config)
    return path


def test_reshard_bad_layouts_are_clear_errors(small_ckpt, tmp_path):
    dst = str(tmp_path / "out")
    with pytest.raises(ConversionError, match="num-attention-heads 4 is not divisible by target tensor-model-parallel-size 3"):
        reshard(small_ckpt, dst, 3, 1)
    with pytest.raises(ConversionError, match="num-layers 2 is not divisible by target pipeline-model-parallel-size 3"):
        reshard(small_ckpt, dst, 1, 3)
    with pytest.raises(CheckpointError, match="does not exist"):
        reshard(str(tmp_path / "nowhere"), dst, 1, 1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "latest_checkpointed_iteration.txt").write_text("5\n")
    with pytest.raises(CheckpointError, match="iteration 5 .* has no metadata.json"):
        reshard(str(tmp_path / "empty"), dst, 1, 1)
    assert not os.path.exists(dst)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("x")
    with pytest.raises(ConversionError, match="not an empty directory; refusing to overwrite"):
        reshard(small_ckpt, str(tmp_path / "full"), 1, 1)


def test_reshard_incomplete_or_inconsistent_source(small_ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(small_ckpt, broken)
    os.remove(broken / "iter_0000000" / "mp_rank_01_000" / "model_optim_rng.pt")
    with pytest.raises(ConversionError, match="incomplete; missing: .*mp_rank_01_000/model_optim_rng.pt"):
        reshard(str(broken), str(tmp_path / "out"), 1, 1)
    wrong = tmp_path / "wrong_vocab"
    shutil.copytree(small_ckpt, wrong)
    meta_path = wrong / "iter_0000000" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["model"]["vocab_size"] = 700
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ConversionError, match="vocab mismatch.* 512 rows but vocab_size 700 pads to 768"):
        reshard(str(wrong), str(tmp_path / "out"), 1, 1)
    assert not os.path.exists(tmp_path / "out")


def test_failed_write_leaves_no_output(small_ckpt, tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("simulated crash: disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated crash"):
        reshard(small_ckpt, str(tmp_path / "out"), 1, 2)   # the second of two shards fails
    assert len(calls) == 2
    assert os.listdir(tmp_path) == []      # neither the output nor its temporary directory


@pytest.mark.parametrize("overrides, message", [
    (dict(activation_function="relu"), "activation_function 'relu'"),
    (dict(tie_word_embeddings=False), "tie_word_embeddings=False"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True"),
    (dict(reorder_and_upcast_attn=True), "reorder_and_upcast_attn=True"),
    (dict(scale_attn_weights=False), "scale_attn_weights=False"),
])
def test_hf_configs_megagpt_cannot_represent(tmp_path, overrides, message):
    from transformers import GPT2Config

    from megagpt.checkpoint.hf_gpt2 import import_hf

    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=64, **overrides)
    with pytest.raises(ConversionError, match=message):
        import_hf({}, str(tmp_path / "out"), 1, 1, config=config)   # refused before any weight is looked at
    assert not os.path.exists(tmp_path / "out")


def test_hf_weights_that_do_not_fit_are_clear_errors(tmp_path):
    from megagpt.checkpoint.hf_gpt2 import import_hf

    hf = _hf_model()
    state = dict(hf.state_dict())
    state["transformer.wte.weight"] = torch.zeros(600, 64)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    with pytest.raises(ConversionError, match="vocab mismatch: transformer.wte.weight has 600 rows, config "
                                              "vocab_size is 500"):
        import_hf(state, str(tmp_path / "out"), 1, 1, config=hf.config)
    state = dict(hf.state_dict())
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    del state["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(ConversionError, match=r"(?s)missing tensor transformer.h.1.mlp.c_fc.bias.*lm_head.weight "
                                              "differs"):
        import_hf(state, str(tmp_path / "out"), 1, 1, config=hf.config)
    with pytest.raises(ConversionError, match="num-attention-heads 4 is not divisible by target "
                                              "tensor-model-parallel-size 8"):
        import_hf(hf.state_dict(), str(tmp_path / "out"), 8, 1, config=hf.config)
    with pytest.raises(ConversionError, match="no config.json"):
        import_hf(str(tmp_path / "nowhere"), str(tmp_path / "out"), 1, 1)
    assert not os.path.exists(tmp_path / "out")


# ---- command line -------------------------------------------------------------------------------------------
def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "--no-progress",
                           *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_cli_round_trip_and_errors(small_ckpt, tmp_path):
    r = _cli("reshard", "--load", small_ckpt, "--save", str(tmp_path / "pp2"), "--target-tensor-parallel-size", "1",
             "--target-pipeline-parallel-size", "2")
    assert r.returncode == 0, r.stderr
    assert sharded.read_metadata(str(tmp_path / "pp2"))["layout"]["pipeline_model_parallel_size"] == 2
    r = _cli("to-hf", "--load", str(tmp_path / "pp2"), "--save", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "hf"))
    r = _cli("from-hf", "--load", str(tmp_path / "hf"), "--save", str(tmp_path / "back"),
             "--target-tensor-parallel-size", "4", "--target-pipeline-parallel-size", "1")
    assert r.returncode == 0, r.stderr
    from megagpt.checkpoint.hf_gpt2 import export_hf
    expected, _ = export_hf(small_ckpt)
    again, _ = export_hf(str(tmp_path / "back"))
    assert all(torch.equal(again[k], v) for k, v in expected.items())
    r = _cli("reshard", "--load", small_ckpt, "--save", str(tmp_path / "bad"), "--target-tensor-parallel-size", "3",
             "--target-pipeline-parallel-size", "1")
    assert r.returncode == 2 and "error: cannot convert to this layout" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "bad")


# ---- loading hooks in sharded.py ----------------------------------------------------------------------------
def test_converted_layout_loads_under_any_dp_and_resolved_defaults_match(small_ckpt):
    from types import SimpleNamespace

    meta = sharded.read_metadata(small_ckpt)
    meta["config"]["model"].update(ffn_hidden_size=256, max_position_embeddings=64)   # defaults spelled out
    config = _config(tp=2, num_layers=2, vocab_size=500, seq_length=64, max_position_embeddings=None,
                     use_distributed_optimizer=True)
    for dp in (1, 3):
        sharded.check_compatible(meta, config, SimpleNamespace(tp_size=2, pp_size=1, dp_size=dp), 1)
    with pytest.raises(CheckpointError, match=r"DP=any .*\(converted\)\] but this run uses \[TP=1 PP=1 DP=2"):
        sharded.check_compatible(meta, config, SimpleNamespace(tp_size=1, pp_size=1, dp_size=2), 1)
    config.model.ffn_hidden_size = 128
    with pytest.raises(CheckpointError, match="ffn_hidden_size: saved 256, here 128"):
        sharded.check_compatible(meta, config, SimpleNamespace(tp_size=2, pp_size=1, dp_size=1), 1)


def test_whole_parameter_state_is_cut_to_each_ranks_own_layout():
    """ZeRO slices are flat ranges, non-ZeRO entries keep the param shape; a separate (bf16) master missing from
    the checkpoint starts from the saved fp32 weight."""
    w = torch.arange(12, dtype=torch.float32).view(3, 4)
    saved = {"optimizer": {"param_state": {"w": {"step": torch.tensor(5.0), "exp_avg": w + 100}},
                           "param_groups": [{"lr": 0.5}], "grad_scaler": None, "skipped_iterations": 2},
             "scheduler": {"num_steps": 5}}
    zero_fresh = {"optimizer": {"param_state": {"w": {"master": torch.zeros(5)}}, "dp_size": 2, "dp_rank": 1,
                                "shard_layout": {"w": {"shape": [3, 4], "start": 7, "end": 12}},
                                "param_groups": [{"lr": 0.0}]},
                  "scheduler": {"num_steps": 0}}
    own = sharded._own_optimizer_state(zero_fresh, saved, {"w": w.bfloat16()})
    entry = own["optimizer"]["param_state"]["w"]
    assert torch.equal(entry["exp_avg"], torch.arange(7, 12, dtype=torch.float32) + 100)
    assert torch.equal(entry["master"], torch.arange(7, 12, dtype=torch.float32)) and entry["step"].item() == 5
    assert own["optimizer"]["dp_rank"] == 1 and own["optimizer"]["param_groups"] == [{"lr": 0.5}]
    assert own["scheduler"] == {"num_steps": 5} and own["optimizer"]["skipped_iterations"] == 2
    plain_fresh = {"optimizer": {"param_state": {"w": {}}, "param_groups": [{"lr": 0.0}],
                                 "shard_layout": {"w": {"shape": [3, 4], "start": 0, "end": 12}}},
                   "scheduler": {"num_steps": 0}}
    own = sharded._own_optimizer_state(plain_fresh, saved, {"w": w})
    assert torch.equal(own["optimizer"]["param_state"]["w"]["exp_avg"], w + 100)
    model_only = sharded._own_optimizer_state(plain_fresh, None, {"w": w})   # e.g. imported from HF
    assert model_only["optimizer"]["param_state"] == {"w": {}} and model_only["scheduler"] == {"num_steps": 0}
