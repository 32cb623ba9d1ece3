"""Benchmarks of fastvit_kernels. Each module runs as `python -m fastvit_kernels.bench.<module>`:

  (package)         python -m fastvit_kernels.bench: the main job (checks, images/s, kernels, targets)
  levit             end-to-end timm LeViT, eager vs patched vs torch.compile
  bias_attention    the LeViT attention op at every LeViT shape
  qna_attention     the QnA op (and the QnA layer) at the QnA-ViT tiny shapes
  qna_vit           end-to-end QnA-ViT vs the same model in plain PyTorch
  ggem_pool         GGeM pooling at ViT-S/B/L shapes
  policy_attention  DynamicViT's training attention (keep policy) at DeiT-S shapes
  varlen_attention  packed variable-length attention (DynamicViT inference) at DeiT-S shapes
  dynamic_vit       DynamicViT-S vs DeiT-S images/s (and, with --level ops, the two ops above)
  gpu               the one-command GPU verification suite (checks, pytest, benchmarks, levit)
  common            what they share: timing, environment, rows, tables, JSON, the command line

Nothing is imported here, so `python -m fastvit_kernels.bench.<module>` runs its module fresh.
The pytest-benchmark suite of the ops is benchmarks/test_kernels.py (see benchmarks/README.md).
"""
