"""Tensor-parallel transformer layer: attention and MLP built from column/row-parallel linears.

Activations are sequence-first, `[s, b, h]` (as Megatron), so sequence parallel can split dim 0. Under sequence
parallel the residual stream, LayerNorms and hidden dropout hold `[s/tp, b, h]`; each TP region all-gathers on
entry and reduce-scatters on exit, so communication stays at its minimum.
"""
from __future__ import annotations

import math
import zlib
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megagpt.config import ModelConfig
from megagpt.model.softmax import FusedScaleMaskSoftmax
from megagpt.parallel import random as tp_random
from megagpt.parallel.param_tags import tag
from megagpt.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megagpt.parallel.state import ParallelState

InitMethod = Callable[[torch.Tensor], None]


def seeded_normal_init(seed: int, name: str, std: float, rows: Optional[int] = None) -> InitMethod:
    """Fill a full-size master tensor from a generator keyed by (seed, parameter name).

    Keying by name, not by creation order, makes the weights independent of the parallel layout: every TP/PP/DP
    layout builds exactly the model of a single rank. `rows` initialises only the first rows (the real vocabulary);
    the padding rows stay zero.
    """
    key = (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)

    def init(master: torch.Tensor) -> None:
        generator = torch.Generator().manual_seed(key)
        target = master if rows is None else master[:rows]
        values = torch.empty(target.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
        master.zero_()
        target.copy_(values)

    return init


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose params are marked for a TP grad all-reduce when activations are sequence-parallel."""

    def __init__(self, hidden: int, eps: float, sequence_parallel: bool, device, dtype) -> None:
        super().__init__(hidden, eps=eps, device=device, dtype=dtype)
        for p in self.parameters():
            tag(p, sequence_parallel=sequence_parallel)


class ParallelAttention(nn.Module):
    """Causal self-attention with heads split across TP ranks (QKV column-split, output row-split)."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, prefix: str, seed: int, sequence_parallel: bool,
                 tracker: tp_random.RNGStatesTracker, device, dtype) -> None:
        super().__init__()
        h, heads = cfg.hidden_size, cfg.num_attention_heads
        self.heads_per_rank = heads // ps.tp_size
        self.head_dim = h // heads
        self.tracker = tracker
        self.selective_recompute = cfg.recompute_granularity == "selective"
        out_std = cfg.init_method_std / math.sqrt(2.0 * cfg.num_layers)
        # QKV rows grouped per head ([q_h0 k_h0 v_h0 | q_h1 ...]): a contiguous TP split gives each rank whole heads.
        self.linear_qkv = ColumnParallelLinear(
            h, 3 * h, ps.tp_group, init_method=seeded_normal_init(seed, prefix + "linear_qkv.weight", cfg.init_method_std),
            sequence_parallel=sequence_parallel, params_dtype=dtype, device=device)
        self.linear_proj = RowParallelLinear(
            h, h, ps.tp_group, init_method=seeded_normal_init(seed, prefix + "linear_proj.weight", out_std),
            input_is_parallel=True, sequence_parallel=sequence_parallel, params_dtype=dtype, device=device)
        self.flash = cfg.attention_core == "flash"
        self.softmax = FusedScaleMaskSoftmax("causal", scale=1.0 / math.sqrt(self.head_dim),
                                             softmax_in_fp32=cfg.attention_softmax_in_fp32,
                                             masked_softmax_fusion=cfg.masked_softmax_fusion
                                             and cfg.attention_core == "fused")
        self.attention_dropout = nn.Dropout(cfg.attention_dropout)

    def core_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.flash:
            return self.flash_attention(q, k, v)
        s, b, n, d = q.shape                                                # [s, b, np/tp, hd]
        q = q.permute(1, 2, 0, 3)                                           # [b, np/tp, s, hd]
        k = k.permute(1, 2, 3, 0)                                           # [b, np/tp, hd, s]
        v = v.permute(1, 2, 0, 3)                                           # [b, np/tp, s, hd]
        scores = torch.matmul(q, k)                                         # [b, np/tp, s, s]
        probs = self.softmax(scores, None)                                  # [b, np/tp, s, s]
        with self.tracker.fork():  # heads differ per TP rank: per-rank dropout stream
            probs = self.attention_dropout(probs)
        context = torch.matmul(probs, v)                                    # [b, np/tp, s, hd]
        return context.permute(2, 0, 1, 3).reshape(s, b, n * d)            # [s, b, h/tp]

    def flash_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """torch's scaled_dot_product_attention: flash / memory-efficient kernels on GPU, no [s, s] scores kept."""
        s, b, n, d = q.shape                                                # [s, b, np/tp, hd]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))                # [b, np/tp, s, hd]
        dropout = self.attention_dropout.p if self.training else 0.0
        with self.tracker.fork():  # heads differ per TP rank: per-rank dropout stream
            context = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                     scale=self.softmax.scale)   # [b, np/tp, s, hd]
        return context.permute(2, 0, 1, 3).reshape(s, b, n * d)            # [s, b, h/tp]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.linear_qkv(x)                                         # [s, b, 3h/tp]
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, self.heads_per_rank, 3 * self.head_dim)        # [s, b, np/tp, 3hd]
        q, k, v = qkv.split(self.head_dim, dim=-1)                          # 3 x [s, b, np/tp, hd]
        if self.selective_recompute and self.training:
            context = tp_random.checkpoint(self.core_attention, self.tracker, q, k, v)
        else:
            context = self.core_attention(q, k, v)
        out, _ = self.linear_proj(context)                                  # [s, b, h] (or [s/tp, b, h] with SP)
        return out


