"""The planner against measurement on gloo: state bytes equal the trainer's own memory line exactly, and predicted
activation bytes are within 5% of what autograd saves for one micro-batch (saved-tensor hooks)."""
from __future__ import annotations

import pytest
import torch

from distributed import run_distributed
from megagpt.data.documents import documents_of
from megagpt.diagnostics.activations import saved_tensor_bytes
from megagpt.plan.memory import chunk_activation_bytes, dims, rank_chunks, state_bytes
from megagpt.training import config_for_test


def _config(tp=1, pp=1, vl=None, sp=False, zero=0, precision="fp32", recompute=None, dropout=0.0, backend="fused",
            **model):
    return config_for_test(**model,
        num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=32, max_position_embeddings=32,
        vocab_size=500, hidden_dropout=dropout, attention_dropout=dropout, recompute_granularity=recompute,
        attention_backend=backend,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, num_layers_per_virtual_pipeline_stage=vl,
        sequence_parallel=sp, use_distributed_optimizer=zero > 0, zero_stage=max(zero, 1), ddp_bucket_size=20_000,
        micro_batch_size=2, global_batch_size=8, train_iters=1, eval_interval=0, eval_iters=0, log_interval=1,
        bf16=precision == "bf16", mock_data=True, tokenizer_type="ByteTokenizer", seed=1234)


# world 4: DDP, ZeRO-1, ZeRO-2, interleaved, TP x PP with SP, bf16 masters; small buckets so padding shows
STATE_LAYOUTS = {
    "tp2_dp2": dict(tp=2),
    "tp2_dp2_zero1_bf16": dict(tp=2, zero=1, precision="bf16"),
    "pp2_dp2_zero2": dict(pp=2, zero=2),
    "pp2_interleaved_dp2_zero1": dict(pp=2, vl=1, zero=1),
    "tp2_pp2_sp": dict(tp=2, pp=2, sp=True),
    "dp4_zero2_bf16": dict(zero=2, precision="bf16"),
    "pp2_zb_v_dp2": dict(pp=2, pipeline_schedule="zb-v"),   # rank 0 holds the first and the last stage
    # Llama-style (#15): grouped QKV, SwiGLU rows, bias-free RMSNorm, no position table, untied head, q/k norms
    "tp2_pp2_llama": dict(tp=2, pp=2, position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                          group_query_attention=True, num_query_groups=2, untie_embeddings_and_output_weights=True,
                          disable_bias_linear=True, qk_layernorm=True),
}


def _state_bytes_case(layouts):
    from megagpt.training import setup, train_loop
    out = {}
    for name, kwargs in layouts.items():
        config = _config(**kwargs)
        trainer, ps = setup(config, log=False)
        train_loop(config, trainer, ps, log=False)
        predicted = state_bytes(config, ps.world_size, ps.pp_rank, ps.dp_rank, device="cpu")
        out[name] = (trainer.engine.memory_bytes(), predicted)
    return out


def test_state_bytes_equal_the_trainers_memory_line():
    results = run_distributed(_state_bytes_case, 4, STATE_LAYOUTS)
    for rank, per_layout in enumerate(results):
        for name, (measured, predicted) in per_layout.items():
            assert measured == predicted, f"{name} rank {rank}: measured {measured} != predicted {predicted}"


# world 2: the contract matrix for activations (TP, SP, PP, recompute), dropout on so its masks count. The softmax
# path (fused; on CPU its torch fallback) everywhere, and the flash path (scaled_dot_product_attention) without
# attention dropout: with it, CPU falls back to torch's math attention, which the GPU kernels do not.
ACTIVATION_LAYOUTS = {
    "tp2": dict(tp=2),
    "tp2_sp": dict(tp=2, sp=True),
    "pp2": dict(pp=2),
    "tp2_selective": dict(tp=2, recompute="selective"),
    "tp2_sp_full": dict(tp=2, sp=True, recompute="full"),
    "pp2_selective_bf16": dict(pp=2, recompute="selective", precision="bf16"),
    "pp2_interleaved_full": dict(pp=2, vl=1, recompute="full"),
    "tp2_sp_no_dropout_bf16": dict(tp=2, sp=True, precision="bf16", dropout=-1),
    "tp2_flash": dict(tp=2, dropout=-1, backend="flash"),
    "pp2_sp_flash_bf16": dict(pp=2, tp=1, sp=False, precision="bf16", dropout=-1, backend="flash"),
    "pp2_zb_v": dict(pp=2, pipeline_schedule="zb-v"),
    # packed documents (#10): the document mask, the masked probabilities, per-token position ids
    "tp2_documents": dict(tp=2, reset_attention_mask=True, reset_position_ids=True),
    "pp2_documents_no_dropout": dict(pp=2, dropout=-1, reset_attention_mask=True, reset_position_ids=True),
    "pp2_documents_flash": dict(pp=2, dropout=-1, backend="flash", reset_attention_mask=True,
                                reset_position_ids=True),
}


