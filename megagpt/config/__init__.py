"""Configuration: the ground floor of megagpt, importing nothing outside this package.

fields.py     the sections as dataclasses (one Megatron-LM flag per field) and the whole `Config`
run_length.py batch size per step (ramp-up), iterations from samples, LR-schedule lengths, model chunks
rules.py      every arithmetic rule and `validate()`, which names the offending numbers before any allocation
"""
from megagpt.config.fields import *  # noqa: F401,F403
from megagpt.config.fields import __all__ as _fields
from megagpt.config.rules import *  # noqa: F401,F403
from megagpt.config.rules import __all__ as _rules
from megagpt.config.run_length import *  # noqa: F401,F403
from megagpt.config.run_length import __all__ as _run_length

__all__ = _fields + _run_length + _rules
