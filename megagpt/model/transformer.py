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
from megagpt.model.norms import build_norm
from megagpt.model.rotary import RotaryEmbedding
from megagpt.model.softmax import FusedScaleMaskSoftmax
from megagpt.parallel import random as tp_random
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
        generator = torch.Generator(device=master.device).manual_seed(key)   # the master's device (layers.py)
        target = master if rows is None else master[:rows]
        values = torch.empty(target.shape, dtype=torch.float32, device=master.device).normal_(0.0, std,
                                                                                    generator=generator)
        master.zero_()
        target.copy_(values)

    return init


def glu_tp_order(t: torch.Tensor, tp: int) -> torch.Tensor:
    """SwiGLU's fc1 rows from the canonical `[gate | up]` (TP=1) to the order TP ranks hold them,
    `[gate_0 up_0 | gate_1 up_1 | ...]`, so a contiguous split gives each rank its matching halves."""
    return t.reshape(2, tp, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)          # [2f, ...]


def glu_canonical_order(t: torch.Tensor, tp: int) -> torch.Tensor:
    """The inverse of `glu_tp_order`: TP-concatenated fc1 rows back to `[gate | up]`."""
    return t.reshape(tp, 2, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)          # [2f, ...]


def is_glu_fc1(name: str, cfg: ModelConfig) -> bool:
    """Whether parameter `name` holds SwiGLU's fused `[gate | up]` rows (its TP shards need glu_*_order)."""
    return cfg.swiglu and name.rsplit(".", 2)[-2:-1] == ["linear_fc1"]


def _in_glu_tp_order(init: InitMethod, tp: int) -> InitMethod:
    """Fill the canonical `[gate | up]` master, then reorder it for a TP split (every TP size: the same model)."""
    def fill(master: torch.Tensor) -> None:
        init(master)
        master.copy_(glu_tp_order(master, tp))
    return fill


def document_mask(document_ids: torch.Tensor, flash: bool) -> torch.Tensor:
    """Document-causal attention (--reset-attention-mask) as `[b, 1, s, s]` for the attention backend, built once per
    micro-batch: for scaled_dot_product_attention (`flash`) True = attend (causal and same document); for
    FusedScaleMaskSoftmax True = masked out (another document; its causal mask adds the future). Every token sees
    itself, so no row is empty (no NaN)."""
    query, key = document_ids[:, None, :, None], document_ids[:, None, None, :]   # [b, 1, s, 1], [b, 1, 1, s]
    if not flash:
        return query != key                                                     # [b, 1, s, s]
    s = document_ids.size(1)
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril_()   # [s, s]
    return (query == key) & causal                                                # [b, 1, s, s]


