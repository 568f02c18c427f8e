"""Helpers for model-equivalence tests: tiny configs, deterministic batches, gathering TP shards."""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from megagpt.config import ModelConfig
from megagpt.model.transformer import glu_canonical_order, is_glu_fc1
from megagpt.parallel.param_tags import is_tensor_parallel, tp_split_dim


PRETRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "pretrain_gpt.py")


def tiny_cli(global_batch_size: int, train_iters: int) -> list[str]:
    """Command line of examples/pretrain_gpt.py for a 2-layer h=64 GPT on mock byte tokens, dropout off, one
    thread, logging every iteration."""
    return [sys.executable, PRETRAIN, "--mock-data", "--tokenizer-type", "ByteTokenizer", "--num-layers", "2",
            "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32", "--max-position-embeddings",
            "32", "--micro-batch-size", "2", "--global-batch-size", str(global_batch_size), "--train-iters",
            str(train_iters), "--eval-iters", "0", "--log-interval", "1", "--hidden-dropout", "0",
            "--attention-dropout", "0", "--num-threads", "1"]


def tiny_model_config(**overrides) -> ModelConfig:
    """4 layers, h=64, 4 heads, vocab 500 (padded to 512 for TP 1, 2 and 4), dropout off."""
    base = dict(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=16, max_position_embeddings=16,
                vocab_size=500, hidden_dropout=0.0, attention_dropout=0.0)
    base.update(overrides)
    return ModelConfig(**base)


def batch(seed: int, batch_size: int, seq_length: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, vocab, (batch_size, seq_length + 1), generator=g)
    return text[:, :-1].contiguous(), text[:, 1:].contiguous()


def gather_tp(tensor: torch.Tensor, param: torch.nn.Parameter, group, glu: bool = False) -> torch.Tensor:
    """The full tensor of a TP-split parameter (or the tensor itself when replicated); `glu`: SwiGLU's fc1, whose
    TP shards are each `[gate_r | up_r]`, is returned in the single-rank order `[gate | up]`."""
    if not is_tensor_parallel(param) or dist.get_world_size(group) == 1:
        return tensor.detach().clone()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.detach().contiguous(), group=group)
    full = torch.cat(parts, dim=tp_split_dim(param))
    return glu_canonical_order(full, len(parts)) if glu else full


def full_state(model: torch.nn.Module, group, grads: bool = False) -> dict[str, torch.Tensor]:
    """name -> full (TP-gathered, single-rank order) parameter or gradient."""
    out = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p
        if grads and t is None:
            t = torch.zeros_like(p)
        out[name] = gather_tp(t, p, group, glu=is_glu_fc1(name, model.cfg))
    return out
