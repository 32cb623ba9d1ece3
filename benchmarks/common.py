"""Timing, environment record, result rows, table and JSON helpers for the benchmark scripts.

The code lives in `fastvit_kernels/_bench_utils.py` so that `python -m fastvit_kernels.bench`
works from an installed package too; this module re-exports it and makes the scripts in this
folder runnable from a checkout without installing (`python benchmarks/bench_levit.py`).
"""

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # run as a script from a checkout: import the package beside us
    sys.path.insert(0, str(_ROOT))

from fastvit_kernels.bench.common import *  # noqa: E402,F401,F403
