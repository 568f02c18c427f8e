"""Point-to-point exchange of activations and gradients between adjacent pipeline stages.

One call runs one batch of a schedule (a run of adjacent send/recv instructions, see schedules.py): every
send and receive is posted together through `comm.batch_send_recv` (batch_isend_irecv on NCCL, isend/irecv
on gloo) and all are waited for. Posting a matched send/recv pair together is what keeps two neighbours that
exchange in both directions from each blocking in a send to the other.

Peers are global ranks from ParallelState, chosen by the chunk placement (instructions.comm_peer): interleaved,
activations go to `next_rank` and come from `prev_rank`, gradients the other way, both wrapping around the pipeline
(the hop from the last rank's chunk c to the first rank's chunk c + 1); under the V placement chunk 1 flows back. Every message has the same known shape and dtype (one
micro-batch of activations), so receive buffers are allocated up front with no shape handshake.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from megagpt.parallel import comm
from megagpt.parallel.state import ParallelState
from megagpt.pipeline.instructions import Instr, comm_peer

def peer_rank(ins: Instr, ps: ParallelState, num_chunks: int = 1, v_shape: bool = False) -> int:
    """Global rank on the other end of a communication instruction (instructions.comm_peer, in global ranks)."""
    return ps.pp_ranks[comm_peer(ins, ps.pp_rank, ps.pp_size, num_chunks, v_shape)]


def exchange(batch: Sequence[Instr], outgoing: Mapping[Instr, torch.Tensor], ps: ParallelState,
             tensor_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, num_chunks: int = 1,
             v_shape: bool = False) -> dict[Instr, torch.Tensor]:
    """Post every send and receive of one batch together, wait for all, return the received tensors.

    `outgoing[ins]` is the tensor of each send instruction; the ops are posted in batch order, which is the
    order in which messages between two ranks pair up. A tensor of the wrong shape or dtype is refused here:
    the receiver's buffer is sized from the same `tensor_shape`, so it would otherwise corrupt or hang.
    """
    ops: list[tuple[str, torch.Tensor, int]] = []
    received: dict[Instr, torch.Tensor] = {}
    for ins in batch:
        peer = peer_rank(ins, ps, num_chunks, v_shape)
        if ins.op.startswith("send"):
            tensor = outgoing[ins]
            if tuple(tensor.shape) != tuple(tensor_shape) or tensor.dtype != dtype:
                raise ValueError(f"{ins}: pipeline message has shape {tuple(tensor.shape)} and dtype {tensor.dtype}, "
                                 f"but stages exchange {tuple(tensor_shape)} {dtype}")
            ops.append(("send", tensor.detach().contiguous(), peer))
        else:
            buffer = torch.empty(tensor_shape, dtype=dtype, device=device)
            received[ins] = buffer
            ops.append(("recv", buffer, peer))
    comm.batch_send_recv(ops, group=ps.pp_group)
    return received
