"""The command line: argparse built from the config fields, model-size presets, Megatron-LM flag names.

Each dataclass field of config.py is one flag (`--field-name`, or the field's `flag` metadata); presets fill model
shapes first and explicit flags win. Nothing here checks values: config.validate does.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Optional, Sequence

from megagpt.config import SECTIONS, Config

# GPT-2 sizes from the GPT-2 paper / HF configs; 8.3B from the Megatron-LM paper (72 x 3072, 32 heads).
PRESETS: dict[str, dict[str, int]] = {
    "gpt2-124m": dict(num_layers=12, hidden_size=768, num_attention_heads=12),
    "gpt2-355m": dict(num_layers=24, hidden_size=1024, num_attention_heads=16),
    "gpt2-774m": dict(num_layers=36, hidden_size=1280, num_attention_heads=20),
    "gpt2-1.5b": dict(num_layers=48, hidden_size=1600, num_attention_heads=25),
    "gpt-1.3b": dict(num_layers=24, hidden_size=2048, num_attention_heads=16),   # GPT-3 XL depth/width
    "megatron-8.3b": dict(num_layers=72, hidden_size=3072, num_attention_heads=32),
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
                group.add_argument(flag, dest=dest, action=action, default=None, help=meta["help"])
                continue
            kind = {"int": int, "float": float}.get(str(f.type).removeprefix("Optional[").rstrip("]"), str)
            kwargs: dict[str, Any] = dict(dest=dest, type=kind, default=None, help=meta["help"])
            if "choices" in meta:
                kwargs["choices"] = [c for c in meta["choices"] if c is not None]
            if "nargs" in meta:
                kwargs["nargs"] = meta["nargs"]
            group.add_argument(flag, **kwargs)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> Config:
    """Parse Megatron-style flags into a Config (presets first, explicit flags win)."""
    ns = build_parser().parse_args(argv)
    config = Config()
    if ns.recompute_activations:
        config.model.recompute_granularity = "selective"
    if ns.model_size:
        for key, value in PRESETS[ns.model_size].items():
            setattr(config.model, key, value)
    for dest, value in vars(ns).items():
        if "." in dest and value is not None:
            section, name = dest.split(".", 1)
            setattr(getattr(config, section), name, value)
    return config
