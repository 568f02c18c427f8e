"""The block norms: LayerNorm (GPT-2) and RMSNorm (Llama), chosen by `ModelConfig.normalization`.

Both are per-token and replicated over TP. Their gradients need an extra sum over TP in two cases, marked with the
`sequence_parallel` tag that grad finalisation reads (optim/grad_buffer.py): under sequence parallelism each rank
normalises only its slice of the sequence, and a q/k norm (--qk-layernorm) sees only this rank's heads. Either way
each rank's grad is a partial sum of the single-rank grad.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from megagpt.config import ModelConfig
from megagpt.parallel.param_tags import tag


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose params are marked for a TP grad all-reduce when they see part of the tokens or heads."""

    def __init__(self, hidden: int, eps: float, sequence_parallel: bool, device, dtype) -> None:
        super().__init__(hidden, eps=eps, device=device, dtype=dtype)
        for p in self.parameters():
            tag(p, sequence_parallel=sequence_parallel)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back before the weight (as Megatron's and
    Hugging Face Llama's), so imported Llama weights give transformers' activations."""

    def __init__(self, hidden: int, eps: float, sequence_parallel: bool, device, dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden, device=device, dtype=dtype))
        tag(self.weight, sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()                                                       # [..., h]
        rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)       # [..., 1]
        return self.weight * (x32 * rms).to(x.dtype)                          # [..., h]

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"


def build_norm(cfg: ModelConfig, size: int, partial_grad: bool, device, dtype) -> nn.Module:
    """The configured norm over `size` features; `partial_grad`: this rank's grad is a partial sum over TP (see
    the module docstring)."""
    cls = RMSNorm if cfg.normalization == "RMSNorm" else LayerNorm
    return cls(size, cfg.layernorm_epsilon, partial_grad, device, dtype)
