"""Memory per rank and per pipeline stage: every term the trainer allocates, as arithmetic on the config.

Why a term list and not one formula: first, middle and last stages differ (embedding, LM head, micro-batches in
flight), and a user deciding between layouts needs to see which term does not fit. Each term below is one function
with the reason it exists; `stage_memory` adds them up. Sizes follow what megagpt's code keeps, checked against
measurement in tests/test_plan_measured.py: parameters, grads and optimizer state byte for byte against the
trainer's own memory line, activations against the bytes autograd saves (saved-tensor hooks).

Activations follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
(per layer s b h (34 + 5 a s / h) bytes in fp16 without parallelism, its Table 2 for TP, SP and recompute), with
megagpt's own differences made explicit: the QKV and fc1 GEMMs save their (all-gathered, under SP) full-sequence
input, the fp32 softmax keeps both its fp32 output and the cast copy, dropout masks are 1 byte on CUDA
(native_dropout) but input-sized on CPU, and cross-entropy keeps fp32 exponentials of the logits.

Model variants (#15): parameters and grads follow the built model exactly (grouped QKV rows (n + 2G) d, SwiGLU's
2f fc1 rows, RMSNorm without bias, no position table under RoPE, an untied head without the embedding all-reduce).
The activation terms that change size are modelled (QKV output, SwiGLU's gate/up/product); RMSNorm's normalised
copy and RoPE's rotated q/k are not (the measured-activation tests run GPT-2 configurations).

Notation: s sequence, b micro-batch, h hidden, a heads, f ffn, V padded vocabulary, t TP size, e bytes per
activation element (2 bf16/fp16, 4 fp32), sp: t under sequence parallel else 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megagpt.config import Config, num_microbatches, num_model_chunks, pad_vocab_size, v_shaped, virtual_stage
from megagpt.optim.bucket_layout import KIND_DP, KIND_EMBEDDING_SYNC, KIND_TP_SYNC, BucketLayout, bucket_layout
from megagpt.pipeline.schedules import build_schedule
from megagpt.plan.cluster import GIB, Cluster

TOKENIZER_VOCAB = {"GPT2BPETokenizer": 50257, "ByteTokenizer": 257}


def padded_vocab_size(config: Config) -> int:
    """The vocabulary rounded up to a multiple of make_vocab_size_divisible_by x TP (config.pad_vocab_size, as the
    model pads it). Without a vocab size, the tokenizer's is used."""
    m, tp = config.model, config.parallel.tensor_model_parallel_size
    vocab = m.vocab_size or TOKENIZER_VOCAB.get(config.data.tokenizer_type, 50257)
    return pad_vocab_size(vocab, tp, m.make_vocab_size_divisible_by)


@dataclass(frozen=True)
class Dims:
    """The sizes every term is written in, resolved from a config and a device kind."""

    s: int
    b: int
    h: int
    a: int
    f: int
    V: int
    P: int
    t: int
    pp: int
    dp: int
    sp: int
    e: int
    mask: int
    stats: int
    softmax: int

    @property
    def sbh(self) -> int:
        return self.s * self.b * self.h


