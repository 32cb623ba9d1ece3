"""Microbenchmark of `fastvit_kernels.ops.qna_attention` at the QnA-ViT tiny shapes: the op
against the unfold and grouped-convolution formulations and their torch.compile, forward and forward+backward, with peak memory.

The code is `fastvit_kernels/_bench_qna_attention.py` (so the main job can run it from an
installed package); this is its command line, runnable from a checkout without installing.

    python benchmarks/bench_qna.py --quick
    python benchmarks/bench_qna.py --shapes s0 --kernel-sizes 3 --passes fwd
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (puts the checkout's package on sys.path)

from fastvit_kernels.bench.qna_attention import main  # noqa: E402

if __name__ == "__main__":
    main()
