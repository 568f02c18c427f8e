"""TP-aware random streams and activation checkpointing that replays them.

Dropout must agree across TP ranks on replicated activations (e.g. the residual stream) and differ on
TP-split activations (e.g. attention probabilities of different heads), else TP > 1 would train a different
model from TP = 1's point of view on replicated tensors, or correlate masks across heads on split ones.
`model_parallel_seed` therefore seeds the device's default generator identically on the TP ranks of a
pipeline stage and registers a per-TP-rank "model-parallel-rng" stream, entered with `tracker.fork()`.

Generator state is read and written on the tracker's device only: torch.get/set_rng_state on CPU, the
torch.cuda equivalents on CUDA (never called for a CPU device).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Union

import torch

MODEL_PARALLEL_RNG = "model-parallel-rng"
Device = Union[str, torch.device]


def get_rng_state(device: torch.device) -> torch.Tensor:
    """State of the default generator that random ops on `device` draw from."""
    if device.type == "cpu":
        return torch.get_rng_state()
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    raise NotImplementedError(f"RNG state tracking is implemented for cpu and cuda, not {device}")


def set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    """Restore the default generator of `device` to `state` (from get_rng_state)."""
    if device.type == "cpu":
        torch.set_rng_state(state)
    elif device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        raise NotImplementedError(f"RNG state tracking is implemented for cpu and cuda, not {device}")


def _seeded_state(seed: int, device: torch.device) -> torch.Tensor:
    """Generator state for `seed` on `device`, built on a private generator so no global state is touched."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator.get_state()


class RNGStatesTracker:
    """Named RNG streams on one device; `fork(name)` swaps a stream into the device's default generator."""

    def __init__(self, device: Device = "cpu") -> None:
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Forget every stream."""
        self._states: dict[str, torch.Tensor] = {}
        self._seeds: set[int] = set()

    def add(self, name: str, seed: int) -> None:
        """Register stream `name` starting from `seed` (names and seeds must be unique)."""
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists")
        if seed in self._seeds:
            raise ValueError(f"seed {seed} is already used by another RNG stream")
        self._seeds.add(seed)
        self._states[name] = _seeded_state(seed, self.device)

    def get_states(self) -> dict[str, torch.Tensor]:
        """Copy of every stream's state (for checkpoints and for activation-recompute replay)."""
        return {name: state.clone() for name, state in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        """Replace every stream's state by `states` (from get_states); seeds are kept."""
        self._states = {name: state.clone() for name, state in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Run the block with stream `name` as the device's default generator, then put the default back."""
        if name not in self._states:
            raise KeyError(f"RNG stream {name!r} was never added (known: {sorted(self._states)})")
        outside = get_rng_state(self.device)
        set_rng_state(self._states[name], self.device)
        try:
            yield
        finally:
            self._states[name] = get_rng_state(self.device)
            set_rng_state(outside, self.device)


def model_parallel_seed(seed: int, tp_rank: int, pp_rank: int, device: Device) -> RNGStatesTracker:
    """Seed the default generator of `device` and return a tracker holding the model-parallel stream.

    Default generator: `seed + 100 * pp_rank`, the same on every TP rank of a stage (replicated regions agree).
    "model-parallel-rng": `seed + 2718 + tp_rank + 100 * pp_rank`, different per TP rank (TP-split regions).
    """
    device = torch.device(device)
    stage_seed = seed + 100 * pp_rank
    torch.default_generator.manual_seed(stage_seed)  # CPU generator: also drives CPU-side randomness on GPUs
    if device.type == "cuda":
        torch.cuda.manual_seed(stage_seed)
    tracker = RNGStatesTracker(device)
    tracker.add(MODEL_PARALLEL_RNG, seed + 2718 + tp_rank + 100 * pp_rank)
    return tracker


class _CheckpointFunction(torch.autograd.Function):
    """Run `function` without keeping activations; recompute it in backward under the forward's RNG states."""

    @staticmethod
    def forward(ctx, function, tracker, num_args, *args):
        ctx.function, ctx.tracker = function, tracker
        ctx.cpu_state = torch.get_rng_state()
        ctx.device_state = get_rng_state(tracker.device) if tracker.device.type != "cpu" else None
        ctx.tracker_states = tracker.get_states()
        ctx.tensor_positions = [i for i, a in enumerate(args) if torch.is_tensor(a)]
        ctx.other_args = {i: a for i, a in enumerate(args) if not torch.is_tensor(a)}
        ctx.num_args = num_args
        ctx.save_for_backward(*(args[i] for i in ctx.tensor_positions))
        with torch.no_grad():
            return function(*args)

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        inputs: list[Any] = [None] * ctx.num_args
        for i, a in ctx.other_args.items():
            inputs[i] = a
        for i, t in zip(ctx.tensor_positions, saved):
            inputs[i] = t.detach().requires_grad_(t.requires_grad)
        tracker, device = ctx.tracker, ctx.tracker.device

        # Replay the forward's random streams, then put back the states the backward pass was at.
        now_cpu = torch.get_rng_state()
        now_device = get_rng_state(device) if ctx.device_state is not None else None
        now_tracker = tracker.get_states()
        torch.set_rng_state(ctx.cpu_state)
        if ctx.device_state is not None:
            set_rng_state(ctx.device_state, device)
        tracker.set_states(ctx.tracker_states)
        try:
            with torch.enable_grad():
                outputs = ctx.function(*inputs)
        finally:
            torch.set_rng_state(now_cpu)
            if now_device is not None:
                set_rng_state(now_device, device)
            tracker.set_states(now_tracker)

        outputs = (outputs,) if torch.is_tensor(outputs) else tuple(outputs)
        pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        input_grads = tuple(a.grad if torch.is_tensor(a) and a.requires_grad else None for a in inputs)
        return (None, None, None) + input_grads


def checkpoint(function: Callable[..., Any], tracker: RNGStatesTracker, *args: Any) -> Any:
    """Activation checkpointing: `function(*args)` keeps no activations and is recomputed during backward.

    The CPU generator, the tracker device's default generator and all tracker streams are saved at forward and
    restored for the recompute, so dropout draws the same masks; afterwards the states the backward pass had
    reached are put back. Outputs are a tensor or a tuple of tensors.

    Parameters used inside `function` receive gradients only through tensor inputs that require grad (the
    autograd node exists only then), so at least one tensor argument must require grad when grad is enabled.
    """
    if not torch.is_grad_enabled():
        return function(*args)
    if not any(torch.is_tensor(a) and a.requires_grad for a in args):
        raise ValueError("checkpoint() needs at least one tensor argument that requires grad; otherwise the "
                         "parameters inside the checkpointed function would silently get no gradient")
    return _CheckpointFunction.apply(function, tracker, len(args), *args)