def _activation_case(layouts):
    from megagpt.engines.native import params_dtype
    from megagpt.model.gpt import build_model_chunks
    from megagpt.parallel import random as tp_random
    from megagpt.parallel.state import ParallelState
    from megagpt.config import num_model_chunks
    out = {}
    for name, kwargs in layouts.items():
        config = _config(**{**kwargs, "dropout": 0.1 if kwargs.get("dropout") != -1 else 0.0})
        m, p = config.model, config.parallel
        ps = ParallelState(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, num_model_chunks(config),
                           p.pipeline_schedule)
        tracker = tp_random.model_parallel_seed(1, ps.tp_rank, ps.pp_rank, "cpu")
        dtype = params_dtype(config)
        chunks = build_model_chunks(m, ps, seed=1, tracker=tracker, num_chunks=num_model_chunks(config),
                                    sequence_parallel=p.sequence_parallel, params_dtype=dtype)
        s, b = m.seq_length, config.train.micro_batch_size
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, m.vocab_size, (b, s), generator=gen)
        d = dims(config, ps.world_size, "cpu")
        for c, (model, (layers, first, last)) in enumerate(zip(chunks, rank_chunks(config, ps.pp_rank))):
            model.train()
            x = None if first else torch.randn(s // d.sp, b, m.hidden_size, generator=gen).to(dtype).requires_grad_()
            position_ids, document_ids = documents_of(tokens, config.data) or (None, None)
            _, saved = saved_tensor_bytes(model, tokens=tokens if first else None, input_tensor=x,
                                          labels=tokens if last else None, position_ids=position_ids,
                                          document_ids=document_ids,
                                          exclude=[p for c in chunks for p in c.parameters()])  # zb-v: tied head
            predicted = sum(chunk_activation_bytes(config, d, layers, first, last).values())
            out[f"{name} chunk {c}"] = (saved.total, predicted)
    return out


def test_activation_bytes_within_5_percent_of_saved_tensors():
    results = run_distributed(_activation_case, 2, ACTIVATION_LAYOUTS)
    for rank, per_layout in enumerate(results):
        for name, (measured, predicted) in per_layout.items():
            assert abs(predicted - measured) <= 0.05 * measured, \
                f"{name} rank {rank}: saved {measured} B, predicted {predicted} B"


def _pretrain_output(config):
    """The run's stdout, and how many steps ran their forwards under the measuring wrapper."""
    import contextlib
    import io

    from megagpt.engines import native
    from megagpt.training import pretrain
    measured_steps = []
    wrap = native.measure_first_calls
    native.measure_first_calls = lambda *args: measured_steps.append(1) or wrap(*args)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pretrain(config, log=True)
    return out.getvalue(), len(measured_steps)


def test_trainer_prints_measured_activation_bytes_beside_the_plan():
    """The trainer's memory line after iteration 1 carries the bytes the first micro-batch saved for backward on
    each stage (saved-tensor hooks during the real step) and the plan's prediction; for a plain PP2 config they
    agree within 5%, and the measurement is taken once (the engine keeps it, later steps run bare)."""
    import re
    config = config_for_test(num_layers=4, hidden_size=128, num_attention_heads=4, seq_length=128,
                             max_position_embeddings=128, vocab_size=500, hidden_dropout=0.0, attention_dropout=0.0,
                             pipeline_model_parallel_size=2, micro_batch_size=4, global_batch_size=8, train_iters=2,
                             eval_interval=0, eval_iters=0, log_interval=1, mock_data=True,
                             tokenizer_type="ByteTokenizer", seed=1234)
    results = run_distributed(_pretrain_output, 2, config)
    text = "".join(out for out, _ in results)                       # each rank prints its own line
    assert [steps for _, steps in results] == [1, 1]                # iteration 1 only: later steps run bare
    found = re.findall(r"> rank (\d) memory after iteration 1: .*\| activations per micro-batch: "
                       r"measured ([\d.]+) MiB, plan ([\d.]+) MiB", text)
    assert sorted(int(r) for r, _, _ in found) == [0, 1], text[-2000:]
    for rank, measured, plan in found:
        measured, plan = float(measured), float(plan)
        assert measured > 1.0 and abs(plan - measured) <= 0.05 * measured, (rank, measured, plan)
    assert text.count("activations per micro-batch") == 2
