"""End-to-end QnA-ViT images/s (inference and a training step): the model as shipped
against the same model in plain PyTorch (unfold or grouped-conv QnA) and torch.compile.

The code is `fastvit_kernels/_bench_qna_vit.py` (so the main job can run it from an
installed package); this is its command line, runnable from a checkout without installing.

    python benchmarks/bench_qna_vit.py --quick
    python benchmarks/bench_qna_vit.py --model qna_vit_tiny_7x7 --passes infer
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (puts the checkout's package on sys.path)

from fastvit_kernels.bench.qna_vit import main  # noqa: E402

if __name__ == "__main__":
    main()
