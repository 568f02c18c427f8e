"""Where the documents of a packed sample begin: Megatron's `--reset-position-ids` and `--reset-attention-mask`.

A sample packs several documents, each ending with its EOD token (the EOD belongs to the document it ends). Token t
belongs to document `number of EODs before t`; its position within that document is t minus the index after the
last EOD before t. Megatron computes the same per sample (`_get_ltor_masks_and_position_ids` in
megatron/core/datasets/gpt_dataset.py) with a loop over the EODs; here it is two cumulative ops over the batch.
Computed once per micro-batch from the input tokens, by the engine; the model turns document ids into its
attention mask (model/transformer.py document_mask) and position ids into its position embeddings or RoPE angles.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from megagpt.config import DataConfig
from megagpt.data.tokenizer import data_tokenizer


class Documents(NamedTuple):
    """Per-token document layout of a micro-batch; a field is None when its flag is off (the model's default)."""
    position_ids: Optional[torch.Tensor]   # [b, s] int64: 0 at each document's first token (--reset-position-ids)
    document_ids: Optional[torch.Tensor]   # [b, s] int64: EODs before the token (--reset-attention-mask)


def split_documents(tokens: torch.Tensor, eod: int, reset_position_ids: bool,
                    reset_attention_mask: bool) -> Optional[Documents]:
    """The document layout of `tokens [b, s]` (None when both flags are off: nothing is built)."""
    if not (reset_position_ids or reset_attention_mask):
        return None
    is_eod = (tokens == eod).long()                                         # [b, s]
    document_ids = torch.cumsum(is_eod, dim=1) - is_eod                     # [b, s]: EODs strictly before t
    position_ids = None
    if reset_position_ids:
        index = torch.arange(tokens.size(1), device=tokens.device).expand_as(tokens)          # [b, s]
        after_eod = torch.zeros_like(index)
        after_eod[:, 1:] = torch.where(is_eod[:, :-1].bool(), index[:, 1:], 0)               # [b, s]: t if t-1 is EOD
        position_ids = index - torch.cummax(after_eod, dim=1).values        # [b, s]: t - its document's start
    return Documents(position_ids, document_ids if reset_attention_mask else None)


def documents_of(tokens: torch.Tensor, d: DataConfig) -> Optional[Documents]:
    """`split_documents` under the data flags (None, without building the tokenizer, when both are off)."""
    if not (d.reset_position_ids or d.reset_attention_mask):
        return None
    return split_documents(tokens, data_tokenizer(d).eod, d.reset_position_ids, d.reset_attention_mask)