class ParallelAttention(nn.Module):
    """Causal self-attention with heads split across TP ranks (QKV column-split, output row-split).

    Grouped-query attention: G key/value heads, each shared by n/G query heads (G = n is multi-head attention).
    linear_qkv's rows are grouped per query group, `[q_g0 (n/G heads) k_g0 v_g0 | q_g1 ... | ...]`, so a contiguous
    TP split gives each rank whole groups (config.variant_problems refuses G % TP != 0); for G = n this is the
    per-head grouping `[q_h0 k_h0 v_h0 | ...]` GPT-2 checkpoints have always used."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, prefix: str, seed: int, sequence_parallel: bool,
                 tracker: tp_random.RNGStatesTracker, device, dtype) -> None:
        super().__init__()
        h, heads, groups = cfg.hidden_size, cfg.num_attention_heads, cfg.query_groups
        self.heads_per_rank, self.groups_per_rank = heads // ps.tp_size, groups // ps.tp_size
        self.q_per_group = heads // groups
        self.head_dim = cfg.head_dim
        self.tracker = tracker
        self.selective_recompute = cfg.recompute_granularity == "selective"
        out_std = cfg.init_method_std / math.sqrt(2.0 * cfg.num_layers)
        self.linear_qkv = ColumnParallelLinear(
            h, cfg.qkv_size, ps.tp_group, bias=cfg.qkv_bias,
            init_method=seeded_normal_init(seed, prefix + "linear_qkv.weight", cfg.init_method_std),
            sequence_parallel=sequence_parallel, params_dtype=dtype, device=device)
        self.linear_proj = RowParallelLinear(
            h, h, ps.tp_group, bias=cfg.add_bias_linear,
            init_method=seeded_normal_init(seed, prefix + "linear_proj.weight", out_std),
            input_is_parallel=True, sequence_parallel=sequence_parallel, params_dtype=dtype, device=device)
        if cfg.qk_layernorm:   # replicated over TP but sees only this rank's heads: grads summed over TP
            self.q_layernorm = build_norm(cfg, self.head_dim, ps.tp_size > 1, device, dtype)
            self.k_layernorm = build_norm(cfg, self.head_dim, ps.tp_size > 1, device, dtype)
        self.qk_layernorm = cfg.qk_layernorm
        self.rotary = RotaryEmbedding(cfg) if cfg.position_embedding_type == "rope" else None
        self.flash = cfg.attention_core == "flash"
        self.softmax = FusedScaleMaskSoftmax("causal", scale=1.0 / math.sqrt(self.head_dim),
                                             softmax_in_fp32=cfg.attention_softmax_in_fp32,
                                             masked_softmax_fusion=cfg.masked_softmax_fusion
                                             and cfg.attention_core == "fused")
        self.attention_dropout = nn.Dropout(cfg.attention_dropout)

    def core_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q `[s, b, np/tp, hd]`, k and v `[s, b, ng/tp, hd]` -> context `[s, b, h/tp]`; `mask`: document_mask's
        `[b, 1, s, s]` for this backend, None = causal only."""
        if self.flash:
            return self.flash_attention(q, k, v, mask)
        if self.q_per_group > 1:   # each key/value head serves its group's n/G consecutive query heads
            k = k.repeat_interleave(self.q_per_group, dim=2)                # [s, b, np/tp, hd]
            v = v.repeat_interleave(self.q_per_group, dim=2)                # [s, b, np/tp, hd]
        s, b, n, d = q.shape                                                # [s, b, np/tp, hd]
        q = q.permute(1, 2, 0, 3)                                           # [b, np/tp, s, hd]
        k = k.permute(1, 2, 3, 0)                                           # [b, np/tp, hd, s]
        v = v.permute(1, 2, 0, 3)                                           # [b, np/tp, s, hd]
        scores = torch.matmul(q, k)                                         # [b, np/tp, s, s]
        probs = self.softmax(scores, mask)                                  # [b, np/tp, s, s]
        with self.tracker.fork():  # heads differ per TP rank: per-rank dropout stream
            probs = self.attention_dropout(probs)
        context = torch.matmul(probs, v)                                    # [b, np/tp, s, hd]
        return context.permute(2, 0, 1, 3).reshape(s, b, n * d)            # [s, b, h/tp]

    def flash_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """torch's scaled_dot_product_attention: flash / memory-efficient kernels on GPU, no [s, s] scores kept;
        grouped-query attention through its enable_gqa (no copies of k and v). Causal through is_causal (the flash
        kernel) unless a document mask is given (True = attend; the memory-efficient kernel takes it)."""
        s, b, n, d = q.shape                                                # [s, b, np/tp, hd]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))                # [b, np/tp or ng/tp, s, hd]
        dropout = self.attention_dropout.p if self.training else 0.0
        with self.tracker.fork():  # heads differ per TP rank: per-rank dropout stream
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                     is_causal=mask is None, scale=self.softmax.scale,
                                                     enable_gqa=self.q_per_group > 1)   # [b, np/tp, s, hd]
        return context.permute(2, 0, 1, 3).reshape(s, b, n * d)            # [s, b, h/tp]

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x `[s, b, h]` (`[s/tp, b, h]` with SP); `mask`: see core_attention; `position_ids [b, s]`: RoPE angles per
        token (--reset-position-ids), None = 0..s-1."""
        qkv, _ = self.linear_qkv(x)                                         # [s, b, (np+2ng)hd/tp]
        s, b = qkv.shape[:2]
        d = self.head_dim
        qkv = qkv.view(s, b, self.groups_per_rank, (self.q_per_group + 2) * d)   # [s, b, ng/tp, (np/ng+2)hd]
        q, k, v = qkv.split([self.q_per_group * d, d, d], dim=-1)          # [s, b, ng/tp, np/ng*hd], 2x [.., hd]
        q = q.reshape(s, b, self.heads_per_rank, d)                         # [s, b, np/tp, hd]
        if self.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)                 # normalised over hd
        if self.rotary is not None:
            q, k = self.rotary(q, position_ids), self.rotary(k, position_ids)   # rotated by position
        if self.selective_recompute and self.training:
            context = tp_random.checkpoint(self.core_attention, self.tracker, q, k, v, mask)
        else:
            context = self.core_attention(q, k, v, mask)
        out, _ = self.linear_proj(context)                                  # [s, b, h] (or [s/tp, b, h] with SP)
        return out


class ParallelMLP(nn.Module):
    """GELU MLP (GPT-2) or SwiGLU (`--swiglu`, Llama): first GEMM column-split, second row-split (one all-reduce
    in forward). SwiGLU's gate and up projections are one fused fc1 whose rows each TP rank holds as its
    `[gate_r | up_r]` (see glu_tp_order), so the product silu(gate) * up needs no communication."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, prefix: str, seed: int, sequence_parallel: bool,
                 device, dtype) -> None:
        super().__init__()
        h, f = cfg.hidden_size, cfg.ffn_size
        out_std = cfg.init_method_std / math.sqrt(2.0 * cfg.num_layers)
        self.swiglu = cfg.swiglu
        fc1_init = seeded_normal_init(seed, prefix + "linear_fc1.weight", cfg.init_method_std)
        self.linear_fc1 = ColumnParallelLinear(
            h, 2 * f if self.swiglu else f, ps.tp_group, bias=cfg.add_bias_linear,
            init_method=_in_glu_tp_order(fc1_init, ps.tp_size) if self.swiglu else fc1_init,
            sequence_parallel=sequence_parallel, params_dtype=dtype, device=device)
        self.linear_fc2 = RowParallelLinear(
            f, h, ps.tp_group, bias=cfg.add_bias_linear,
            init_method=seeded_normal_init(seed, prefix + "linear_fc2.weight", out_std),
            input_is_parallel=True, sequence_parallel=sequence_parallel, params_dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.linear_fc1(x)                                      # [s, b, f/tp] ([s, b, 2f/tp] SwiGLU)
        if self.swiglu:
            gate, up = hidden.chunk(2, dim=-1)                              # 2 x [s, b, f/tp]
            hidden = F.silu(gate) * up                                      # [s, b, f/tp]
        else:
            hidden = F.gelu(hidden, approximate="tanh")                     # GPT-2's gelu_new
        out, _ = self.linear_fc2(hidden)                                    # [s, b, h] (or [s/tp, b, h] with SP)
        return out


class TransformerLayer(nn.Module):
    """Pre-norm block: x + drop(attn(norm(x))), then x + drop(mlp(norm(x)))."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, layer_number: int, seed: int, sequence_parallel: bool,
                 tracker: tp_random.RNGStatesTracker, device=None, dtype=torch.float32) -> None:
        super().__init__()
        prefix = f"decoder.layers.{layer_number}."
        self.sequence_parallel = sequence_parallel
        self.tracker = tracker
        self.full_recompute = cfg.recompute_granularity == "full"
        self.input_layernorm = build_norm(cfg, cfg.hidden_size, sequence_parallel, device, dtype)
        self.self_attention = ParallelAttention(cfg, ps, prefix + "self_attention.", seed, sequence_parallel,
                                                tracker, device, dtype)
        self.pre_mlp_layernorm = build_norm(cfg, cfg.hidden_size, sequence_parallel, device, dtype)
        self.mlp = ParallelMLP(cfg, ps, prefix + "mlp.", seed, sequence_parallel, device, dtype)
        self.hidden_dropout = nn.Dropout(cfg.hidden_dropout)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sequence_parallel:  # replicated activations: same mask on every TP rank
            return self.hidden_dropout(x)
        with self.tracker.fork():  # sequence-split activations: each TP rank holds different tokens
            return self.hidden_dropout(x)

    def _forward(self, x: torch.Tensor, mask: Optional[torch.Tensor],
                 position_ids: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self._dropout(self.self_attention(self.input_layernorm(x), mask, position_ids))   # [s, b, h]
        return x + self._dropout(self.mlp(self.pre_mlp_layernorm(x)))                          # [s, b, h]

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x `[s, b, h]`; `mask` and `position_ids` as ParallelAttention.forward (None: causal, 0..s-1)."""
        if self.full_recompute and self.training:
            return tp_random.checkpoint(self._forward, self.tracker, x, mask, position_ids)
        return self._forward(x, mask, position_ids)
