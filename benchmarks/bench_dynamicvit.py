"""DynamicViT benchmarks at DeiT-S shapes (N = 197, H = 6, D = 64), in one run:

  --level ops    policy_attention forward and forward+backward against DynamicViT's eager formula,
                 its torch.compile and SDPA with a boolean mask, at keep ratios 1.0, 0.7, 0.343;
                 varlen_attention against padded SDPA and per-image SDPA
  --level model  DynamicViT-S (fixed top-k and per-image threshold inference) against DeiT-S,
                 images/s at batch 1 and 64, and a training step (fused vs plain-PyTorch attention)

The code is `fastvit_kernels/_bench_dynamic_vit_attention.py` and `fastvit_kernels/_bench_dynamic_vit.py`
(so it also runs from an installed package); this is its command line, runnable from a checkout.

    python benchmarks/bench_dynamicvit.py --quick
    python benchmarks/bench_dynamicvit.py --level ops --keeps 0.7 --passes fwd+bwd
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (puts the checkout's package on sys.path)

from fastvit_kernels.bench.dynamic_vit import main  # noqa: E402

if __name__ == "__main__":
    main()
