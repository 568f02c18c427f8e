"""Config parsing, presets and validation messages (no processes)."""
import pytest

from megagpt.cli import PRESETS, parse_args
from megagpt.config import (Config, ConfigError, ModelConfig, final_global_batch_size, global_batch_size_at,
                            num_microbatches, num_parameters, raise_if, step_schedule, train_iters, validate)
from megagpt.training import environment_problems
from megagpt.config import pad_vocab_size


def _valid(**model) -> Config:
    config = parse_args(["--mock-data", "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
                         "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
                         "--train-iters", "100"])
    for k, v in model.items():
        setattr(config.model, k, v)
    return config


def test_megatron_flags_map_to_fields():
    c = parse_args(["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "4",
                    "--num-layers-per-virtual-pipeline-stage", "1", "--sequence-parallel", "--bf16",
                    "--use-distributed-optimizer", "--lr", "3e-4", "--data-path", "0.3", "a", "0.7", "b",
                    "--no-masked-softmax-fusion", "--recompute-activations", "--lr-decay-style", "linear"])
    assert (c.parallel.tensor_model_parallel_size, c.parallel.pipeline_model_parallel_size) == (2, 4)
    assert c.parallel.num_layers_per_virtual_pipeline_stage == 1 and c.parallel.sequence_parallel
    assert c.optim.bf16 and not c.optim.fp16 and c.optim.lr == 3e-4 and c.optim.lr_decay_style == "linear"
    assert c.parallel.use_distributed_optimizer
    assert c.data.data_path == ["0.3", "a", "0.7", "b"]
    assert c.model.masked_softmax_fusion is False and c.model.recompute_granularity == "selective"


def test_preset_then_explicit_flag_wins():
    c = parse_args(["--model-size", "gpt2-355m", "--num-layers", "2"])
    assert (c.model.num_layers, c.model.hidden_size, c.model.num_attention_heads) == (2, 1024, 16)


def test_config_round_trips_through_dict():
    c = parse_args(["--hidden-size", "96", "--fp16"])
    assert Config.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("name,expected", [
    # Published parameter counts (Hugging Face GPT-2 checkpoints, vocabulary 50257, 1024 positions).
    ("gpt2-124m", 124_439_808), ("gpt2-355m", 354_823_168), ("gpt2-774m", 774_030_080),
    ("gpt2-1.5b", 1_557_611_200)])
def test_gpt2_preset_parameter_counts(name, expected):
    assert num_parameters(ModelConfig(**PRESETS[name]), vocab_size=50257) == expected


def test_gpt_1_3b_preset_is_1_3_billion():
    # GPT-3 XL's depth and width (Brown et al. 2020, table 2.1: 24 layers, d_model 2048) with 128-dim heads.
    n = num_parameters(ModelConfig(**PRESETS["gpt-1.3b"]), vocab_size=50257)
    assert 1.28e9 < n < 1.35e9


def test_megatron_8b_preset_is_8_3_billion():
    # Megatron-LM paper: 72 layers, hidden 3072, 32 heads, vocabulary 51200 -> 8.3B parameters.
    n = num_parameters(ModelConfig(**PRESETS["megatron-8.3b"]), vocab_size=51200)
    assert 8.25e9 < n < 8.35e9


def test_vocab_padding():
    assert pad_vocab_size(50257, 1, 128) == 50304
    assert pad_vocab_size(50257, 2, 128) == 50432
    assert pad_vocab_size(512, 4, 128) == 512


def test_valid_config_passes():
    validate(_valid(), world_size=4)


@pytest.mark.parametrize("world,tp,pp,model,message", [
    (6, 4, 1, {}, "world size 6 is not divisible by tensor-model-parallel-size 4"),
    (4, 4, 1, {"num_attention_heads": 6, "hidden_size": 66}, "num-attention-heads 6 is not divisible by "
                                                            "tensor-model-parallel-size 4"),
    (2, 1, 2, {"num_layers": 3}, "num-layers 3 is not divisible by pipeline-model-parallel-size 2"),
    (1, 1, 1, {"hidden_size": 65}, "hidden-size 65 is not divisible by num-attention-heads 4"),
    (1, 1, 1, {"seq_length": 64, "max_position_embeddings": 32}, "seq-length 64 exceeds max-position-embeddings 32"),
])
def test_bad_layouts_name_the_numbers(world, tp, pp, model, message):
    c = _valid(**model)
    c.parallel.tensor_model_parallel_size, c.parallel.pipeline_model_parallel_size = tp, pp
    with pytest.raises(ConfigError, match=message):
        validate(c, world_size=world)


