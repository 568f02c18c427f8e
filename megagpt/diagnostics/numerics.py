"""Numerical guardrails: NaN/Inf in the loss or gradients, loss spikes, and DP replicas that drifted apart.

`StepGuard` is called by the optimizer after the backward and the gradient reduction, before the update
(optim/builder.py `step(accept=...)`), so a bad step can still be dropped. Every rank contributes its verdict to
one small all-reduce over the world, so all ranks take the same branch (a rank that skipped the update alone would
silently fork its replica). The expensive part, naming the ranks and the first parameters, runs only when something
is wrong. Under --fp16 the gradients are loss-scaled and overflow is the scaler's business, so only the loss is
checked there.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Optional

import torch

from megagpt.diagnostics.ledger import LEDGER
from megagpt.parallel import comm
from megagpt.parallel.state import ParallelState

NAME_BYTES = 240     # per rank in the failure report: its first affected parameter names


class NumericalAbort(Exception):
    """A NaN/Inf or diverged replica under the abort policy: nothing is saved, the run exits non-zero."""


def nonfinite_names(named_grads: list[tuple[str, Optional[torch.Tensor]]], limit: int = 3) -> list[str]:
    """The first `limit` parameters whose gradient holds a NaN or Inf (fast path: one fused norm over all)."""
    grads = [g for _, g in named_grads if g is not None]
    if not grads or bool(torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(grads)]).sum())):
        return []   # a finite sum of norms: no NaN/Inf anywhere (an overflowing sum falls through to the exact check)
    return [n for n, g in named_grads if g is not None and not bool(torch.isfinite(g).all())][:limit]


class StepGuard:
    """--check-for-nan-in-loss-and-grad / --on-nan and --check-for-spiky-loss / --on-spike, judged per step."""

    def __init__(self, ps: ParallelState, device: torch.device, check_nan: bool, check_grads: bool, on_nan: str,
                 spike_factor: Optional[float], on_spike: str, reporter: bool) -> None:
        self.ps, self.device, self.reporter = ps, device, reporter
        self.check_nan, self.check_grads, self.on_nan = check_nan, check_grads, on_nan
        self.spike_factor, self.on_spike = spike_factor, on_spike
        self.history: deque[tuple[int, float]] = deque(maxlen=100)   # (iteration, loss) of accepted steps
        self.nan_iterations: list[int] = []
        self.spike_iterations: list[int] = []
        self.rollback_at: Optional[int] = None    # --on-spike rollback: the spike iteration, until the loop acts

    def _say(self, line: str) -> None:
        if self.reporter:
            print(line, flush=True)

    def __call__(self, loss: float, named_grads: list[tuple[str, Optional[torch.Tensor]]]) -> bool:
        """True: apply the update. False: drop it (skip policies). Raises NumericalAbort (--on-nan abort)."""
        # The loss is computed on the last stage and broadcast to the others: only its origin is named.
        bad_loss = self.check_nan and not math.isfinite(loss) and self.ps.is_last_stage
        bad_names = nonfinite_names(named_grads) if self.check_nan and self.check_grads else []
        verdict = torch.tensor([float(bad_loss), float(bool(bad_names)), loss if math.isfinite(loss) else 0.0],
                               dtype=torch.float64, device=self.device)
        comm.all_reduce(verdict, None)       # world: every rank takes the same branch
        iteration = LEDGER.iteration
        if verdict[0] > 0 or verdict[1] > 0:
            return self._nan(iteration, bad_loss, bad_names)
        mean = float(verdict[2]) / self.ps.world_size   # every rank of a replica holds its loss: mean over DP
        if self.spike_factor is not None and self.history:
            reference = sum(loss for _, loss in self.history) / len(self.history)
            if mean > self.spike_factor * reference:
                return self._spike(iteration, mean, reference)
        self.history.append((iteration, mean))
        return True

    def forget_after(self, iteration: int) -> None:
        """After a rollback to `iteration`: the spike reference is what it was then."""
        kept = [(i, loss) for i, loss in self.history if i <= iteration]
        self.history.clear()
        self.history.extend(kept)
        self.rollback_at = None

    def _nan(self, iteration: int, bad_loss: bool, bad_names: list[str]) -> bool:
        self.nan_iterations.append(iteration)
        parts = (["loss"] if bad_loss else []) + (["grads: " + ", ".join(bad_names)] if bad_names else [])
        texts = [t.decode(errors="replace") for t in
                 comm.all_gather_bytes("; ".join(parts).encode()[:NAME_BYTES], None, self.device)]
        loss_ranks = [r for r, t in enumerate(texts) if t.startswith("loss")]
        grad_ranks = [r for r, t in enumerate(texts) if "grads:" in t]
        firsts = "; ".join(f"rank {r}: {t.split('grads: ', 1)[1]}" for r, t in enumerate(texts) if "grads:" in t)
        action = "aborting (nothing saved)" if self.on_nan == "abort" else "skipping the update (--on-nan skip)"
        message = (f"NaN/Inf detected at iteration {iteration}: loss computed on rank(s) {loss_ranks}, gradients on rank(s) "
                   f"{grad_ranks}" + (f"; first parameters: {firsts}" if firsts else "") + f"; {action}")
        self._say(f" megagpt guardrail: {message}")
        if self.on_nan == "abort":
            raise NumericalAbort(message)
        return False

    def _spike(self, iteration: int, loss: float, reference: float) -> bool:
        self.spike_iterations.append(iteration)
        message = (f"loss spike at iteration {iteration}: {loss:.6E} > {self.spike_factor:g} x running mean "
                   f"{reference:.6E} of the last {len(self.history)} steps; --on-spike {self.on_spike}")
        self._say(f" megagpt guardrail: {message}")
        if self.on_spike == "warn":
            self.history.append((iteration, loss))
            return True
        if self.on_spike == "rollback":
            self.rollback_at = iteration
        return False


def _param_digest(param: torch.Tensor) -> torch.Tensor:
    """An exact integer digest of a tensor's bits (sum of its words as integers), cheap and device-side."""
    flat = param.detach().contiguous().reshape(-1)
    word = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[flat.element_size()]
    return flat.view(word).sum(dtype=torch.int64).reshape(1)


def replica_mismatch(named_params: list[tuple[str, torch.Tensor]], ps: ParallelState,
                     device: torch.device) -> Optional[str]:
    """None when every DP replica holds bit-identical parameters; else a message naming the diverging rank(s)
    (those that differ from the majority) and their first differing parameter. Collective over the DP group."""
    if ps.dp_size == 1:
        return None
    local = torch.cat([_param_digest(p) for _, p in named_params]).to(device)
    every = torch.empty(local.numel() * ps.dp_size, dtype=torch.int64, device=device)
    comm.all_gather_into(every, local, ps.dp_group)
    rows = every.view(ps.dp_size, -1).cpu()
    keys = [tuple(r.tolist()) for r in rows]
    majority = max(set(keys), key=keys.count)
    odd = [i for i, k in enumerate(keys) if k != majority]
    if not odd:
        return None
    ref = torch.tensor(majority)
    details = []
    for i in odd:
        first = int((rows[i] != ref).nonzero()[0])
        details.append(f"rank {ps.dp_ranks[i]} (first differing parameter {named_params[first][0]})")
    return (f"parameters diverged from their data-parallel replicas {ps.dp_ranks}: " + ", ".join(details))
