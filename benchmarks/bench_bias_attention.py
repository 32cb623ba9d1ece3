"""Microbenchmark of `fastvit_kernels.ops.bias_attention` at every LeViT attention shape: the op
against eager PyTorch, SDPA, torch.compile and FlexAttention, forward and forward+backward.

The code is `fastvit_kernels/_bench_bias_attention.py` (so the main job can run it from an
installed package); this is its command line, runnable from a checkout without installing.

    python benchmarks/bench_bias_attention.py --quick
    python benchmarks/bench_bias_attention.py --shapes 128s.attn14 256.attn14 --passes fwd
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (puts the checkout's package on sys.path)

from fastvit_kernels.bench.bias_attention import main  # noqa: E402

if __name__ == "__main__":
    main()
