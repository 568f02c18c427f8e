"""Rotary position embedding (RoPE, Su et al. 2021) applied to queries and keys, `--position-embedding-type rope`.

Position p rotates each pair of dims (i, j) of a head by the angle p * base^(-2k/rot) of its k-th pair. Which dims
pair up is a storage convention, not a different model:
- rotate-half (Megatron's default, Hugging Face Llama's): pair k is (k, k + rot/2);
- interleaved (`--rotary-interleaved`, RoFormer and Meta's original Llama weights): pair k is (2k, 2k + 1).
A model in one convention equals the other after permuting the q and k rows of each head (hf_llama.py does it).

Why it is tensor- and sequence-parallel safe: the rotation acts per head on the last dim, so a TP rank rotates its
own heads with the same angles; and q, k come out of the QKV column-parallel linear, which has already all-gathered
the sequence under SP, so every rank sees positions 0..s-1 in order (or the per-token position ids of
--reset-position-ids, `[b, s]`, which every rank holds whole). With `--rotary-percent` < 1 only the first
rot = int(head_dim x percent) dims of each head rotate; the rest pass through (Megatron's rule).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from megagpt.config import ModelConfig


# Llama 3.1's RoPE scaling constants (Megatron's apply_rope_scaling defaults; the Hugging Face llama3 rope_type).
LLAMA3_LOW_FREQ_FACTOR, LLAMA3_HIGH_FREQ_FACTOR, LLAMA3_ORIGINAL_CONTEXT = 1.0, 4.0, 8192


def inverse_frequencies(base: float, rot: int) -> torch.Tensor:
    """base^(-2k/rot) for k < rot/2, in fp32, computed as Hugging Face does (so imported Llamas match bit for bit)."""
    return 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.int64).float() / rot))   # [rot/2]


def scaled_inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """The frequencies after the config's RoPE scaling, in Hugging Face's arithmetic: linear divides every frequency
    by the factor (positions / factor); Llama 3.1's divides the low ones (wavelength above original context / low
    factor), keeps the high ones (below original context / high factor) and blends linearly in between."""
    inv = inverse_frequencies(cfg.rotary_base, cfg.rotary_dim)
    if cfg.rotary_seq_len_interpolation_factor:
        return inv / cfg.rotary_seq_len_interpolation_factor
    if not cfg.use_rope_scaling:
        return inv
    factor = cfg.rope_scaling_factor
    wavelen = 2 * math.pi / inv
    low_wavelen = LLAMA3_ORIGINAL_CONTEXT / LLAMA3_LOW_FREQ_FACTOR
    high_wavelen = LLAMA3_ORIGINAL_CONTEXT / LLAMA3_HIGH_FREQ_FACTOR
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (LLAMA3_ORIGINAL_CONTEXT / wavelen - LLAMA3_LOW_FREQ_FACTOR) / (LLAMA3_HIGH_FREQ_FACTOR -
                                                                            LLAMA3_LOW_FREQ_FACTOR)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to `[s, b, heads, d]` tensors; the cos/sin tables (fp32, no parameters) are cached per length."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.rot, self.interleaved = cfg.rotary_dim, cfg.rotary_interleaved
        self.inv_freq = scaled_inverse_frequencies(cfg)                       # plain attribute: not in state_dict
        self._tables: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, s: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[s, 1, 1, rot]` for positions 0..s-1, each angle repeated in the two dims of its pair."""
        key = (s, device)
        if key not in self._tables:
            angles = torch.outer(torch.arange(s, dtype=torch.float32), self.inv_freq)        # [s, rot/2]
            angles = self._pairs(angles)[:, None, None, :].to(device)                        # [s, 1, 1, rot]
            self._tables[key] = (angles.cos(), angles.sin())
        return self._tables[key]

    def position_tables(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[s, b, 1, rot]` for per-token positions `[b, s]` (not cached: they change every batch).
        The angle p * f is the same fp32 product as in `tables`, so position p rotates identically in both."""
        inv_freq = self.inv_freq.to(position_ids.device)
        angles = position_ids.t().float()[..., None] * inv_freq                              # [s, b, rot/2]
        angles = self._pairs(angles)[:, :, None, :]                                          # [s, b, 1, rot]
        return angles.cos(), angles.sin()

    def _pairs(self, angles: torch.Tensor) -> torch.Tensor:
        """Each angle repeated in the two dims of its pair: [..., rot/2] -> [..., rot]."""
        if self.interleaved:
            return angles.repeat_interleave(2, dim=-1)                                        # k k
        return torch.cat((angles, angles), dim=-1)                                            # | k | k |

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        """The pair partner with a sign: (x_i, x_j) -> (-x_j, x_i)."""
        if self.interleaved:
            pairs = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1)                        # [s, b, n, rot/2, 2]
            return pairs.flatten(-2)                                                          # [s, b, n, rot]
        first, second = x.chunk(2, dim=-1)                                                    # 2 x [s, b, n, rot/2]
        return torch.cat((-second, first), dim=-1)                                            # [s, b, n, rot]

    def forward(self, x: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x `[s, b, n, d]` rotated by position (its first rot dims; the rest unchanged): 0..s-1 along s, or
        `position_ids [b, s]` per token."""
        if position_ids is None:
            cos, sin = self.tables(x.size(0), x.device)                                      # [s, 1, 1, rot]
        else:
            cos, sin = self.position_tables(position_ids)                                    # [s, b, 1, rot]
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        rotated, passed = x[..., :self.rot], x[..., self.rot:]                                # [s, b, n, rot], rest
        rotated = rotated * cos + self._rotate(rotated) * sin                                 # [s, b, n, rot]
        return torch.cat((rotated, passed), dim=-1) if passed.numel() else rotated            # [s, b, n, d]