def test_batch_and_interleaving_checks():
    c = _valid()
    c.train.global_batch_size = 6
    with pytest.raises(ConfigError, match="global-batch-size 6 is not divisible by micro-batch-size 2 x "
                                          "data-parallel size 2"):
        validate(c, world_size=2)
    c = _valid(num_layers=8)
    c.parallel.pipeline_model_parallel_size, c.parallel.num_layers_per_virtual_pipeline_stage = 2, 3
    with pytest.raises(ConfigError, match="num-layers 8 is not divisible by pipeline-model-parallel-size 2 x "
                                          "num-layers-per-virtual-pipeline-stage 3"):
        validate(c, world_size=2)
    c = _valid(num_layers=8)
    c.parallel.pipeline_model_parallel_size, c.parallel.num_layers_per_virtual_pipeline_stage = 4, 1
    c.train.global_batch_size = 6  # 3 micro-batches, not a multiple of PP 4
    with pytest.raises(ConfigError, match=r"micro-batches per step \(3\) to be a multiple of pipeline"):
        validate(c, world_size=4)
    c = _valid(num_layers=8)
    c.parallel.num_layers_per_virtual_pipeline_stage = 4   # 2 chunks on a single stage
    with pytest.raises(ConfigError, match="--num-layers-per-virtual-pipeline-stage needs pipeline-model-parallel"):
        validate(c, world_size=1)


def test_missing_data_files_are_named(tmp_path):
    c = _valid()
    c.data.mock_data, c.data.data_path = False, [str(tmp_path / "nope_text_document")]
    validate(c, world_size=1)      # arithmetic only: files are set-up's to check
    with pytest.raises(ConfigError, match="nope_text_document.bin does not exist"):
        raise_if(environment_problems(c))


def test_bad_learning_rate_schedule_is_a_config_error():
    c = _valid()
    c.optim.lr_warmup_iters, c.train.train_iters = 50, 40   # decay would end before warmup does
    c.optim.min_lr = c.optim.lr * 2
    with pytest.raises(ConfigError) as e:
        validate(c, world_size=1)
    assert "the decay (320 samples: --lr-decay-iters or --train-iters x global batch, or --lr-decay-samples) must " \
           "outlast the warmup (400 samples)" in str(e.value)
    assert "--min-lr" in str(e.value)


# ---- Megatron-LM defaults, batch-size ramp-up, run length, deprecated forms ----------------------------------

def test_defaults_are_megatron_lms():
    """Flags a Megatron script may leave out train the same here (values from Megatron-LM's argument defaults)."""
    c = parse_args([])
    megatron = {"min_lr": 0.0, "lr_decay_style": "linear", "weight_decay": 0.01, "adam_beta1": 0.9,
                "adam_beta2": 0.999, "adam_eps": 1e-8, "lr_warmup_iters": 0, "lr_warmup_init": 0.0,
                "lr_wsd_decay_style": "exponential", "weight_decay_incr_style": "constant", "clip_grad": 1.0,
                "initial_loss_scale": 2.0 ** 32, "min_loss_scale": 1.0, "loss_scale_window": 1000, "hysteresis": 2}
    assert {k: getattr(c.optim, k) for k in megatron} == megatron
    assert (c.train.global_batch_size, c.train.train_iters, c.train.eval_iters, c.train.log_interval,
            c.train.eval_interval, c.train.seed) == (None, None, 100, 100, 1000, 1234)
    assert (c.model.hidden_dropout, c.model.attention_dropout, c.model.init_method_std,
            c.model.make_vocab_size_divisible_by, c.model.attention_backend) == (0.1, 0.1, 0.02, 128, "auto")


def test_global_batch_defaults_to_micro_batch_times_dp():
    c = _valid()
    c.train.global_batch_size = None
    validate(c, world_size=4)
    assert final_global_batch_size(c, 4) == 8 and num_microbatches(c, 4) == 1


