"""The command line: argparse built from the config fields, model-size presets, Megatron-LM flag names.

Each dataclass field of config.py is one flag (`--field-name`, or the field's `flag` metadata); presets fill model
shapes first and explicit flags win. Nothing here checks values: config.validate does.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Optional, Sequence

from megagpt.config import SECTIONS, Config

# GPT-2 sizes from the GPT-2 paper / HF configs; 8.3B from the Megatron-LM paper (72 x 3072, 32 heads).
# Llama shapes from Meta's Llama 3.2 1B and Llama 3.1 8B configs (RoPE base 500000, RMSNorm eps 1e-5, SwiGLU,
# 8 key/value groups, no biases; the 1B ties its head, the 8B does not). Their long-context RoPE scaling is not
# implemented: the presets train with unscaled RoPE, so use them with --seq-length up to 8192.
_LLAMA = dict(position_embedding_type="rope", rotary_base=500000, normalization="RMSNorm", layernorm_epsilon=1e-5,
              swiglu=True, group_query_attention=True, num_query_groups=8, disable_bias_linear=True)
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-124m": dict(num_layers=12, hidden_size=768, num_attention_heads=12),
    "gpt2-355m": dict(num_layers=24, hidden_size=1024, num_attention_heads=16),
    "gpt2-774m": dict(num_layers=36, hidden_size=1280, num_attention_heads=20),
    "gpt2-1.5b": dict(num_layers=48, hidden_size=1600, num_attention_heads=25),
    "gpt-1.3b": dict(num_layers=24, hidden_size=2048, num_attention_heads=16),   # GPT-3 XL depth/width
    "megatron-8.3b": dict(num_layers=72, hidden_size=3072, num_attention_heads=32),
    "llama-1b": dict(_LLAMA, num_layers=16, hidden_size=2048, num_attention_heads=32, ffn_hidden_size=8192),
    "llama-8b": dict(_LLAMA, num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=14336,
                     untie_embeddings_and_output_weights=True),
}


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="megagpt: 3D-parallel GPT pre-training",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model-size", choices=sorted(PRESETS), help="preset sizes (explicit flags override)")
    parser.add_argument("--recompute-activations", action="store_true",
                        help="selective recompute of the attention core (= --recompute-granularity selective)")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            meta, flag, dest = f.metadata, _flag(f), f"{section}.{f.name}"
            if f.type == "bool":
                action = "store_false" if flag.startswith("--no-") else "store_true"
                group.add_argument(flag, *meta.get("aliases", []), dest=dest, action=action, default=None,
                                   help=meta["help"])
                continue
            kind = {"int": int, "float": float}.get(str(f.type).removeprefix("Optional[").rstrip("]"), str)
            kwargs: dict[str, Any] = dict(dest=dest, type=meta.get("type", kind), default=None, help=meta["help"])
            if "choices" in meta:
                kwargs["choices"] = [c for c in meta["choices"] if c is not None]
            if "nargs" in meta:
                kwargs["nargs"] = meta["nargs"]
            group.add_argument(flag, *meta.get("aliases", []), **kwargs)
    _add_deprecated(parser.add_argument_group("deprecated Megatron-LM forms (accepted with a note)"))
    return parser


def _add_deprecated(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--checkpoint-activations", action="store_true",
                       help="old name of --recompute-granularity full")
    group.add_argument("--data-impl", choices=["mmap", "lazy", "cached", "infer"],
                       help="old dataset implementation switch: only mmap exists (megagpt memory-maps every dataset)")
    group.add_argument("--use-mcore-models", action="store_true", help="old switch: megagpt has one model")
    group.add_argument("--transformer-impl", choices=["local", "transformer_engine", "inference_optimized"],
                       help="megagpt runs its own layers (= Megatron's local); Transformer Engine is not used")


def _apply_deprecated(ns: argparse.Namespace, config: Config) -> list[str]:
    """Map the deprecated forms onto the config; returns one note per form used. A value megagpt cannot honour
    stops here, before start-up."""
    notes = []
    if ns.checkpoint_activations:
        config.model.recompute_granularity = "full"
        notes.append("--checkpoint-activations is deprecated: using --recompute-granularity full")
    if ns.data_impl is not None:
        if ns.data_impl not in ("mmap", "infer"):
            raise SystemExit(f"--data-impl {ns.data_impl} is not supported: megagpt reads every dataset memory-mapped "
                             f"(--data-impl mmap); drop the flag")
        notes.append(f"--data-impl {ns.data_impl} is deprecated and ignored: datasets are always memory-mapped")
    if ns.use_mcore_models:
        notes.append("--use-mcore-models is deprecated and ignored: megagpt has one GPT model")
    if ns.transformer_impl is not None:
        if ns.transformer_impl != "local":
            raise SystemExit(f"--transformer-impl {ns.transformer_impl} is not supported: megagpt runs its own "
                             f"layers (Megatron's 'local'); drop the flag or pass --transformer-impl local")
        notes.append("--transformer-impl local is the only implementation megagpt has: the flag is ignored")
    return notes


def parse_args(argv: Optional[Sequence[str]] = None) -> Config:
    """Parse Megatron-style flags into a Config (presets first, explicit flags win)."""
    ns = build_parser().parse_args(argv)
    config = Config()
    if ns.recompute_activations:
        config.model.recompute_granularity = "selective"
    for note in _apply_deprecated(ns, config):
        if os.environ.get("RANK", "0") == "0":      # once per job, not once per rank
            print(f"megagpt: {note}", flush=True)
    if ns.model_size:
        for key, value in PRESETS[ns.model_size].items():
            setattr(config.model, key, value)
    for dest, value in vars(ns).items():
        if "." in dest and value is not None:
            section, name = dest.split(".", 1)
            setattr(getattr(config, section), name, value)
    return config


def flag_table() -> str:
    """The README's "Megatron-LM flag -> megagpt" table, built from the parser so it cannot drift (a test compares)."""
    rows, defaults = ["| flag | default | meaning |", "|---|---|---|"], Config()
    for group in build_parser()._action_groups:
        for action in group._group_actions:
            if not action.option_strings or action.dest == "help":
                continue
            names = " ".join(f"`{o}`" for o in action.option_strings)
            default = _default_of(defaults, action.dest)
            text = (action.help or "").replace("|", "\\|")
            rows.append(f"| {names} | {default} | {group.title}: {text} |")
    return "\n".join(rows)


def _default_of(defaults: Config, dest: str) -> str:
    if "." not in dest:
        return ""
    section, name = dest.split(".", 1)
    value = getattr(getattr(defaults, section), name)
    return "" if value is None or value == [] else f"`{value}`"
