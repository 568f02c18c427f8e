"""Plan before you launch: memory per stage, step time and layout search, as arithmetic on the config.

Pure arithmetic: no process groups, no allocation (tests/test_imports.py keeps parallel/, engines/ and training
out). Measurement of this machine for `--cluster cpu-here` lives in megagpt/diagnostics/hardware.py.
"""