class ParallelMLP(nn.Module):
    """GELU MLP of width 4h: first GEMM column-split, second row-split (one all-reduce in forward)."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, prefix: str, seed: int, sequence_parallel: bool,
                 device, dtype) -> None:
        super().__init__()
        h, f = cfg.hidden_size, cfg.ffn_size
        out_std = cfg.init_method_std / math.sqrt(2.0 * cfg.num_layers)
        self.linear_fc1 = ColumnParallelLinear(
            h, f, ps.tp_group, init_method=seeded_normal_init(seed, prefix + "linear_fc1.weight", cfg.init_method_std),
            sequence_parallel=sequence_parallel, params_dtype=dtype, device=device)
        self.linear_fc2 = RowParallelLinear(
            f, h, ps.tp_group, init_method=seeded_normal_init(seed, prefix + "linear_fc2.weight", out_std),
            input_is_parallel=True, sequence_parallel=sequence_parallel, params_dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.linear_fc1(x)                                      # [s, b, 4h/tp]
        hidden = F.gelu(hidden, approximate="tanh")                         # GPT-2's gelu_new
        out, _ = self.linear_fc2(hidden)                                    # [s, b, h] (or [s/tp, b, h] with SP)
        return out


class TransformerLayer(nn.Module):
    """Pre-LayerNorm block: x + drop(attn(ln(x))), then x + drop(mlp(ln(x)))."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, layer_number: int, seed: int, sequence_parallel: bool,
                 tracker: tp_random.RNGStatesTracker, device=None, dtype=torch.float32) -> None:
        super().__init__()
        prefix = f"decoder.layers.{layer_number}."
        self.sequence_parallel = sequence_parallel
        self.tracker = tracker
        self.full_recompute = cfg.recompute_granularity == "full"
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.layernorm_epsilon, sequence_parallel, device, dtype)
        self.self_attention = ParallelAttention(cfg, ps, prefix + "self_attention.", seed, sequence_parallel,
                                                tracker, device, dtype)
        self.pre_mlp_layernorm = LayerNorm(cfg.hidden_size, cfg.layernorm_epsilon, sequence_parallel, device, dtype)
        self.mlp = ParallelMLP(cfg, ps, prefix + "mlp.", seed, sequence_parallel, device, dtype)
        self.hidden_dropout = nn.Dropout(cfg.hidden_dropout)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sequence_parallel:  # replicated activations: same mask on every TP rank
            return self.hidden_dropout(x)
        with self.tracker.fork():  # sequence-split activations: each TP rank holds different tokens
            return self.hidden_dropout(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._dropout(self.self_attention(self.input_layernorm(x)))   # [s, b, h]
        return x + self._dropout(self.mlp(self.pre_mlp_layernorm(x)))          # [s, b, h]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.full_recompute and self.training:
            return tp_random.checkpoint(self._forward, self.tracker, x)
        return self._forward(x)
