import os
import sys

# Make tests/distributed.py importable as `distributed` from every test module and spawned child.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("OMP_NUM_THREADS", "1")
