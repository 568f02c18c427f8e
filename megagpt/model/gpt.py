"""GPTModel: embeddings (first stage), this stage's transformer layers, final norm and LM head (last stage).

The LM head is the word embedding (tied, GPT-2) or its own vocab-parallel weight `output_layer.weight`
(`--untie-embeddings-and-output-weights`, Llama), initialised from its own seeded master.

Parameter names follow megatron-core (`embedding.word_embeddings.weight`, `decoder.layers.N....`) with N the
global layer index, so a checkpoint's names do not depend on the pipeline layout.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from megagpt.config import ModelConfig
from megagpt.model.norms import build_norm
from megagpt.model.transformer import TransformerLayer, document_mask, seeded_normal_init
from megagpt.parallel import mappings
from megagpt.parallel import random as tp_random
from megagpt.parallel.cross_entropy import vocab_parallel_cross_entropy
from megagpt.parallel.param_tags import tag
from megagpt.config import pad_vocab_size
from megagpt.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding
from megagpt.config import virtual_stage
from megagpt.parallel.state import ParallelState

WORD_EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"


def stage_layer_ids(num_layers: int, pp_size: int, pp_rank: int, num_chunks: int = 1, chunk: int = 0,
                    v_shape: bool = False) -> range:
    """Global layer indices of one model chunk: virtual stage `virtual_stage(...)` of `PP * chunks` equal blocks.

    The one answer to "which layers does (pp_rank, chunk) own", for every schedule (V placement for zb-v); model
    building and checkpoint conversion both ask it."""
    per_virtual_stage = num_layers // (pp_size * num_chunks)
    vs = virtual_stage(pp_size, pp_rank, chunk, num_chunks, v_shape)
    return range(vs * per_virtual_stage, (vs + 1) * per_virtual_stage)


class Embedding(nn.Module):
    """Vocab-parallel word embedding + replicated learned positions (none with RoPE or `--position-embedding-type
    none`), output `[s, b, h]` (or `[s/tp, b, h]` with SP)."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, seed: int, padded_vocab: int, sequence_parallel: bool,
                 tracker: tp_random.RNGStatesTracker, device, dtype) -> None:
        super().__init__()
        self.tp_group, self.sequence_parallel, self.tracker = ps.tp_group, sequence_parallel, tracker
        self.word_embeddings = VocabParallelEmbedding(
            padded_vocab, cfg.hidden_size, ps.tp_group, params_dtype=dtype, device=device,
            init_method=seeded_normal_init(seed, WORD_EMBEDDING, cfg.init_method_std, rows=cfg.vocab_size))
        self.learned_positions = cfg.position_embedding_type == "learned_absolute"
        if self.learned_positions:
            self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden_size, device=device, dtype=dtype)
            if self.position_embeddings.weight.device.type != "meta":   # filled where it lives, as layers.py does
                with torch.no_grad():
                    seeded_normal_init(seed, "embedding.position_embeddings.weight",
                                       cfg.init_method_std)(self.position_embeddings.weight)
            # Under SP each TP rank adds only its sequence slice of positions: its grad is partial, summed over TP.
            tag(self.position_embeddings.weight, sequence_parallel=sequence_parallel)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens `[b, s]`; position_ids `[b, s]` per token (--reset-position-ids), None = 0..s-1 for every row."""
        s = tokens.size(1)
        positions = torch.arange(s, device=tokens.device) if position_ids is None else position_ids   # [s] or [b, s]
        if not self.sequence_parallel:
            x = self.word_embeddings(tokens)                                            # [b, s, h]
            if self.learned_positions:
                x = x + self.position_embeddings(positions)                             # [b, s, h]
            return self.dropout(x.transpose(0, 1).contiguous())                         # [s, b, h]
        # Reduce-scatter the partial word embeddings straight into sequence shards (half an all-reduce's bytes),
        # then add this rank's slice of the (replicated) position embeddings.
        partial = self.word_embeddings(tokens, reduce_output=False).transpose(0, 1).contiguous()  # [s, b, h]
        x = mappings.reduce_scatter_to_sequence_parallel_region(partial, self.tp_group)         # [s/tp, b, h]
        if self.learned_positions:
            shard = x.size(0)
            start = mappings.tp_rank(self.tp_group) * shard
            if position_ids is None:
                x = x + self.position_embeddings(positions[start:start + shard]).unsqueeze(1)   # [s/tp, b, h]
            else:
                x = x + self.position_embeddings(positions[:, start:start + shard]).transpose(0, 1)   # [s/tp, b, h]
        with self.tracker.fork():
            return self.dropout(x)


class GPTModel(nn.Module):
    """One model chunk of a pipeline stage. `pre_process`: owns the embedding; `post_process`: final norm + head +
    loss."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, layer_ids: range, *, seed: int,
                 tracker: tp_random.RNGStatesTracker, pre_process: bool, post_process: bool,
                 sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None, tied_weight: Optional[nn.Parameter] = None) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size is not set (it comes from the tokenizer)")
        self.cfg, self.ps = cfg, ps
        self.pre_process, self.post_process, self.sequence_parallel = pre_process, post_process, sequence_parallel
        self.padded_vocab = pad_vocab_size(cfg.vocab_size, ps.tp_size, cfg.make_vocab_size_divisible_by)
        self.layer_ids = layer_ids
        # The V placement (zb-v) puts the last stage on the first stage's rank: its LM head is the embedding weight
        # itself, held in a tuple so it is not registered here (saved, reduced and counted once, in the first chunk).
        self.untied = cfg.untie_embeddings_and_output_weights
        self._tied_weight = (tied_weight,) if tied_weight is not None and not self.untied else ()
        if pre_process:
            self.embedding = Embedding(cfg, ps, seed, self.padded_vocab, sequence_parallel, tracker,
                                       device, params_dtype)
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleDict({
            str(i): TransformerLayer(cfg, ps, i, seed, sequence_parallel, tracker, device, params_dtype)
            for i in layer_ids})
        if post_process:
            self.decoder.final_layernorm = build_norm(cfg, cfg.hidden_size, sequence_parallel, device, params_dtype)
            if self.untied:   # its own weight, vocab-parallel like the embedding (Megatron's output_layer)
                self.output_layer = ColumnParallelLinear(
                    cfg.hidden_size, self.padded_vocab, ps.tp_group, bias=False, params_dtype=params_dtype,
                    init_method=seeded_normal_init(seed, OUTPUT_LAYER, cfg.init_method_std, rows=cfg.vocab_size),
                    sequence_parallel=sequence_parallel, device=device)
            elif not pre_process and not self._tied_weight:  # last stage of a pipeline: a copy of the tied embedding,
                self.output_layer = VocabParallelEmbedding(
                    self.padded_vocab, cfg.hidden_size, ps.tp_group, params_dtype=params_dtype, device=device,
                    init_method=seeded_normal_init(seed, WORD_EMBEDDING, cfg.init_method_std, rows=cfg.vocab_size))
                tag(self.output_layer.weight, embedding_copy=True)  # kept equal by grad all-reduce
        tied = ps.pp_size > 1
        for weight in self.tied_embedding_weights():
            tag(weight, shared_embedding=tied)

    def tied_embedding_weights(self) -> list[nn.Parameter]:
        """The word-embedding weight(s) held by this chunk: the original on the first stage, the copy on the last."""
        if self.untied:
            return []
        weights = [self.embedding.word_embeddings.weight] if self.pre_process else []
        if self.post_process and not self.pre_process and not self._tied_weight:
            weights.append(self.output_layer.weight)
        return weights

    def _lm_head_weight(self) -> torch.Tensor:
        if self.pre_process:
            return self.embedding.word_embeddings.weight
        return self._tied_weight[0] if self._tied_weight else self.output_layer.weight

    def forward(self, tokens: Optional[torch.Tensor] = None, input_tensor: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """First stage reads `tokens [b, s]`, later stages `input_tensor [s, b, h]`. The last stage returns the
        per-token loss `[b, s]` when `labels` are given, else vocab-parallel logits `[s, b, v/tp]`; other stages
        return the hidden states to send on. Packed documents (data/documents.py, every stage gets them):
        `position_ids [b, s]` restart positions (learned or RoPE), `document_ids [b, s]` keep attention within each
        document; None = positions 0..s-1 and plain causal attention."""
        x = self.embedding(tokens, position_ids) if self.pre_process else input_tensor   # [s, b, h] ([s/tp..] SP)
        mask = None if document_ids is None else document_mask(document_ids, self.cfg.attention_core == "flash")
        rope_positions = position_ids if self.cfg.position_embedding_type == "rope" else None
        for layer in self.decoder.layers.values():
            x = layer(x, mask, rope_positions)
        if not self.post_process:
            return x
        x = self.decoder.final_layernorm(x)
        logits = self._logits(x)                                             # [s, b, v/tp]
        if labels is None:
            return logits
        loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous(), self.ps.tp_group)  # [s, b]
        return loss.transpose(0, 1).contiguous()                             # [b, s]

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.untied:
            logits, _ = self.output_layer(x)                                                # [s, b, v/tp]
            self._mask_vocab_padding_(logits)
            return logits
        if self.sequence_parallel:
            x = mappings.gather_from_sequence_parallel_region(x, self.ps.tp_group, True)   # [s, b, h]
        else:
            x = mappings.copy_to_tp_region(x, self.ps.tp_group)                             # [s, b, h]
        logits = torch.nn.functional.linear(x, self._lm_head_weight())                      # [s, b, v/tp]
        self._mask_vocab_padding_(logits)
        return logits

    def _mask_vocab_padding_(self, logits: torch.Tensor) -> None:
        """Padding rows never win the softmax: logits of ids >= vocab_size are set to -inf, so every padded size
        (and every TP size) gives the loss of the unpadded vocabulary (and Hugging Face's GPT-2 logits). In place
        on the padding columns only, and outside autograd: linear's backward does not need its output, the loss's
        grad there is exp(-inf) = 0 already, and a recorded write would make backward clone the whole logits grad."""
        shard = logits.size(-1)
        first_pad = self.cfg.vocab_size - self.ps.tp_rank * shard
        if first_pad < shard:
            with torch.no_grad():
                logits[..., max(first_pad, 0):] = float("-inf")


