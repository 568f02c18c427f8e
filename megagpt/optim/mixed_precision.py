"""Optimizer over fp32 master weights for bf16/fp16/fp32 models, with Megatron's dynamic loss scaler.

Why fp32 masters: Adam updates (lr x m/sqrt(v), ~1e-4 relative) vanish when added to a bf16/fp16 weight, so the
update is applied to an fp32 copy and cast back into the model after each step. In fp32 mode the master *is* the
model parameter (no copy). The fp32 grads come from the grad buffer (`param.main_grad`, grad_buffer.py).

A step: (fp16) unscale the grads by 1/loss_scale and check for inf/NaN, agreed by every rank of the model-parallel
and data-parallel groups; skip the whole step when found (the scaler backs off), else compute the global grad
norm, clip, run the inner torch optimizer, copy masters into the model.

`DistributedOptimizer` (zero.py) reuses this step with sharded masters; the hooks it overrides are `_build_slots`,
`_slot_grad` and `_copy_masters_to_model`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

import torch
from torch import nn

from megagpt.config import OptimConfig, optimizer_problems, raise_if
from megagpt.optim.clip import clip_grads_, get_grad_norm, param_counts_toward_norm, param_grad
from megagpt.parallel import comm
from megagpt.timers import Timers


class ConstantLossScaler:
    """A fixed loss scale (fp16 with --loss-scale); an overflow still skips the step."""

    def __init__(self, scale: float) -> None:
        self.scale = float(scale)

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])


class DynamicLossScaler:
    """Megatron's dynamic grad scaler.

    On an overflow the growth count restarts and the hysteresis count drops; once it reaches 0 the scale is
    multiplied by `backoff_factor` (never below `min_scale`) on that and every further overflow. After
    `growth_interval` consecutive clean steps the scale is multiplied by `growth_factor` and the hysteresis count
    refills.
    """

    def __init__(self, initial_scale: float = 2.0 ** 32, min_scale: float = 1.0, growth_interval: int = 1000,
                 hysteresis: int = 2, backoff_factor: float = 0.5, growth_factor: float = 2.0) -> None:
        if not (initial_scale > 0 and min_scale > 0 and growth_interval > 0 and hysteresis > 0):
            raise ValueError(f"loss scaler needs positive values, got initial_scale={initial_scale}, "
                             f"min_scale={min_scale}, growth_interval={growth_interval}, hysteresis={hysteresis}")
        if not (0 < backoff_factor < 1 < growth_factor):
            raise ValueError(f"need 0 < backoff_factor ({backoff_factor}) < 1 < growth_factor ({growth_factor})")
        self.scale = float(initial_scale)
        self.min_scale = float(min_scale)
        self.growth_interval = growth_interval
        self.hysteresis = hysteresis
        self.backoff_factor = backoff_factor
        self.growth_factor = growth_factor
        self.growth_tracker = 0
        self.hysteresis_tracker = hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                self.scale *= self.growth_factor

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker,
                "hysteresis_tracker": self.hysteresis_tracker}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.hysteresis_tracker = int(state["hysteresis_tracker"])


def build_loss_scaler(config: OptimConfig):
    """None unless fp16 (bf16 and fp32 have fp32's exponent range and need no scaling)."""
    if not config.fp16:
        return None
    if config.loss_scale is not None:
        return ConstantLossScaler(config.loss_scale)
    return DynamicLossScaler(config.initial_loss_scale, config.min_loss_scale, config.loss_scale_window,
                             config.hysteresis)


def uses_weight_decay(param: nn.Parameter) -> bool:
    """Weight decay applies to matrices only: biases and LayerNorm weights (1-D) are not decayed."""
    return param.dim() > 1


@dataclass(eq=False)
class _Slot:
    """One tensor the inner optimizer steps: a whole param (here) or this rank's shard of it (ZeRO)."""

    name: str
    param: nn.Parameter          # the model parameter it belongs to
    master: torch.Tensor         # fp32 tensor stepped by the inner optimizer
    model_view: torch.Tensor     # where the master's values go in the model (same numel, model dtype)
    start: int                   # flat range [start, end) of the param this slot covers
    end: int
    shard: object = None         # ZeRO: the grad_buffer.ShardRange

    @property
    def separate_master(self) -> bool:
        return self.master.data_ptr() != self.model_view.data_ptr() or self.master.dtype != self.model_view.dtype


def build_torch_optimizer(decay: list[torch.Tensor], no_decay: list[torch.Tensor],
                          c: OptimConfig) -> torch.optim.Optimizer:
    """The torch optimizer every path steps with: AdamW (decoupled weight decay on `decay` only) or SGD."""
    # wd_mult: the LR scheduler writes its (possibly scheduled) weight decay times this into each group
    groups = [{"params": decay, "weight_decay": c.weight_decay, "wd_mult": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0}]
    if c.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=c.lr, momentum=c.sgd_momentum)
    # fused: one pass over each tensor (CPU and CUDA kernels); foreach makes ~7 passes with temporaries
    return torch.optim.AdamW(groups, lr=c.lr, betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_eps, fused=True)


