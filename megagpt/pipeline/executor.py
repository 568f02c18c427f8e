"""Run a pipeline schedule on real tensors: the forward/backward passes of one training or evaluation step.

The executor knows no model. The caller supplies ``forward_step(chunk, microbatch, input_tensor)`` that runs
its model chunk on one micro-batch; the executor builds the schedule (no pipelining when PP == 1, 1F1B,
interleaved 1F1B, ZB-H1 or ZB-V), moves tensors between stages with `p2p.exchange`, and runs backward. The
caller does not know which schedule ran: gradients accumulate into the parameters the same way.

Tensors live in five places, keyed by (micro-batch, chunk), and each is dropped as soon as it is used, so
the memory held is what the schedule allows (at most PP - rank micro-batches in flight for 1F1B):
received inputs waiting for their forward, received output gradients waiting for their backward, outputs
and input gradients waiting for their send, (input, output) pairs kept for backward, and, between a split
backward's B and W, the weight-gradient work B queued (the linear layers' inputs and output gradients, see
parallel/layers.py). The output of a stage is held until its backward (Megatron's trick of freeing its storage
after the send, which needs a private autograd entry point, is not used). Where two consecutive virtual stages
share a rank (the turn of ZB-V's V), the activation and its gradient are handed over without a message.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megagpt.config import v_shaped
from megagpt.diagnostics.ledger import LEDGER
from megagpt.parallel import comm
from megagpt.parallel.layers import WeightGradQueue, defer_weight_grads
from megagpt.config import virtual_stage
from megagpt.parallel.state import ParallelState
from megagpt.pipeline.instructions import Instr, group_steps, neighbour_stage
from megagpt.pipeline.p2p import exchange
from megagpt.pipeline.schedules import build_schedule
from megagpt.timers import Timers, p2p_timer_name

ForwardStep = Callable[[int, int, Optional[torch.Tensor]], tuple[torch.Tensor, Optional[torch.Tensor]]]


class _Run:
    """State of one forward_backward call on one rank."""

    def __init__(self, forward_step: ForwardStep, ps: ParallelState, num_chunks: int, forward_only: bool,
                 v_shape: bool) -> None:
        self.forward_step = forward_step
        self.ps = ps
        self.num_chunks = num_chunks
        self.forward_only = forward_only
        self.v_shape = v_shape
        self.inputs: dict[tuple[int, int], torch.Tensor] = {}        # received, awaiting forward
        self.output_grads: dict[tuple[int, int], torch.Tensor] = {}  # received, awaiting backward
        self.outgoing: dict[Instr, torch.Tensor] = {}                # computed, awaiting send
        self.saved: dict[tuple[int, int], tuple] = {}                # (input, output) awaiting backward
        self.weight_work: dict[tuple[int, int], WeightGradQueue] = {}  # B done, awaiting W
        self.losses: dict[int, torch.Tensor] = {}

    def _virtual(self, chunk: int) -> int:
        return virtual_stage(self.ps.pp_size, self.ps.pp_rank, chunk, self.num_chunks, self.v_shape)

    def first_virtual(self, chunk: int) -> bool:
        return self._virtual(chunk) == 0

    def last_virtual(self, chunk: int) -> bool:
        return self._virtual(chunk) == self.ps.pp_size * self.num_chunks - 1

    def _hand_on(self, forward: bool, ins: Instr, tensor: torch.Tensor) -> None:
        """Queue an activation (forward) or input gradient for the neighbouring virtual stage: a send, or, when that
        stage is another chunk of this rank, straight into its inputs (a detached leaf: chunks keep separate graphs)."""
        rank, chunk = neighbour_stage(forward, ins.chunk, self.ps.pp_rank, self.ps.pp_size, self.num_chunks,
                                      self.v_shape)
        key = (ins.microbatch, chunk)
        if rank != self.ps.pp_rank:
            self.outgoing[Instr("send_forward" if forward else "send_backward", ins.microbatch, ins.chunk)] = tensor
        elif forward:
            self.inputs[key] = tensor.detach()
        else:
            self.output_grads[key] = tensor

    def forward(self, ins: Instr) -> None:
        key = (ins.microbatch, ins.chunk)
        inp = None if self.first_virtual(ins.chunk) else self.inputs.pop(key)
        if inp is not None and not self.forward_only:
            inp.requires_grad_(True)   # its .grad is what goes back to the previous stage
        with torch.no_grad() if self.forward_only else contextlib.nullcontext():
            output, loss = self.forward_step(ins.chunk, ins.microbatch, inp)
        if self.last_virtual(ins.chunk):
            if loss is None:
                raise ValueError(f"forward_step returned no loss on the last virtual stage (micro-batch "
                                 f"{ins.microbatch}, chunk {ins.chunk})")
            self.losses[ins.microbatch] = loss.detach()
        else:
            self._hand_on(True, ins, output)
        if not self.forward_only:
            self.saved[key] = (inp, output)

    def backward(self, ins: Instr) -> None:
        """The whole backward, or (backward_input) its B: the linear layers' weight grads wait for `weight`."""
        key = (ins.microbatch, ins.chunk)
        inp, output = self.saved.pop(key)
        grad = None if self.last_virtual(ins.chunk) else self.output_grads.pop(key)
        with defer_weight_grads() if ins.op == "backward_input" else contextlib.nullcontext() as queue:
            torch.autograd.backward(output, grad_tensors=grad)
        if queue is not None:
            self.weight_work[key] = queue
        if not self.first_virtual(ins.chunk):
            # An input the chunk did not use has no gradient; the neighbour still waits for a message.
            self._hand_on(False, ins, inp.grad if inp.grad is not None else torch.zeros_like(inp))

    def weight(self, ins: Instr) -> None:
        """W of a split backward: the weight gradients its B queued (they reach the grad buffer hooks now)."""
        self.weight_work.pop((ins.microbatch, ins.chunk)).run()

    def communicate(self, batch: tuple, tensor_shape: tuple[int, ...], dtype: torch.dtype,
                    device: torch.device) -> None:
        sends = {ins: self.outgoing.pop(ins) for ins in batch if ins.op.startswith("send")}
        received = exchange(batch, sends, self.ps, tensor_shape, dtype, device, self.num_chunks, self.v_shape)
        for ins, tensor in received.items():
            store = self.inputs if ins.op == "recv_forward" else self.output_grads
            store[(ins.microbatch, ins.chunk)] = tensor

    def check_drained(self) -> None:
        left = {name: list(d) for name, d in (("inputs", self.inputs), ("output grads", self.output_grads),
                                               ("outgoing", self.outgoing), ("saved", self.saved),
                                               ("weight work", self.weight_work)) if d}
        if left:
            raise RuntimeError(f"pipeline schedule left tensors behind on rank {self.ps.rank}: {left}")


