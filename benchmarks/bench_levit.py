"""End-to-end timm LeViT images/s: eager timm against the patched model and torch.compile.

Inference (eval mode, torch.inference_mode; batch 32 on CPU, 256 on CUDA):
  eager            timm as is
  patched          fastvit_kernels.patch_timm(model)
  patched+folded   patch_timm(model, fold_bn=True) (BatchNorms folded into the Linears)
  compile          torch.compile(timm model)
  patched+compile  torch.compile(patch_timm(model))
Training step (train mode, forward + cross-entropy + backward + SGD step; batch 32 on CPU):
  eager, patched, compile (of the timm model).

Every variant's first output is compared with eager float32 timm (max relative error, must be
< 1e-4 in float32) before it is timed. Weights are random, with randomised attention biases and
BatchNorm statistics (a fresh timm LeViT has all-zero biases). The float32 matmul precision is
left at PyTorch's default.

    python benchmarks/bench_levit.py --quick
    python benchmarks/bench_levit.py --models levit_128s --passes infer
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the checkout's package on sys.path)

from fastvit_kernels.bench import __main__ as bench  # noqa: E402  (the end-to-end helpers live in the package)

PASSES = ("infer", "train")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda if available)")
    parser.add_argument("--models", nargs="+", default=["levit_128s", "levit_256"])
    parser.add_argument("--dtype", choices=sorted(bench.DTYPES),
                        help="default float32 on CPU, float16 on CUDA (training: autocast, float32 weights)")
    parser.add_argument("--batch", type=int, help="inference batch (default 32 on CPU, 256 on CUDA)")
    parser.add_argument("--train-batch", type=int, help="training batch (default 32 on CPU, 128 on CUDA)")
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    parser.add_argument("--impls", nargs="+", choices=bench.INFER_IMPLS,
                        help="subset of implementations (training runs those in eager/patched/compile)")
    parser.add_argument("--quick", action="store_true", help="short timings")
    parser.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/<name>_<device>_<date>.json)")
    args = parser.parse_args(argv)

    device = common.resolve_device(args.device)
    dtype = bench.DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    batch = args.batch or (256 if device.type == "cuda" else 32)
    train_batch = args.train_batch or (128 if device.type == "cuda" else 32)
    infer_impls = [i for i in bench.INFER_IMPLS if not args.impls or i in args.impls]
    train_impls = [i for i in bench.TRAIN_IMPLS if not args.impls or i in args.impls]
    env = common.environment(device)
    print(common.describe_env(env), file=sys.stderr)

    rows, checks = [], {}
    for name in args.models:
        common.log(f"building {name}")
        base = bench.build_levit(name, device)
        # The same check as the main job (outputs and gradients, float32) before any timing.
        try:
            checks[name] = check = bench.check_patched(base, device)
            common.log(f"{name} patched vs timm (float32): eval rel err {check['eval_rel_err']:.1e}, "
                       f"folded {check['folded_eval_rel_err']:.1e}, train {check['train_rel_err']:.1e}, "
                       f"grads {check['grad_rel_err']:.1e} -> {'OK' if check['ok'] else 'MISMATCH'}")
        except Exception as error:  # patching unavailable: the patched rows will say so too
            checks[name] = {"ok": False, "error": common.short_error(error, limit=2000)}
            common.log(f"{name} check failed: {common.short_error(error)}")
        if "infer" in args.passes:
            rows += bench.bench_inference(base, name, batch=batch, dtype=dtype, device=device, env=env,
                                          quick=args.quick, impls=infer_impls)
        if "train" in args.passes:
            rows += bench.bench_training(base, name, batch=train_batch, dtype=dtype, device=device, env=env,
                                         quick=args.quick, impls=train_impls)
        del base

    print(common.describe_env(env))
    for name, check in checks.items():
        if "error" in check:
            print(f"{name}: patched-vs-timm check failed: {check['error'][:300]}")
        else:
            print(f"{name}: patched vs timm (float32) max rel err: eval {check['eval_rel_err']:.1e}, folded "
                  f"{check['folded_eval_rel_err']:.1e}, train {check['train_rel_err']:.1e}, grads {check['grad_rel_err']:.1e}"
                  f" -> {'OK' if check['ok'] else 'MISMATCH'}")
    print(bench.levit_table(rows))
    path = common.write_json(args.out or common.default_out_path("bench_levit", env), env, rows, checks=checks)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