def test_rampup_follows_megatrons_schedule():
    # Megatron's example: start 16, +8 over 300000 samples to 1024: 126 increments of 300000/126 samples each
    c = parse_args(["--mock-data", "--global-batch-size", "1024", "--micro-batch-size", "8",
                    "--rampup-batch-size", "16", "8", "300000", "--train-samples", "1000000"])
    per = 300000 / 126
    assert global_batch_size_at(c, 1, 0) == 16
    assert global_batch_size_at(c, 1, int(per) - 1) == 16 and global_batch_size_at(c, 1, int(per) + 1) == 24
    assert global_batch_size_at(c, 1, int(10 * per) + 1) == 16 + 80
    assert global_batch_size_at(c, 1, 300000) == 16 + 8 * int(300000 / per)
    assert global_batch_size_at(c, 1, 300001) == 1024
    assert num_microbatches(c, 2, 0) == 1 and num_microbatches(c, 2, 300001) == 64
    # iterations walk the ramp, then the rest at 1024 (a last partial batch dropped)
    consumed, iters = 0, 0
    while consumed <= 300000:
        consumed, iters = consumed + global_batch_size_at(c, 1, consumed), iters + 1
    assert train_iters(c, 1) == iters + (1000000 - consumed) // 1024
    validate(c, world_size=1)


def test_run_length_problems_name_the_flags():
    c = _valid()
    c.optim.lr_decay_samples = 10
    with pytest.raises(ConfigError, match="--lr-decay-samples needs --train-samples"):
        validate(c, world_size=2)
    c = _valid()
    c.train.rampup_batch_size = [4, 4, 100]   # with --train-iters too (Megatron refuses it, its 175B script has it)
    validate(c, world_size=2)
    c = _valid()
    c.train.train_iters, c.train.train_samples, c.train.rampup_batch_size = None, 1000, [2, 2, 100]
    with pytest.raises(ConfigError, match=r"global batch sizes \[2, 6\] of the ramp are not multiples of "
                                          r"micro-batch-size 2 x data-parallel size 2"):
        validate(c, world_size=2)
    c.train.train_iters = 5
    with pytest.raises(ConfigError, match="give exactly one of --train-iters and --train-samples"):
        validate(c, world_size=2)
    c = _valid()
    c.optim.lr_decay_style = "WSD"
    c.optim.weight_decay_incr_style = "linear"
    with pytest.raises(ConfigError) as e:
        validate(c, world_size=2)
    assert "WSD needs --lr-wsd-decay-iters" in str(e.value) and "--start-weight-decay" in str(e.value)


def test_deprecated_forms_are_accepted_with_a_note(capsys):
    c = parse_args(["--checkpoint-activations", "--data-impl", "mmap", "--use-mcore-models", "--transformer-impl",
                    "local", "--override-opt-param-scheduler"])
    assert c.model.recompute_granularity == "full" and c.optim.override_opt_param_scheduler
    out = capsys.readouterr().out
    assert out.count("deprecated") == 3 and "--transformer-impl local" in out
    for bad in (["--data-impl", "lazy"], ["--transformer-impl", "transformer_engine"]):
        with pytest.raises(SystemExit, match="not supported"):
            parse_args(bad)


def test_step_batch_size_schedule_follows_megatrons_form():
    """Thresholds in tokens (K/M/B/T) become samples of seq-length tokens; each step takes the size of the last
    threshold reached; --train-samples walks it as Megatron does (a last step may pass the total)."""
    c = parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
                    "--max-position-embeddings", "16", "--micro-batch-size", "2", "--train-samples", "40",
                    "--step-batch-size-schedule", "0:4 0.128K:8 0.384k:12", "--mock-data"])
    assert step_schedule(c) == [(0, 4), (8, 8), (24, 12)] and final_global_batch_size(c, 2) == 12
    assert [global_batch_size_at(c, 2, n) for n in (0, 4, 8, 16, 24, 36)] == [4, 4, 8, 8, 12, 12]
    assert train_iters(c, 2) == 6                                  # consumed 0 4 8 16 24 36, then 48 >= 40
    validate(c, 2)
    c.train.global_batch_size = 12
    with pytest.raises(ConfigError, match="drop --global-batch-size"):
        validate(c, 2)
    c.train.global_batch_size, c.train.step_batch_size_schedule = None, "0:4 128:6"
    with pytest.raises(ConfigError, match=r"global batch sizes \[6\] are not multiples of micro-batch-size 2 x "
                                          r"data-parallel size 2"):
        validate(c, 2)
    for bad in ("16:4 128:8", "0:4 128:8 64:12", "0:4 x:8", "0-4"):
        c.train.step_batch_size_schedule = bad
        with pytest.raises(ConfigError, match="step-batch-size-schedule"):
            validate(c, 2)
