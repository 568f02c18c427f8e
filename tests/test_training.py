"""End-to-end numerical contract: every TP x PP x DP (x ZeRO, SP, interleaving) layout trains exactly like one rank.

Same init (weights keyed by parameter name), same data (Megatron's DP sampler), dropout off: per-step losses and
global grad norms (before clipping; clipping is active at every step) equal the single-rank run within rtol 1e-5,
and the final weights of every data-parallel replica within 1e-5. No warm-up, so every compared step updates.
Learning itself, and bf16/fp16 against fp32, are checked on real text (the committed Shakespeare sample).
"""
import math
import os
import statistics

import pytest
import torch

from distributed import run_distributed
from model_utils import gather_tp
from megagpt.model.transformer import is_glu_fc1
from megagpt.parallel.param_tags import is_embedding_copy
from megagpt.training import config_for_test, setup, train_loop

STEPS = 5
CLIP = 0.5   # below every step's grad norm on the mock data (checked), so the clipping path is compared too
CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "shakespeare_small.jsonl")
TIED_COPY = "tied copy of embedding.word_embeddings.weight"


def _config(tp=1, pp=1, vl=None, sp=False, zero=0, overlap=False, schedule=None, layers=4, **model):
    return config_for_test(**model,
        num_layers=layers, pipeline_schedule=schedule, hidden_size=64, num_attention_heads=4, seq_length=16,
        max_position_embeddings=16,
        vocab_size=500, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, num_layers_per_virtual_pipeline_stage=vl,
        sequence_parallel=sp, use_distributed_optimizer=zero > 0, zero_stage=max(zero, 1),
        overlap_grad_reduce=overlap, ddp_bucket_size=20_000,
        micro_batch_size=2, global_batch_size=8, train_iters=STEPS, eval_interval=0, eval_iters=0,
        log_interval=STEPS, lr=1e-3, min_lr=1e-4, lr_warmup_iters=0, weight_decay=0.1, clip_grad=CLIP,
        mock_data=True, tokenizer_type="ByteTokenizer", seed=1234)


def _train(config):
    """Losses, grad norms and this rank's full (TP-gathered) weights, keyed by DP replica."""
    trainer, ps = setup(config, log=False)
    result = train_loop(config, trainer, ps, log=False)
    weights = {}
    for chunk in trainer.chunks:
        for name, p in chunk.named_parameters():
            # the last stage's copy of the tied embedding is checked against the first stage's original
            key = TIED_COPY if is_embedding_copy(p) else name
            weights[key] = gather_tp(p.float(), p, ps.tp_group, glu=is_glu_fc1(name, config.model))
    return result.losses, result.grad_norms, weights, ps.dp_rank


_REFERENCE = {}


def reference(layers=4):
    """The single-rank run (of a deeper model for layouts that need more layers than 4)."""
    if layers not in _REFERENCE:
        _REFERENCE[layers] = run_distributed(_train, 1, _config(layers=layers))[0]
    return _REFERENCE[layers]


def _check_against_reference(results, layers=4):
    compare_to_reference(results, reference(layers))


def compare_to_reference(results, ref):
    """Every rank's losses and grad norms, and every DP replica's weights, equal the single-rank run `ref`."""
    ref_losses, ref_norms, ref_weights, _ = ref
    replicas: dict[int, dict] = {}
    for losses, norms, weights, dp_rank in results:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
        torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-5, atol=0)
        replicas.setdefault(dp_rank, {}).update(weights)
    for dp_rank, merged in sorted(replicas.items()):
        tied_copy = merged.pop(TIED_COPY, None)
        if tied_copy is not None:  # PP > 1: the copy on the last stage stayed equal to the first stage's weight
            torch.testing.assert_close(tied_copy, merged["embedding.word_embeddings.weight"], rtol=0, atol=0)
        assert merged.keys() == ref_weights.keys(), f"DP replica {dp_rank}"
        for name, w in ref_weights.items():
            torch.testing.assert_close(merged[name], w, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, n=name, r=dp_rank: f"DP replica {r}, {n}: {m}")


def test_reference_run_is_a_meaningful_baseline():
    """Every compared step updates (no warm-up) and is clipped (norm above CLIP), so both paths are in the contract."""
    losses, norms, _, _ = reference()
    assert len(losses) == len(norms) == STEPS and all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - math.log(500)) < 0.1  # mock vocabulary 500 (padded to 512, padding masked)
    assert all(n > CLIP for n in norms), norms
    assert len(set(losses)) == STEPS                # every step changed the weights


