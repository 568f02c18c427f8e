"""Step time of a layout on a cluster: GEMM FLOPs at the achievable MFU, elementwise traffic, TP collectives,
pipeline bubble and p2p, DP/ZeRO collectives with the overlap the trainer really does, the optimizer step.

Why each term (the trainer's behaviour they mirror):
- compute: model FLOPs (train_log.model_flops_per_iteration's terms) per micro-batch and stage, / TP, plus the
  recompute's extra forward (full: the layers; selective: the attention core), at peak x achievable MFU; the
  flash attention core at its own kernel's rate (on a CPU core about half the GEMM rate);
- elementwise: LayerNorm, GELU, softmax, dropout and adds: ~4 passes over the saved activations (written in
  forward, read in backward, their grads written and read) at the elementwise kernels' rate (bandwidth-bound on
  GPUs; on a CPU GELU's erf and the norms' reductions are compute-bound, well below memory bandwidth);
- TP: 2 all-reduces of s b h per layer forward and 2 backward (DESIGN.md), or under SP 2 all-gathers and 2
  reduce-scatters each way (same bytes); full recompute repeats the forward ones; the embedding's and the LM head's,
  and cross-entropy's two small ones. Synchronous: never hidden; each call pays the latency (on gloo, waking the
  peer: it dominates TP's small messages);
- pipeline: 1F1B takes m x (slowest stage) + the fill and drain of the others, interleaving divides the fill by
  v; p2p sends are blocking batches (executor.py), so each micro-batch pays them on the critical path;
- DP: DDP all-reduces the fp32 grad buffer, ZeRO reduce-scatters it and all-gathers the updated params (model
  dtype). With --overlap-grad-reduce the buckets start during the last micro-batch's backward, so only what
  exceeds that backward is exposed; the ZeRO all-gather after the step is always exposed;
- host: Python, operator dispatch and autograd outside the kernels, per layer and per micro-batch: serial on a
  CPU (cpu-here measures it on a model too narrow for the kernels to count); GPUs launch asynchronously (0);
- optimizer: fused AdamW plus norm and clip touch ~44 bytes per owned element at memory bandwidth; the grad
  norm and the loss's small collectives pay one latency each.
Links: ranks are placed TP fastest, then DP, then PP (DESIGN.md), nodes hold consecutive ranks, so a group is
inside one node when its span of ranks fits in gpus_per_node; otherwise it runs at the inter-node bandwidth.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from megagpt.config import Config, final_global_batch_size, num_microbatches, num_model_chunks
from megagpt.plan.cluster import Cluster
from megagpt.plan.memory import Dims, chunk_activation_bytes, dims, grad_layout, rank_chunks
from megagpt.train_log import layer_forward_flops_per_token, model_flops_per_iteration

OPTIMIZER_BYTES_PER_ELEMENT = 44   # AdamW reads p, g, m, v and writes p, m, v (28); copy to model; norm + clip
ELEMENTWISE_PASSES = 4


@dataclass
class StepTime:
    """Seconds per optimizer step by term, and the throughput they imply."""

    terms: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float = 0.0
    tflops_per_gpu: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.terms.values())


def _link(span: int, cluster: Cluster) -> float:
    """Bytes/s of a group whose ranks span `span` consecutive ranks."""
    return (cluster.intra_node_gbps if span <= cluster.gpus_per_node else cluster.inter_node_gbps) * 1e9


def ring_time(nbytes: float, n: int, bandwidth: float, cluster: Cluster, all_reduce: bool) -> float:
    """Ring all-reduce (2 (n-1)/n B / busbw) or all-gather / reduce-scatter ((n-1)/n B / busbw), plus one
    launch latency."""
    if n <= 1:
        return 0.0
    steps = 2 * (n - 1) if all_reduce else n - 1
    return steps / n * nbytes / bandwidth + cluster.latency_us * 1e-6


def chunk_forward_flops(config: Config, d: Dims, layers: int, last: bool) -> tuple[float, float, float, float]:
    """FLOPs of one micro-batch's forward through a chunk on all TP ranks: (GEMMs, attention core, recompute's extra
    GEMMs, recompute's extra core), from the log line's per-token formula (SwiGLU and grouped-query attention
    included) times s b tokens. The core is apart because its kernel runs at its own rate."""
    s, b, h = d.s, d.b, d.h
    gemms, core = layer_forward_flops_per_token(config.model)
    layer_gemms, layer_core = s * b * gemms, s * b * core
    granularity = config.model.recompute_granularity
    extra_gemms = layer_gemms if granularity == "full" else 0.0
    extra_core = layer_core if granularity in ("full", "selective") else 0.0
    return (layers * layer_gemms + (2.0 * s * b * h * d.V if last else 0.0), layers * layer_core,
            layers * extra_gemms, layers * extra_core)


def stage_microbatch_time(config: Config, d: Dims, pp_rank: int, cluster: Cluster) -> dict[str, float]:
    """Seconds one micro-batch spends on one rank of stage `pp_rank` (forward + backward, all its chunks)."""
    rate = cluster.gpu_peak_tflops * 1e12 * cluster.achievable_mfu
    core_rate = cluster.attention_tflops * 1e12 if cluster.attention_tflops else rate
    if config.model.attention_core != "flash":
        core_rate = rate          # bmm at the GEMM rate; the softmax is in the elementwise traffic
    elementwise_bw = (cluster.elementwise_gbps or cluster.memory_gbps) * 1e9
    tp_bw = _link(d.t, cluster)
    compute = attention = elementwise = tp = 0.0
    host = cluster.microbatch_overhead_us * 1e-6
    no_recompute = copy.deepcopy(config)
    no_recompute.model.recompute_granularity = None
    for layers, first, last in rank_chunks(config, pp_rank):
        gemms, core, extra_gemms, extra_core = chunk_forward_flops(config, d, layers, last)
        host += layers * cluster.layer_overhead_us * 1e-6
        compute += (3.0 * gemms + extra_gemms) / d.t / rate
        attention += (3.0 * core + extra_core) / d.t / core_rate
        # Traffic follows the activations created, not those kept: recompute creates the recomputed ones twice.
        created = sum(chunk_activation_bytes(no_recompute, d, layers, first, last).values())
        kept = sum(chunk_activation_bytes(config, d, layers, first, last).values())
        elementwise += (ELEMENTWISE_PASSES * created + (created - kept)) / elementwise_bw
        nbytes = d.e * d.sbh
        per_layer = 4 + (2 if config.model.recompute_granularity == "full" else 0)   # all-reduce equivalents
        collectives = layers * per_layer + (1 if first else 0) + (1 if last else 0)
        tp += collectives * ring_time(nbytes, d.t, tp_bw, cluster, all_reduce=True)
        if last:   # vocab-parallel cross-entropy: each token's max, then its (sum of exps, target logit), fp32
            tp += sum(ring_time(n * 4.0 * d.s * d.b, d.t, tp_bw, cluster, all_reduce=True) for n in (1, 2))
    return {"compute": compute, "attention": attention, "elementwise": elementwise, "tp": tp, "host": host}


def step_time(config: Config, world_size: int, cluster: Cluster) -> StepTime:
    """Predicted seconds per step, by term (see the module docstring for what each term mirrors)."""
    d = dims(config, world_size, cluster.device)
    p = config.parallel
    m, v = num_microbatches(config, d.dp), num_model_chunks(config)
    stages = [stage_microbatch_time(config, d, r, cluster) for r in range(d.pp)]
    per_mb = [sum(x.values()) for x in stages]
    p2p = 0.0
    if d.pp > 1:
        bw = _link(d.t * d.dp * d.pp, cluster)
        p2p = v * 2 * (d.e * d.sbh / d.sp / bw + cluster.latency_us * 1e-6)
    slowest = max(range(d.pp), key=lambda r: per_mb[r])
    fill = (sum(per_mb) - per_mb[slowest]) / v
    out = StepTime()
    names = {"compute": "GEMM compute", "attention": "attention core", "elementwise": "elementwise ops",
             "tp": "TP collectives", "host": "host overhead"}
    for name, label in names.items():
        out.terms[label] = m * stages[slowest][name]
    out.terms["pipeline bubble"] = fill
    out.terms["pipeline p2p"] = (m + d.pp - 1) * p2p
    # DP on the slowest stage's buffer (the others finish no later)
    numel = grad_layout(config, d, slowest).numel
    dp_bw = _link(d.t * d.dp, cluster)
    zero = p.zero_stage if p.use_distributed_optimizer else 0
    if zero:
        reduce = ring_time(4.0 * numel, d.dp, dp_bw, cluster, all_reduce=False)
        gather = ring_time(float(d.e * numel), d.dp, dp_bw, cluster, all_reduce=False)
    else:
        reduce, gather = ring_time(4.0 * numel, d.dp, dp_bw, cluster, all_reduce=True), 0.0
    if p.overlap_grad_reduce:
        backward = (stages[slowest]["compute"] + stages[slowest]["attention"]) * 2.0 / 3.0
        reduce = max(0.0, reduce - backward)
    out.terms["DP grad reduction (exposed)"] = reduce
    out.terms["ZeRO param all-gather"] = gather
    if d.pp > 1:
        out.terms["tied-embedding all-reduce"] = ring_time(4.0 * d.V // d.t * d.h, 2, _link(world_size, cluster),
                                                           cluster, all_reduce=True)
    # One small all-reduce each, latency-bound: the grad norm over TP x PP (and DP under ZeRO), the loss broadcast
    # from the last stage, the loss mean over DP.
    calls = int(d.t * d.pp > 1) + int(bool(zero) and d.dp > 1) + int(d.pp > 1) + int(d.dp > 1)
    out.terms["grad-norm and loss collectives"] = calls * cluster.latency_us * 1e-6
    owned = numel / d.dp if zero else numel
    out.terms["optimizer step"] = owned * OPTIMIZER_BYTES_PER_ELEMENT / (cluster.memory_gbps * 1e9)
    total = out.total
    gbs = final_global_batch_size(config, d.dp)
    out.tokens_per_s = gbs * d.s / total
    out.tflops_per_gpu = model_flops_per_iteration(config, d.V, gbs) / total / world_size / 1e12
    return out
