"""Text sampling from a checkpoint of any parallel layout, in one process.

    python -m megagpt.generate --load checkpoints/gpt --prompt "ROMEO:" --max-new-tokens 60 --top-k 40

The checkpoint's TP shards and pipeline stages are merged into one TP=1, PP=1 model as they are read
(checkpoint.convert.ShardedCheckpoint), so a model trained on many ranks samples on a laptop. Each new token
runs the whole (sliding, at most max-position-embeddings long) context through the model: no KV cache, which
keeps the model code the training code. The tokenizer is the one recorded in the checkpoint's config unless
flags override it. `--temperature 0` is greedy decoding.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch

from megagpt.config import Config
from megagpt.checkpoint.convert import OUTPUT_LAYER, ShardedCheckpoint, fit_vocab, is_vocab_tensor
from megagpt.data.tokenizer import TOKENIZER_TYPES, Tokenizer, build_tokenizer
from megagpt.model.gpt import GPTModel, build_model_chunks
from megagpt.parallel import random as tp_random
from megagpt.parallel.launch import free_port, init_distributed
from megagpt.parallel.state import ParallelState


def load_for_generation(directory: str, iteration: Optional[int] = None,
                        device: Optional[torch.device] = None) -> tuple[GPTModel, Config, ParallelState]:
    """The checkpoint's weights in a TP=1, PP=1 model in eval mode (needs a one-rank process group)."""
    source = ShardedCheckpoint(directory, iteration)
    config = Config.from_dict(source.meta["config"])
    ps = ParallelState(1, 1, 1)
    device = device or torch.device("cpu")
    tracker = tp_random.model_parallel_seed(config.train.seed, 0, 0, device)
    model = build_model_chunks(config.model, ps, seed=config.train.seed, tracker=tracker, device=device)[0]
    with torch.no_grad():
        for name, param in model.state_dict(keep_vars=True).items():
            if name == OUTPUT_LAYER and not config.model.untie_embeddings_and_output_weights:
                continue   # a separate copy of the tied embedding exists only with PP > 1 (an untied head: always)
            tensor = source.weight(name)
            if is_vocab_tensor(name, source.meta["tensors"][name]):
                tensor = fit_vocab(tensor, config.model.vocab_size, param.shape[0])
            param.copy_(tensor)
    return model.eval(), config, ps


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token id per row of `logits [b, V]`: greedy when temperature is 0, else sampled from the softmax
    of logits / temperature restricted to the top_k ids (0: all) and to the smallest set of ids whose
    probability reaches top_p (nucleus sampling; 1.0: all)."""
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p   # mass before this id already suffices
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: GPTModel, prompt: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stop_id: Optional[int] = None) -> list[int]:
    """The prompt's continuation (new ids only), stopping early after `stop_id` (e.g. the tokenizer's eod)."""
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    window = model.cfg.max_positions
    generator = torch.Generator().manual_seed(seed)
    ids = list(prompt)
    device = next(model.parameters()).device
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-window:]], device=device)          # [1, s]
        logits = model(tokens=context)[-1, :, :model.cfg.vocab_size]      # last position: [1, V]
        next_id = int(sample_next(logits.cpu(), temperature, top_k, top_p, generator)[0])
        ids.append(next_id)
        if next_id == stop_id:
            break
    return ids[len(prompt):]


def _tokenizer(config: Config, args: argparse.Namespace) -> Tokenizer:
    d = config.data
    return build_tokenizer(args.tokenizer_type or d.tokenizer_type, args.vocab_file or d.vocab_file,
                           args.merge_file or d.merge_file, args.tokenizer_model or d.tokenizer_model)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, help="checkpoint directory (any TP/PP layout)")
    p.add_argument("--iteration", type=int, default=None, help="default: the latest checkpointed iteration")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely ids (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None, help="default: the checkpoint's")
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument("--tokenizer-model", default=None)
    args = p.parse_args(argv)
    if "RANK" not in os.environ:   # one process: a private one-rank group on a free port
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    _, device = init_distributed()
    model, config, _ = load_for_generation(args.load, args.iteration, device)
    tokenizer = _tokenizer(config, args)
    if tokenizer.vocab_size != config.model.vocab_size:
        print(f"error: tokenizer vocabulary {tokenizer.vocab_size} differs from the checkpoint's "
              f"{config.model.vocab_size}", file=sys.stderr)
        return 2
    new = generate(model, tokenizer.tokenize(args.prompt), args.max_new_tokens, args.temperature, args.top_k,
                   args.top_p, args.seed, stop_id=tokenizer.eod)
    print(args.prompt + tokenizer.detokenize(t for t in new if t != tokenizer.eod), flush=True)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
