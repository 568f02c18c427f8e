"""The log line is parsed by users' tools: its fields and format are fixed."""
import re

from megagpt.config import Config
from megagpt.train_log import IterationStats, format_log_line, format_validation_line, model_flops_per_iteration


def test_log_line_matches_megatron_format():
    st = IterationStats(iteration=10, train_iters=100, consumed_samples=320, elapsed_ms=812.34,
                        tflops_per_gpu=0.44, tokens_per_second=10086.0, learning_rate=1e-4, global_batch_size=32,
                        lm_loss=7.012345, loss_scale=1.0, grad_norm=1.2345, skipped_iterations=0, nan_iterations=0)
    line = format_log_line(st, now=0.0)
    expected = (" iteration       10/     100 | consumed samples:          320 | elapsed time per iteration (ms): "
                "812.3 | throughput per GPU (TFLOP/s/GPU): 0.4 | tokens per second: 10086.0 | learning rate: "
                "1.000000E-04 | global batch size:    32 | lm loss: 7.012345E+00 | loss scale: 1.0 | grad norm: "
                "1.234 | number of skipped iterations:   0 | number of nan iterations:   0 |")
    assert re.fullmatch(r" \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\]" + re.escape(expected), line), line


def test_validation_line():
    assert format_validation_line(10, 6.9) == (" validation loss at iteration 10 | lm loss value: 6.900000E+00 | "
                                               "lm loss PPL: 9.922747E+02 |")


def test_model_flops_formula():
    c = Config()
    c.model.num_layers, c.model.hidden_size, c.model.seq_length = 2, 64, 16
    c.train.global_batch_size = 4
    B, s, L, h, V = 4, 16, 2, 64, 512
    expected = 72 * B * s * L * h * h * (1 + s / (6 * h) + V / (12 * L * h))
    assert abs(model_flops_per_iteration(c, V, B) - expected) < 1e-6 * expected
