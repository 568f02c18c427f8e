"""Optional DeepSpeed backend (`--deepspeed --deepspeed-config ds.json`) for users with existing DeepSpeed configs.

DeepSpeed owns data parallelism here (ZeRO stages 1-3, CPU offload); megagpt supplies the model, the AdamW
param groups (no decay on biases/LayerNorm) and the LR schedule. Batch sizes, gradient accumulation, precision
and clipping are written into the DeepSpeed config from megagpt's flags so the two can never disagree.
Imported only when --deepspeed is given: DeepSpeed is not a dependency of the native path.
"""
from __future__ import annotations

import json
from typing import Optional

import torch
import torch.nn as nn

from megagpt.arguments import Config
from megagpt.optim.lr_schedule import LRScheduler
from megagpt.optim.mixed_precision import uses_weight_decay


def deepspeed_config(config: Config, dp_size: int, num_microbatches: int) -> dict:
    """The user's DeepSpeed JSON with batch, precision and clipping fields taken from megagpt's config."""
    ds: dict = {}
    if config.parallel.deepspeed_config:
        with open(config.parallel.deepspeed_config) as f:
            ds = json.load(f)
    ds.pop("optimizer", None)   # megagpt's AdamW (param groups) and LR schedule are used
    ds.pop("scheduler", None)
    ds.update(train_micro_batch_size_per_gpu=config.train.micro_batch_size,
              gradient_accumulation_steps=num_microbatches, train_batch_size=config.train.global_batch_size,
              gradient_clipping=config.optim.clip_grad)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": config.optim.bf16}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": config.optim.fp16}
    if config.optim.fp16:
        ds["fp16"].setdefault("initial_scale_power", int(torch.log2(torch.tensor(config.optim.initial_loss_scale))))
        ds["fp16"].setdefault("loss_scale_window", config.optim.loss_scale_window)
        ds["fp16"].setdefault("hysteresis", config.optim.hysteresis)
        ds["fp16"].setdefault("min_loss_scale", config.optim.min_loss_scale)
    ds.setdefault("zero_optimization", {"stage": 1})
    return ds


class DeepSpeedTrainer:
    """Runs one optimizer step as DeepSpeed expects: engine(batch) -> engine.backward -> engine.step per micro-batch."""

    def __init__(self, config: Config, model: nn.Module, dp_size: int, num_microbatches: int) -> None:
        import deepspeed  # optional dependency

        o = config.optim
        decay = [p for p in model.parameters() if uses_weight_decay(p)]
        no_decay = [p for p in model.parameters() if not uses_weight_decay(p)]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(config, dp_size, num_microbatches))
        self.scheduler = LRScheduler(self.optimizer, o.lr, o.min_lr, o.lr_warmup_iters,
                                     o.lr_decay_iters or config.train.train_iters, o.lr_decay_style)

    def train_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, bool, Optional[float]]:
        """Mean micro-batch loss of this rank, whether the update was applied, and the grad norm."""
        self.engine.train()
        losses = []
        for tokens, labels in batches:
            loss = self.engine(tokens=tokens, labels=labels).float().mean()   # token mean of this micro-batch
            self.engine.backward(loss)                                         # scaled by 1/accumulation steps
            self.engine.step()                                                 # steps at the boundary only
            losses.append(loss.detach())
        if self.engine.was_step_applied():
            self.scheduler.step()
        norm = self.engine.get_global_grad_norm()
        return float(torch.stack(losses).mean()), bool(self.engine.was_step_applied()), \
            None if norm is None else float(norm)

    @property
    def loss_scale(self) -> float:
        return float(getattr(self.optimizer, "cur_scale", 1.0)) if self.engine.fp16_enabled() else 1.0

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of this rank's model params (DeepSpeed keeps its own, partitioned, grad and optimizer buffers)."""
        params = sum(p.numel() * p.element_size() for p in self.engine.module.parameters())
        return {"params": params}