def forward_backward(
    forward_step: ForwardStep,
    num_microbatches: int,
    ps: ParallelState,
    tensor_shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    num_chunks: int = 1,
    forward_only: bool = False,
    on_instruction: Optional[Callable[[Instr], None]] = None,
    schedule: Optional[str] = None,
    timers: Optional[Timers] = None,
) -> list[torch.Tensor]:
    """Forward (and unless `forward_only`, backward) every micro-batch through this rank's pipeline stage.

    forward_step(chunk, microbatch, input_tensor) -> (output, loss): `input_tensor` is None on the first
    virtual stage, else the received activation (requires_grad set here). On a non-last virtual stage
    `output` is the activation to send (shape `tensor_shape`, `dtype`) and `loss` None; on the last one
    `output` is the scalar to backpropagate (already divided by num_microbatches and loss-scaled) and
    `loss` the detached unscaled loss for reporting. Gradients accumulate into the parameters.
    `on_instruction(instr)` is called before each instruction runs (instrumentation for tests/benchmarks, and
    the grad buffer's last-micro-batch flag). `schedule` names it (schedules.SCHEDULES; None: 1F1B or interleaved
    by the number of chunks); zb-v needs `ps` built with the same schedule, which decides where layers and the loss
    live. `timers` (level 2) times each compute instruction and pipeline exchange under Megatron's names.

    Returns the per-micro-batch reporting losses, in micro-batch order, on the last stage; [] elsewhere.
    """
    v_shape = v_shaped(schedule)
    if v_shape != ps.v_shape:
        raise ValueError(f"pipeline schedule {schedule!r} and the ParallelState (built for "
                         f"{ps.pipeline_schedule!r}) place the model chunks differently")
    instrs = build_schedule(num_microbatches, ps.pp_size, ps.pp_rank, num_chunks, forward_only, schedule)
    run = _Run(forward_step, ps, num_chunks, forward_only, v_shape)
    timers = timers or Timers()
    compute = {"forward": run.forward, "backward": run.backward, "backward_input": run.backward,
               "backward_weight": run.weight}
    for step in group_steps(instrs):
        if isinstance(step, Instr):
            LEDGER.set_instruction(step.op, step.microbatch)   # the context of the collectives it makes
            if on_instruction is not None:
                on_instruction(step)
            with timers(COMPUTE_TIMERS[step.op], 2):
                compute[step.op](step)
            continue
        LEDGER.set_instruction("+".join(ins.op for ins in step), step[0].microbatch)
        if on_instruction is not None:
            for ins in step:
                on_instruction(ins)
        with timers(_exchange_timer(step), 2):
            run.communicate(step, tensor_shape, dtype, device)
    run.check_drained()
    return [run.losses[mb] for mb in sorted(run.losses)]


COMPUTE_TIMERS = {"forward": "forward-compute", "backward": "backward-compute", "backward_input": "backward-compute",
                  "backward_weight": "backward-compute"}   # a split backward's B and W are both backward compute


def _exchange_timer(step: tuple) -> str:
    """The Megatron timer name of one batched exchange (e.g. send_forward + recv_backward: forward-send-backward-recv)."""
    sends = {ins.op.split("_")[1] for ins in step if ins.op.startswith("send")}
    recvs = {ins.op.split("_")[1] for ins in step if ins.op.startswith("recv")}
    return p2p_timer_name(sends, recvs)


def broadcast_losses(losses: list[torch.Tensor], ps: ParallelState,
                     device: Optional[torch.device] = None) -> float:
    """Mean of the last stage's micro-batch losses, sent to every rank of the pipeline (for logging).

    Averaging over data-parallel replicas is the caller's business. `device` defaults to the losses'
    device, or on ranks without losses the current CUDA device under NCCL and the CPU otherwise.
    """
    if device is None:
        if losses:
            device = losses[0].device
        elif dist.get_backend(ps.pp_group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
    mean = torch.zeros(1, dtype=torch.float64, device=device)
    if ps.is_last_stage:
        if not losses:
            raise ValueError("broadcast_losses: the last pipeline stage has no losses to report")
        mean[0] = torch.stack([loss.detach().to(device, torch.float64).reshape(()) for loss in losses]).mean()
    comm.broadcast(mean, src=ps.last_stage_rank, group=ps.pp_group)
    return float(mean.item())
