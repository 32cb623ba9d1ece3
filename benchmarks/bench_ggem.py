"""Microbenchmark of `fastvit_kernels.ops.ggem_pool` (GGeM pooling) at ViT-S/B/L shapes: the op
against eager PyTorch GGeM and torch.compile of it, forward and forward+backward, with the fraction
of the memory-bandwidth floor.

The code is `fastvit_kernels/_bench_ggem_pool.py` (so it also runs from an installed package);
this is its command line, runnable from a checkout without installing.

    python benchmarks/bench_ggem.py --quick
    python benchmarks/bench_ggem.py --shapes vit_b vit_l --batch 256
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (puts the checkout's package on sys.path)

from fastvit_kernels.bench.ggem_pool import main  # noqa: E402

if __name__ == "__main__":
    main()