def build_model_chunks(cfg: ModelConfig, ps: ParallelState, *, seed: int, tracker: tp_random.RNGStatesTracker,
                       num_chunks: int = 1, sequence_parallel: bool = False,
                       params_dtype: torch.dtype = torch.float32,
                       device: Optional[torch.device] = None) -> list[GPTModel]:
    """This rank's model chunks (one, or several non-contiguous ones for the interleaved and V placements).

    Under the V placement (ps.v_shape, zb-v) rank 0 holds both the first and the last virtual stage: the last chunk's
    LM head then uses the first chunk's word embedding directly, as a single-stage model does."""
    chunks: list[GPTModel] = []
    last_vs = ps.pp_size * num_chunks - 1
    for chunk in range(num_chunks):
        vs = virtual_stage(ps.pp_size, ps.pp_rank, chunk, num_chunks, ps.v_shape)
        layer_ids = stage_layer_ids(cfg.num_layers, ps.pp_size, ps.pp_rank, num_chunks, chunk, ps.v_shape)
        tied = next((c.embedding.word_embeddings.weight for c in chunks if c.pre_process), None)
        chunks.append(GPTModel(cfg, ps, layer_ids, seed=seed, tracker=tracker, pre_process=vs == 0,
                               post_process=vs == last_vs, sequence_parallel=sequence_parallel,
                               params_dtype=params_dtype, device=device,
                               tied_weight=tied if vs == last_vs else None))
    return chunks