def dims(config: Config, world_size: int, device: str = "cuda") -> Dims:
    m, p, o = config.model, config.parallel, config.optim
    t, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    e = 2 if (o.bf16 or o.fp16) else 4
    return Dims(s=m.seq_length, b=config.train.micro_batch_size, h=m.hidden_size, a=m.num_attention_heads,
                f=m.ffn_size, V=padded_vocab_size(config), P=m.max_positions, t=t, pp=pp,
                dp=max(world_size // (t * pp), 1), sp=t if p.sequence_parallel else 1, e=e,
                mask=1 if device == "cuda" else e,          # CUDA native_dropout keeps a bool mask; CPU a noise tensor
                stats=4 if device == "cuda" else e,         # LayerNorm mean/rstd: fp32 on CUDA, input dtype on CPU
                softmax=4 if (m.attention_softmax_in_fp32 and e < 4) else e)


# ------------------------------------------------------------------------------------------------ parameters

def chunk_params(config: Config, d: Dims, layers: int, first: bool, last: bool,
                 tied_here: bool = False) -> list[tuple[str, int, str]]:
    """(name, elements on one TP rank, reduction kind) of one model chunk, in the model's registration order
    (model/gpt.py), which fixes the grad-buffer layout and so its padding."""
    m = config.model
    h, f, t = d.h, d.f, d.t
    sp_kind = KIND_TP_SYNC if (config.parallel.sequence_parallel and t > 1) else KIND_DP
    untied = m.untie_embeddings_and_output_weights
    emb_kind = KIND_EMBEDDING_SYNC if d.pp > 1 and not untied else KIND_DP
    fc1 = 2 * f if m.swiglu else f                   # SwiGLU: gate and up rows

    def norm(name: str, size: int, kind: str) -> list[tuple[str, int, str]]:
        return [(name + ".weight", size, kind)] + ([(name + ".bias", size, kind)] if m.normalization == "LayerNorm"
                                                   else [])

    def linear(name: str, weight: int, bias: int, kind: str, has_bias: bool) -> list[tuple[str, int, str]]:
        return [(name + ".weight", weight, KIND_DP)] + ([(name + ".bias", bias, kind)] if has_bias else [])

    out = []
    if first:
        out.append(("word_embeddings", d.V // t * h, emb_kind))
        if m.position_embedding_type == "learned_absolute":
            out.append(("position_embeddings", d.P * h, sp_kind))
    qk_kind = KIND_TP_SYNC if t > 1 else KIND_DP     # q/k norms see this rank's heads only (model/norms.py)
    per_layer = (norm("input_layernorm", h, sp_kind)
                 + linear("linear_qkv", m.qkv_size // t * h, m.qkv_size // t, KIND_DP, m.qkv_bias)
                 + linear("linear_proj", h * (h // t), h, sp_kind, m.add_bias_linear)
                 + (norm("q_layernorm", m.head_dim, qk_kind) + norm("k_layernorm", m.head_dim, qk_kind)
                    if m.qk_layernorm else [])
                 + norm("pre_mlp_layernorm", h, sp_kind)
                 + linear("linear_fc1", fc1 // t * h, fc1 // t, KIND_DP, m.add_bias_linear)
                 + linear("linear_fc2", h * (f // t), h, sp_kind, m.add_bias_linear))
    out += per_layer * layers
    if last:
        out += norm("final_layernorm", h, sp_kind)
        if untied or not (first or tied_here):       # an untied head, or the last stage's copy of the tied one
            out.append(("output_layer", d.V // t * h, emb_kind))
    return out


def rank_chunks(config: Config, pp_rank: int) -> list[tuple[int, bool, bool]]:
    """(layers, owns the embedding, owns the LM head) of each model chunk of a pipeline rank, by the virtual stage
    it holds (the V placement of zb-v puts the first and the last on rank 0)."""
    pp, v = config.parallel.pipeline_model_parallel_size, num_model_chunks(config)
    layers = config.model.num_layers // (pp * v)
    v_shape = v_shaped(config.parallel.pipeline_schedule)
    stages = [virtual_stage(pp, pp_rank, c, v, v_shape) for c in range(v)]
    return [(layers, vs == 0, vs == pp * v - 1) for vs in stages]


def rank_params(config: Config, d: Dims, pp_rank: int) -> list[tuple[str, int, str]]:
    """Every parameter of a rank's chunks; a tied LM head on the rank that holds the embedding is that weight."""
    chunks = rank_chunks(config, pp_rank)
    holds_embedding = any(first for _, first, _ in chunks)
    return [p for layers, first, last in chunks
            for p in chunk_params(config, d, layers, first, last, tied_here=holds_embedding and not first)]


def grad_layout(config: Config, d: Dims, pp_rank: int) -> BucketLayout:
    params = rank_params(config, d, pp_rank)
    return bucket_layout([n for _, n, _ in params], [k for _, _, k in params], d.dp, config.parallel.ddp_bucket_size)


def state_bytes(config: Config, world_size: int, pp_rank: int, dp_rank: int = 0, device: str = "cuda") -> dict:
    """Bytes of params, grads and optimizer state one rank holds after a step: the trainer's "memory after
    iteration 1" line (optimizer memory_bytes()), exactly.

    - params: e per element; under ZeRO the params live in a padded buffer shaped like the grad buffer.
    - grads: fp32 main grads in the padded bucket buffer (grad_buffer.py); ZeRO-2 keeps only this rank's 1/DP
      shard of every bucket between steps.
    - optimizer: fp32 masters (bf16/fp16 only), Adam's two fp32 moments and fused AdamW's 4-byte step tensor per
      slot; under ZeRO only the owned 1/DP of every bucket, one slot per owned piece of a parameter.
    """
    d = dims(config, world_size, device)
    p, o = config.parallel, config.optim
    params = rank_params(config, d, pp_rank)
    layout = grad_layout(config, d, pp_rank)
    zero = p.zero_stage if p.use_distributed_optimizer else 0
    if zero:
        pieces = layout.owned_pieces(d.dp, dp_rank)
        owned, slots = sum(hi - lo for _, lo, hi in pieces), len(pieces)
    else:
        owned, slots = sum(n for _, n, _ in params), len(params)
    per_element = (4 if d.e < 4 else 0) + (8 if o.optimizer == "adam" else 4 if o.sgd_momentum else 0)
    per_slot = 4 if o.optimizer == "adam" else 0
    return {"params": (layout.numel if zero else sum(n for _, n, _ in params)) * d.e,
            "grads": (layout.numel // d.dp if zero == 2 else layout.numel) * 4,
            "optimizer": owned * per_element + slots * per_slot}


def grads_peak_bytes(config: Config, d: Dims, pp_rank: int) -> int:
    """fp32 grad buffer during backward: ZeRO-2 re-allocates the full buckets while grads accumulate and also keeps
    the reduced shard, so its peak is (1 + 1/DP) buffers, not the 1/DP left between steps."""
    numel = grad_layout(config, d, pp_rank).numel
    p = config.parallel
    return numel * 4 + (numel // d.dp * 4 if p.use_distributed_optimizer and p.zero_stage == 2 else 0)


# ------------------------------------------------------------------------------------------------ activations

def layer_activation_terms(config: Config, d: Dims) -> dict[str, int]:
    """Bytes one transformer layer saves for backward per micro-batch (Korthikanti et al. 2022, section 4)."""
    m = config.model
    s, b, h, a, f, t, sp, e = d.s, d.b, d.h, d.a, d.f, d.t, d.sp, d.e
    if m.recompute_granularity == "full":
        # Only the layer input is kept (tp_random.checkpoint); the layer is recomputed in backward.
        return {"layer input (full recompute)": e * d.sbh // sp}
    terms = {
        # Inputs of the two LayerNorms (the residual stream), split along s under SP.
        "LayerNorm inputs": 2 * e * d.sbh // sp,
        # mean and rstd of both LayerNorms, one value per token each.
        "LayerNorm statistics": 2 * 2 * d.stats * s * b // sp,
        # QKV and fc1 GEMMs keep their input: the full sequence (all-gathered under SP; Megatron keeps the shard).
        "QKV and fc1 GEMM inputs": 2 * e * d.sbh,
        # The QKV output, of which q, k and v are views (attention or its checkpoint keeps it): (n + 2G) d rows.
        "QKV output": e * s * b * m.qkv_size // t,
        # Attention output, kept by the output projection.
        "attention context": e * d.sbh // t,
        # fc1 output (GELU input) and GELU output (fc2 input); SwiGLU: fc1's [gate | up] (2f), silu(gate) and the
        # product (fc2 input).
        "MLP activations": (4 if m.swiglu else 2) * e * s * b * f // t,
    }
    if m.hidden_dropout > 0:
        # Two residual-branch dropouts, one mask element per hidden value.
        terms["hidden dropout masks"] = 2 * d.mask * d.sbh // sp
    if m.recompute_granularity != "selective" and m.attention_core == "flash":
        # scaled_dot_product_attention keeps its output, laid out like the query so the context the output
        # projection keeps is a view of it (measured on CPU; counted above), and one fp32 log-sum-exp per query and
        # head; no [s, s] tensor. (CPU with attention dropout falls back to torch's math path, which keeps the
        # s x s probabilities and masks: not modelled, the GPU kernels do not.)
        terms["flash attention log-sum-exp"] = 4 * b * (a // t) * s
    elif m.recompute_granularity != "selective":
        scores = b * (a // t) * s * s
        # Softmax keeps its output (fp32 with attention_softmax_in_fp32 under bf16/fp16): the 5as/h term.
        terms["attention softmax"] = d.softmax * scores
        if m.attention_dropout > 0:
            terms["attention dropout mask and output"] = (d.mask + e) * scores
        elif d.softmax != e:
            terms["softmax cast copy"] = e * scores      # probs.to(bf16), kept by the probs x V matmul
    return terms


def embedding_activation_terms(config: Config, d: Dims) -> dict[str, int]:
    """What the first stage's embedding keeps: token ids (int64) for the lookup's backward, the TP ownership mask,
    the position ids, and the embedding dropout mask."""
    s, b = d.s, d.b
    terms = {"token and position ids": 8 * s * b + 8 * s + (s * b if d.t > 1 else 0)}
    if config.model.hidden_dropout > 0:
        terms["embedding dropout mask"] = d.mask * d.sbh // d.sp
    return terms


def head_activation_terms(config: Config, d: Dims) -> dict[str, int]:
    """What the last stage keeps for the final LayerNorm, the LM-head GEMM and vocab-parallel cross-entropy
    (fp32 exponentials of this rank's V/t logits: the largest single tensor of small models)."""
    s, b, e = d.s, d.b, d.e
    return {"final LayerNorm input and statistics": e * d.sbh // d.sp + 2 * d.stats * s * b // d.sp,
            "LM-head GEMM input": e * d.sbh,
            "cross-entropy exponentials (fp32)": 4 * s * b * (d.V // d.t),
            "cross-entropy per-token stats": 8 * s * b + s * b + 8 * s * b}


def document_terms(config: Config, d: Dims, layers: int, first: bool) -> dict[str, int]:
    """Packed documents (--reset-attention-mask, --reset-position-ids; model/transformer.py document_mask): the
    [b, 1, s, s] bool mask, one per chunk for scaled_dot_product_attention, one per layer on the softmax paths (its
    union with the causal mask, kept by masked_fill), where the masked probabilities are a tensor of their own, kept
    by the probs x V matmul unless attention dropout keeps its output instead; learned positions keep per-token ids."""
    m, dd = config.model, config.data
    s, b = d.s, d.b
    terms = {}
    if dd.reset_attention_mask:
        if m.attention_core == "flash":
            terms["document mask"] = b * s * s
        elif m.recompute_granularity != "full":
            terms["document mask"] = b * s * s * layers
            if m.attention_dropout == 0 and d.softmax == d.e and m.recompute_granularity != "selective":
                terms["masked attention probabilities"] = d.softmax * b * (m.num_attention_heads // d.t) * s * s * layers
    if dd.reset_position_ids and first and m.position_embedding_type == "learned_absolute":
        terms["per-token position ids"] = 8 * s * b - 8 * s
    return terms


def chunk_activation_bytes(config: Config, d: Dims, layers: int, first: bool, last: bool) -> dict[str, int]:
    """Bytes saved for backward by one micro-batch's forward through one model chunk, by term."""
    terms = {k: v * layers for k, v in layer_activation_terms(config, d).items()}
    terms.update(document_terms(config, d, layers, first))
    if first:
        terms.update(embedding_activation_terms(config, d))
    if last:
        terms.update(head_activation_terms(config, d))
    return terms


def peak_in_flight(config: Config, world_size: int, pp_rank: int, weights: list[int]) -> list[int]:
    """How many micro-batches of each chunk are alive at this rank's peak, over its real schedule
    (pipeline/schedules.py), where a micro-batch on chunk c weighs weights[c] from its forward to its backward. 1F1B keeps min(p - r, m)
    alive, interleaved its warm-up + 1 chunk-micro-batches. m is capped at 4p: the steady state repeats after the
    warm-up, so the peak is reached before (4p keeps interleaving's m % p == 0 and m != p cases)."""
    p = config.parallel
    pp = p.pipeline_model_parallel_size
    m = num_microbatches(config, max(world_size // (p.tensor_model_parallel_size * pp), 1))
    m = min(m, 4 * pp) if m > 4 * pp else m
    alive = [0] * len(weights)
    peak, at_peak = -1, list(alive)
    for ins in build_schedule(m, pp, pp_rank, len(weights)):
        if ins.op in ("forward", "backward"):
            alive[ins.chunk] += 1 if ins.op == "forward" else -1
            total = sum(n * w for n, w in zip(alive, weights))
            if total > peak:
                peak, at_peak = total, list(alive)
    return at_peak


@dataclass
class StageMemory:
    """The bytes of one pipeline rank, by term, and their total."""

    pp_rank: int
    terms: dict[str, int] = field(default_factory=dict)
    activation_terms: dict[str, int] = field(default_factory=dict)   # per micro-batch, summed over chunks
    in_flight: int = 0

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    @property
    def gib(self) -> float:
        return self.total / GIB


def stage_memory(config: Config, world_size: int, pp_rank: int, cluster: Optional[Cluster] = None) -> StageMemory:
    """Peak bytes of one rank of pipeline stage `pp_rank`, term by term (see each term's function for why)."""
    device = cluster.device if cluster is not None else "cuda"
    d = dims(config, world_size, device)
    state = state_bytes(config, world_size, pp_rank, 0, device)
    chunks = rank_chunks(config, pp_rank)
    acts = [chunk_activation_bytes(config, d, layers, first, last) for layers, first, last in chunks]
    # A non-last virtual stage's output stays referenced by the executor until its backward (Megatron frees it
    # after the send: pipeline/executor.py says why megagpt does not).
    output = e_sbh = d.e * d.sbh // d.sp
    saved = [sum(a.values()) for a in acts]
    outputs = [0 if last else output for _, _, last in chunks]
    counts = peak_in_flight(config, world_size, pp_rank, [x + y for x, y in zip(saved, outputs)])
    alive = sum(counts)
    mem = StageMemory(pp_rank, in_flight=alive)
    for a in acts:
        for k, v in a.items():
            mem.activation_terms[k] = mem.activation_terms.get(k, 0) + v
    t = mem.terms
    untied = config.model.untie_embeddings_and_output_weights   # no embedding grad all-reduce
    t["weights"] = state["params"]
    t["fp32 grads (bucketed, padded)"] = grads_peak_bytes(config, d, pp_rank)
    t["optimizer state"] = state["optimizer"]
    t[f"activations ({alive} chunk-micro-batches in flight)"] = sum(n * x for n, x in zip(counts, saved))
    if any(outputs):
        t["stage outputs held until backward"] = sum(n * x for n, x in zip(counts, outputs))
    if d.pp > 1:
        t["p2p receive buffers (activation + grad)"] = 2 * e_sbh
    if any(last for _, _, last in chunks):
        # The last micro-batch's logits in the model dtype and, under bf16/fp16, their fp32 copy in cross-entropy.
        t["logits and loss temporaries"] = d.s * d.b * (d.V // d.t) * (d.e + (4 if d.e < 4 else 0))
        if d.pp > 1 and not untied:
            t["tied-embedding grad all-reduce copy"] = 4 * d.V // d.t * d.h
    elif any(first for _, first, _ in chunks) and d.pp > 1 and not untied:
        t["tied-embedding grad all-reduce copy"] = 4 * d.V // d.t * d.h
    if cluster is not None:
        t["fragmentation allowance"] = int(cluster.fragmentation * mem.total)
        if device == "cuda":
            t["runtime outside the allocator (CUDA context, NCCL)"] = int(cluster.runtime_gib * GIB)
    return mem


def all_stages(config: Config, world_size: int, cluster: Optional[Cluster] = None) -> list[StageMemory]:
    """Memory of every pipeline stage (TP and DP ranks of a stage hold the same, up to ZeRO padding)."""
    return [stage_memory(config, world_size, r, cluster) for r in range(config.parallel.pipeline_model_parallel_size)]