LAYOUTS = {
    "tp2": dict(tp=2),
    "tp2-sp": dict(tp=2, sp=True),
    "tp4": dict(tp=4),
    "tp4-sp": dict(tp=4, sp=True),
    "tp2-dp2": dict(tp=2),
    "pp2": dict(pp=2),
    "pp4": dict(pp=4),
    "pp2-interleaved": dict(pp=2, vl=1),
    "dp2": dict(),
    "dp2-zero1": dict(zero=1),
    "dp4-zero2-overlap": dict(zero=2, overlap=True),
    "tp2-pp2-dp2": dict(tp=2, pp=2),
    "tp2-pp2-dp2-zero1-sp": dict(tp=2, pp=2, zero=1, sp=True),
    "pp2-zb-h1": dict(pp=2, schedule="zb-h1"),
    "pp4-zb-h1": dict(pp=4, schedule="zb-h1"),
    "tp2-pp2-dp2-zero1-sp-overlap-zb-h1": dict(tp=2, pp=2, zero=1, sp=True, overlap=True, schedule="zb-h1"),
    "pp2-zb-v": dict(pp=2, schedule="zb-v"),
    "pp4-zb-v": dict(pp=4, schedule="zb-v", layers=8),   # two chunks on each of 4 ranks: 8 layers
    "tp2-pp2-dp2-zero1-sp-overlap-zb-v": dict(tp=2, pp=2, zero=1, sp=True, overlap=True, schedule="zb-v"),
}
WORLD = {"tp2": 2, "tp2-sp": 2, "tp4": 4, "tp4-sp": 4, "tp2-dp2": 4, "pp2": 2, "pp4": 4, "pp2-interleaved": 2, "dp2": 2, "dp2-zero1": 2,
         "dp4-zero2-overlap": 4, "tp2-pp2-dp2": 8, "tp2-pp2-dp2-zero1-sp": 8, "pp2-zb-h1": 2, "pp4-zb-h1": 4,
         "tp2-pp2-dp2-zero1-sp-overlap-zb-h1": 8, "pp2-zb-v": 2, "pp4-zb-v": 4, "tp2-pp2-dp2-zero1-sp-overlap-zb-v": 8}
FAST = {"tp2", "pp2", "dp2-zero1", "pp2-zb-v"}


@pytest.mark.parametrize("layout", [pytest.param(k, marks=() if k in FAST else pytest.mark.slow) for k in LAYOUTS])
def test_layout_matches_single_rank(layout):
    _check_against_reference(run_distributed(_train, WORLD[layout], _config(**LAYOUTS[layout])),
                             LAYOUTS[layout].get("layers", 4))


# ---- learning on real text, and low precision against fp32 ---------------------------------------------------
TEXT_STEPS, EVAL_ROUNDS = 40, 8


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory) -> str:
    """The committed Shakespeare sample as byte tokens (vocab 257: small model, fast to learn)."""
    from megagpt.data.preprocess import PreprocessConfig, preprocess

    out = tmp_path_factory.mktemp("shakespeare")
    preprocess(PreprocessConfig(input=CORPUS, output_prefix=str(out / "sh"), tokenizer_type="ByteTokenizer",
                                append_eod=True, progress=False, log_interval=0))
    return str(out / "sh_text_document")


def _text_config(prefix: str, cache: str, tp=1, pp=1, precision="fp32"):
    return config_for_test(
        num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64, max_position_embeddings=64,
        hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        micro_batch_size=4, global_batch_size=8, train_iters=TEXT_STEPS, lr=3e-3, min_lr=3e-4, lr_warmup_iters=0,
        eval_interval=TEXT_STEPS, eval_iters=EVAL_ROUNDS, log_interval=TEXT_STEPS,
        bf16=precision == "bf16", fp16=precision == "fp16", initial_loss_scale=2.0 ** 12,
        data_path=[prefix], split="90,10,0", data_cache_path=cache, tokenizer_type="ByteTokenizer", seed=1234)


def _train_text(config):
    """Training losses, then the validation loss of EVAL_ROUNDS separate rounds at the final weights (the same
    validation batches in every run): their spread is the batch noise the tolerances below are measured in."""
    trainer, ps = setup(config, log=False)
    result = train_loop(config, trainer, ps, log=False)       # its evaluation reads the first EVAL_ROUNDS rounds
    count = trainer.num_microbatches
    rounds = [trainer._mean_over_dp(trainer.engine.eval_step(trainer._next_batches(trainer.valid_data, count), count))
              for _ in range(EVAL_ROUNDS)]
    return result.losses, rounds


_TEXT = {}


def text_run(shakespeare: str, tmp: str, **layout):
    key = tuple(sorted(layout.items()))
    if key not in _TEXT:
        world = layout.get("tp", 1) * layout.get("pp", 1)
        _TEXT[key] = run_distributed(_train_text, world, _text_config(shakespeare, tmp, **layout))[-1]
    return _TEXT[key]


@pytest.mark.slow
def test_training_on_text_learns_far_beyond_batch_noise(shakespeare, tmp_path):
    losses, rounds = text_run(shakespeare, str(tmp_path))
    noise = statistics.stdev(rounds)                  # batch-to-batch spread of the loss at fixed weights
    start, end = losses[0], statistics.mean(rounds)
    assert abs(start - math.log(257)) < 0.3, start    # byte vocabulary: a fresh model is near uniform
    assert start - end > 20 * noise, (start, end, noise)
    print(f"loss {start:.3f} -> {end:.3f}, batch noise {noise:.4f}: drop = {(start - end) / noise:.0f} noise units")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_tracks_fp32(precision, shakespeare, tmp_path):
    """bf16/fp16 params with fp32 masters on TP2 x PP2 end where fp32 ends: the validation loss on the same batches
    differs by less than the batch noise measured at the fp32 weights (a run that never updated would be off by
    > 20 noise units, see above)."""
    _, fp32 = text_run(shakespeare, str(tmp_path))
    losses, low = text_run(shakespeare, str(tmp_path), tp=2, pp=2, precision=precision)
    assert all(math.isfinite(x) for x in losses)
    noise = statistics.stdev(fp32)
    print(f"{precision}: {statistics.mean(low):.4f} vs fp32 {statistics.mean(fp32):.4f}, noise {noise:.4f}")
    assert abs(statistics.mean(low) - statistics.mean(fp32)) < noise, (statistics.mean(low), statistics.mean(fp32),
                                                                       noise)
