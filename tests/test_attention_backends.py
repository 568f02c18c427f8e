"""--attention-backend: flash (scaled_dot_product_attention), fused and unfused softmax paths give the same
forward, gradients and training losses in fp32; auto and local resolve as documented."""
from __future__ import annotations

import pytest
import torch

from distributed import run_distributed
from megagpt.config import ModelConfig
from test_training import _config
from megagpt.training import setup, train_loop

BACKENDS = ("flash", "fused", "unfused")


def test_auto_and_local_resolve():
    assert ModelConfig(attention_backend="auto").attention_core == "flash"
    assert ModelConfig(attention_backend="local").attention_core == "fused"
    assert ModelConfig(attention_backend="unfused").attention_core == "unfused"


def _losses(backends, tp):
    out = {}
    for backend in backends:
        config = _config(tp=tp)
        config.model.attention_backend = backend
        trainer, ps = setup(config, log=False)
        out[backend] = train_loop(config, trainer, ps, log=False).losses
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_backends_train_alike_in_fp32(tp):
    losses = run_distributed(_losses, tp, BACKENDS, tp)[0]
    for backend in BACKENDS[1:]:
        torch.testing.assert_close(torch.tensor(losses[backend]), torch.tensor(losses["flash"]), rtol=1e-5, atol=0)
    assert losses["flash"][0] != losses["flash"][-1]     # it trained


def test_flash_dropout_is_seeded():
    """With attention dropout the flash path draws from the tracker's stream: same seed, same result, and the
    dropout really applies (the losses differ from a run without it)."""
    a, b, no_dropout = run_distributed(_dropout_runs, 1, [0.5, 0.5, 0.0])[0]
    assert a == b and a[0] != no_dropout[0]


def _dropout_runs(rates: list[float]):
    out = []
    for rate in rates:
        config = _config()
        config.model.attention_dropout, config.model.attention_backend = rate, "flash"
        config.train.train_iters = 2
        trainer, ps = setup(config, log=False)
        out.append(train_loop(config, trainer, ps, log=False).losses)
    return out


def test_startup_line_names_the_core_and_fused_fails_loudly_on_a_gpu(monkeypatch):
    """Which attention runs is printed at start-up; `--attention-backend fused` on a CUDA run whose kernel cannot run
    (here: a failed build, faked) stops with the reason, while `local` falls back to PyTorch's softmax and says so.
    On the CPU, fused is PyTorch's softmax by design: a line, not an error."""
    from megagpt.model import softmax
    line = softmax.attention_backend_line
    assert line("auto", "flash", "cpu", torch.float32, 1024).startswith("attention: flash (torch scaled_dot_product")
    assert "the kernel cannot run: dtype float32 not fp16/bf16" in line("fused", "fused", "cpu", torch.float32, 1024)
    assert "the kernel cannot run: input is on cpu" in line("fused", "fused", "cpu", torch.bfloat16, 1024)
    monkeypatch.setattr(softmax._EXTENSION, "get", lambda: (None, "RuntimeError: nvcc not found"))
    with pytest.raises(ValueError, match="fused cannot use the fused softmax kernel: extension not built: "
                                         "RuntimeError: nvcc not found"):
        line("fused", "fused", "cuda", torch.bfloat16, 1024)
    with pytest.raises(ValueError, match="kernel: dtype float32 not fp16/bf16"):
        line("fused", "fused", "cuda", torch.float32, 1024)
    with pytest.raises(ValueError, match="key length 20000 > 16384"):
        line("fused", "fused", "cuda", torch.bfloat16, 20000)
    assert "PyTorch softmax (the kernel cannot run: extension not built" in line("local", "fused", "cuda",
                                                                                  torch.bfloat16, 1024)
    monkeypatch.setattr(softmax._EXTENSION, "get", lambda: (object(), None))
    assert line("fused", "fused", "cuda", torch.bfloat16, 1024).startswith("attention: fused softmax CUDA kernel")
