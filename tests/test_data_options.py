"""Megatron's data options (#10): --train/--valid/--test-data-path, --eod-mask-loss, --no-mmap-bin-files,
--dataloader-type cyclic end to end, and conflicting data sources refused by name (--reset-position-ids and
--reset-attention-mask: tests/test_reset_documents.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distributed import run_distributed
from megagpt.config import ConfigError, validate
from megagpt.data.indexed_dataset import IndexedDataset
from megagpt.data.batches import MicroBatches
from megagpt.training import config_for_test, setup, train_loop
from test_training import CORPUS


@pytest.fixture(scope="module")
def prefix(tmp_path_factory) -> str:
    """Short documents (a few lines of the committed sample each), so end-of-document tokens are frequent."""
    import json

    from megagpt.data.preprocess import PreprocessConfig, preprocess

    out = tmp_path_factory.mktemp("bytes")
    lines = [ln for doc in open(CORPUS) for ln in json.loads(doc)["text"].splitlines() if ln.strip()][:600]
    with open(out / "short.jsonl", "w") as f:
        for i in range(0, len(lines), 2):
            f.write(json.dumps({"text": " ".join(lines[i:i + 2])}) + "\n")
    preprocess(PreprocessConfig(input=str(out / "short.jsonl"), output_prefix=str(out / "sh"),
                                tokenizer_type="ByteTokenizer", append_eod=True, progress=False, log_interval=0))
    return str(out / "sh_text_document")


def _config(cache: str, **data):
    return config_for_test(
        num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32, max_position_embeddings=32,
        hidden_dropout=0.0, attention_dropout=0.0, micro_batch_size=2, global_batch_size=4, train_iters=3,
        lr=1e-3, eval_interval=3, eval_iters=1, log_interval=3, tokenizer_type="ByteTokenizer",
        data_cache_path=cache, **data)


def _losses(configs: list):
    out = []
    for config in configs:
        trainer, ps = setup(config, log=False)
        result = train_loop(config, trainer, ps, log=False)
        out.append((result.losses, result.validation_losses))
    return out


def test_split_paths_equal_a_whole_file_split(prefix, tmp_path):
    cache = str(tmp_path / "cache")
    whole = _config(cache, data_path=[prefix], split="1,0,0")
    split_paths = _config(cache, train_data_path=[prefix], valid_data_path=["1.0", prefix])
    no_mmap = _config(cache, data_path=[prefix], split="1,0,0", mmap_bin_files=False)
    masked = _config(cache, data_path=[prefix], split="1,0,0", eod_mask_loss=True)
    cyclic = _config(cache, data_path=[prefix], split="1,0,0", dataloader_type="cyclic")
    (a, _), (b, valid), (c, _), (d, _), (e, _) = run_distributed(_losses, 1, [whole, split_paths, no_mmap, masked,
                                                                              cyclic])[0]
    assert a == b == c and len(valid) == 1            # same documents, same order; validation from its own path
    assert d != a and e != a                          # the mask and the shuffle change what is trained on


def test_eod_positions_leave_the_loss():
    text = torch.tensor([[5, 0, 7, 8, 0], [1, 2, 3, 4, 9]])      # eod = 0; [b, s+1]
    (tokens, labels, mask), = MicroBatches([{"text": text}], torch.device("cpu"), masked_token=0).next_step(1)
    assert mask.tolist() == [[1, 0, 1, 1], [1, 1, 1, 1]] and labels[0].tolist() == [0, 7, 8, 0]
    from megagpt.engines.base import token_mean
    per_token = torch.arange(8, dtype=torch.float32).view(2, 4)
    assert token_mean(per_token, mask).item() == pytest.approx((28 - 1) / 7)


def test_unmapped_bin_reads_the_same_tokens(prefix):
    mapped, read = IndexedDataset(prefix), IndexedDataset(prefix, mmap_bin=False)
    assert len(mapped) == len(read)
    assert all(np.array_equal(mapped[i], read[i]) for i in (0, len(mapped) // 2, len(mapped) - 1))


def test_conflicting_data_sources_are_named(prefix):
    config = config_for_test(train_iters=1, data_path=[prefix], train_data_path=[prefix])
    with pytest.raises(ConfigError, match="give --data-path .* or --train/--valid/--test-data-path, not both"):
        validate(config, world_size=1)