class MixedPrecisionOptimizer:
    """AdamW (or SGD) over fp32 masters of a model's params; the non-sharded path (every DP rank steps all).

    `params` are used when `reducer` is None (grads then come from `main_grad` or `.grad`); with a reducer its
    params are used. `param_names` (param -> name) names optimizer state in `state_dict`.
    """

    dp_sharded = False

    def __init__(self, params: Iterable[nn.Parameter], ps, config: OptimConfig, reducer=None,
                 param_names: Optional[Mapping[nn.Parameter, str]] = None, timers: Optional[Timers] = None) -> None:
        raise_if(optimizer_problems(config), "invalid optimizer settings")
        self.ps, self.config, self.reducer = ps, config, reducer
        self.timers = timers or Timers()
        if reducer is not None:
            self.params = list(reducer.params)
        else:
            self.params, seen = [], set()
            for p in params:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    self.params.append(p)
        names = {id(p): n for p, n in (param_names or {}).items()}
        self.names = {id(p): names.get(id(p), f"param_{i}") for i, p in enumerate(self.params)}
        if len(set(self.names.values())) != len(self.params):
            raise ValueError("param_names must give every parameter a distinct name")
        self.grad_scaler = build_loss_scaler(config)
        self.skipped_iterations = 0
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.slots: list[_Slot] = self._build_slots()
        self.optimizer = self._build_inner_optimizer()

    # ---- hooks overridden by the ZeRO optimizer ------------------------------------------------------------
    def _build_slots(self) -> list[_Slot]:
        slots = []
        for p in self.params:
            master = p if p.dtype == torch.float32 else p.detach().to(torch.float32, copy=True)
            slots.append(_Slot(self.names[id(p)], p, master, p.data, 0, p.numel()))
        return slots

    def _slot_grad(self, slot: _Slot) -> Optional[torch.Tensor]:
        g = param_grad(slot.param)
        return None if g is None else g.float()   # main_grad is fp32 already: no copy

    def named_grads(self) -> list[tuple[str, Optional[torch.Tensor]]]:
        """The reduced gradients this rank steps, by parameter name (under ZeRO only its owned shards: the rest of
        the buffer may already be released)."""
        return [(s.name, self._slot_grad(s)) for s in self.slots]

    def _copy_masters_to_model(self) -> None:
        for s in self.slots:
            if s.separate_master:
                s.model_view.copy_(s.master.view_as(s.model_view))

    # ---- shared step -------------------------------------------------------------------------------------
    def _build_inner_optimizer(self) -> torch.optim.Optimizer:
        return build_torch_optimizer([s.master for s in self.slots if uses_weight_decay(s.param)],
                                     [s.master for s in self.slots if not uses_weight_decay(s.param)], self.config)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def loss_scale(self) -> float:
        return self.grad_scaler.scale if self.grad_scaler is not None else 1.0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on (multiplied by the fp16 loss scale)."""
        return loss * self.loss_scale if self.grad_scaler is not None else loss

    def zero_grad(self) -> None:
        if self.reducer is not None:
            self.reducer.zero_grad()
        else:
            for p in self.params:
                p.grad = None
                if getattr(p, "main_grad", None) is not None:
                    p.main_grad.zero_()
        self._drop_master_grads()

    def _drop_master_grads(self) -> None:
        for s in self.slots:      # an fp32 master is the param itself: a stale .grad would alias main_grad
            s.master.grad = None

    def _agree_on(self, flag: torch.Tensor) -> bool:
        """Max of a 0/1 flag over the model-parallel and data-parallel groups: every rank takes the same branch."""
        comm.all_reduce_max(flag, self.ps.mp_group)
        comm.all_reduce_max(flag, self.ps.dp_group)
        return bool(flag.item() > 0)

    @torch.no_grad()
    def step(self) -> tuple[bool, Optional[float], Optional[int]]:
        """One update. Returns (update_successful, grad_norm before clipping, number of zero grads or None).
        Its parts are timed at level 1 under Megatron's optimizer-* names."""
        with self.timers("optimizer-copy-to-main-grad", 1):
            grads: list[torch.Tensor] = []
            for s in self.slots:
                g = self._slot_grad(s)
                if g is None:
                    g = torch.zeros_like(s.master)
                s.master.grad = g.view_as(s.master)
                grads.append(s.master.grad)
        if self.grad_scaler is not None:
            with self.timers("optimizer-unscale-and-check-inf", 1):
                inv_scale = 1.0 / self.grad_scaler.scale
                found = torch.zeros((), dtype=torch.float32, device=self.device)
                for g in grads:
                    g.mul_(inv_scale)
                    found = torch.maximum(found, (~torch.isfinite(g)).any().float())
                found_inf = self._agree_on(found)
            self.grad_scaler.update(found_inf)
            if found_inf:
                self.skipped_iterations += 1
                self._drop_master_grads()
                return False, None, None
        norm_grads = [g for s, g in zip(self.slots, grads) if param_counts_toward_norm(s.param, self.ps)]
        with self.timers("optimizer-clip-main-grad", 1):
            grad_norm = get_grad_norm(self.params, self.ps, grads_for_norm=norm_grads, dp_sharded=self.dp_sharded)
            if self.config.clip_grad > 0:
                clip_grads_(grads, self.config.clip_grad, grad_norm)
        num_zeros = None
        if self.config.log_num_zeros_in_grad:
            with self.timers("optimizer-count-zeros", 1):
                num_zeros = self._count_zeros(norm_grads)
        with self.timers("optimizer-inner-step", 1):
            self.optimizer.step()
        with self.timers("optimizer-copy-main-to-model-params", 1):
            self._drop_master_grads()
            self._copy_masters_to_model()
        return True, grad_norm, num_zeros

    def _count_zeros(self, grads: list[torch.Tensor]) -> int:
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for g in grads:
            total += (g == 0).sum()
        comm.all_reduce(total, self.ps.mp_group)
        if self.dp_sharded:
            comm.all_reduce(total, self.ps.dp_group)
        return int(total.item())

    # ---- introspection and checkpoints -------------------------------------------------------------------
    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for params, grads and optimizer state (fp32 masters + moments), from the tensors."""
        def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
            storages = {}
            for t in tensors:
                st = t.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
            return sum(storages.values())
        params = unique_bytes(p for p in self.params)
        if self.reducer is not None:
            grads = self.reducer.grad_bytes()
        else:
            grads = unique_bytes(g for g in (param_grad(p) for p in self.params) if g is not None)
        masters = unique_bytes(s.master for s in self.slots if s.separate_master)
        state = unique_bytes(v for st in self.optimizer.state.values() for v in st.values()
                             if isinstance(v, torch.Tensor))
        return {"params": params, "grads": grads, "optimizer": masters + state}

    def state_dict(self) -> dict:
        """Optimizer state keyed by parameter name: fp32 masters (bf16/fp16 only) and moments of each slot."""
        inner = self.optimizer.state_dict()
        index = {id(s.master): i for i, s in enumerate(self._slots_in_group_order())}
        param_state, layout = {}, {}
        for s in self.slots:
            entry = {k: v for k, v in inner["state"].get(index[id(s.master)], {}).items()}
            if s.separate_master:
                entry["master"] = s.master.detach().clone()
            param_state[s.name] = entry
            layout[s.name] = {"shape": list(s.param.shape), "start": s.start, "end": s.end}
        return {"param_state": param_state, "shard_layout": layout,
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in inner["param_groups"]],
                "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
                "skipped_iterations": self.skipped_iterations}

    def _slots_in_group_order(self) -> list[_Slot]:
        by_master = {id(s.master): s for s in self.slots}
        return [by_master[id(t)] for g in self.optimizer.param_groups for t in g["params"]]

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()` of the same layout (names, and ZeRO ranges, must match)."""
        layout = state["shard_layout"]
        for s in self.slots:
            saved = layout.get(s.name)
            if saved is None or (saved["start"], saved["end"]) != (s.start, s.end) \
                    or list(saved["shape"]) != list(s.param.shape):
                raise ValueError(f"optimizer state of {s.name!r} does not match this layout: saved {saved}, "
                                 f"here shape {list(s.param.shape)} range [{s.start}, {s.end})")
        if len(layout) != len(self.slots):
            raise ValueError(f"optimizer state has {len(layout)} entries, this rank has {len(self.slots)}")
        inner = self.optimizer.state_dict()
        inner["state"] = {}
        for i, s in enumerate(self._slots_in_group_order()):
            entry = dict(state["param_state"][s.name])
            master = entry.pop("master", None)
            if master is not None and s.separate_master:
                with torch.no_grad():
                    s.master.copy_(master.view_as(s.master))
            if entry:
                inner["state"][i] = entry
        for group, saved in zip(inner["param_groups"], state["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.optimizer.load_state_dict(inner)
        if self.grad_scaler is not None and state.get("grad_scaler") is not None:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.skipped_iterations = int(state.get("skipped_iterations", 0))
