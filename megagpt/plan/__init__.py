"""Plan before you launch: memory per stage, step time and layout search, as arithmetic on the config.

Pure arithmetic: no process groups, no allocation (tests/test_imports.py keeps parallel/, engines/ and training
out). Measurement of this machine for `--cluster cpu-here` lives in megagpt/diagnostics/hardware.py.
"""

from megagpt.plan.report import (activation_check, dry_run, explain,  # noqa: E402,F401 (the trainer's entry points)
                                  startup_report)
