"""End-to-end timm LeViT images/s: eager timm against the patched model and torch.compile.

Inference (eval mode, torch.inference_mode; batch 32 on CPU, 256 on CUDA):
  eager            timm as is
  patched          fastvit_kernels.patch_timm(model)
  patched+folded   patch_timm(model, fold_bn=True) (BatchNorms folded into the Linears)
  compile          torch.compile(timm model)
  patched+compile  torch.compile(patch_timm(model))
Training step (train mode, forward + cross-entropy + backward + SGD step; batch 32 on CPU; bf16 and
fp16 under autocast with float32 weights):
  eager, patched, compile (of the timm model), patched+compile.

Before any timing, patched and timm are compared in float32 (check_patched: eval outputs, train
outputs and every parameter's gradient). Every variant's first output is compared with eager
float32 timm (max relative error, must be < 1e-4 in float32) before it is timed. Weights are
random, with randomised attention biases and BatchNorm statistics (a fresh timm LeViT has
all-zero biases). The float32 matmul precision is left at PyTorch's default.
`python -m fastvit_kernels.bench` runs the check and the inference part for one model.

    python -m fastvit_kernels.bench.levit --quick
    python -m fastvit_kernels.bench.levit --models levit_128s --passes infer
"""

import copy
import importlib
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvit_kernels.bench import common

INFER_IMPLS = ("eager", "patched", "patched+folded", "compile", "patched+compile")
TRAIN_IMPLS = ("eager", "patched", "compile", "patched+compile")
PASSES = ("infer", "train")
# Train mode: BatchNorm divides by batch statistics, which amplifies rounding (torch.compile of
# timm itself differs from eager timm by ~3e-4 there), so outputs and gradients get 1e-3; other
# comparisons with eager timm accept common.REL_TOL of the dtype.
TRAIN_TOL = 1e-3


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def patch_api() -> Tuple[Callable, Callable]:
    """(patch_timm, fold_batchnorm), from the package top level or fastvit_kernels.patch."""
    import fastvit_kernels

    patch = getattr(fastvit_kernels, "patch_timm", None)
    fold = getattr(fastvit_kernels, "fold_batchnorm", None)
    if patch is None or fold is None:
        module = importlib.import_module("fastvit_kernels.patch")
        patch, fold = module.patch_timm, module.fold_batchnorm
    return patch, fold


def randomize_levit_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Gives LeViT non-trivial attention biases and BatchNorm statistics, in place.

    A fresh timm LeViT has zero attention biases and zero-initialised BatchNorm weights after each
    attention (so the attention branch gets no gradient): comparisons on it would prove little.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("attention_biases"):
                p.copy_(torch.randn(p.shape, generator=g) * 2.0)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model


def build_levit(name: str, device: torch.device, seed: int = 0, **model_kwargs) -> nn.Module:
    """timm model (random weights, randomised biases and BN statistics), eval mode, on device.
    model_kwargs go to timm.create_model (e.g. img_size=64 for a tiny model)."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **model_kwargs)
    return randomize_levit_(model, seed).to(device).eval()


def make_variant(base: nn.Module, impl: str, dtype: torch.dtype = torch.float32, train: bool = False) -> nn.Module:
    """A copy of `base` for one implementation: eager, patched, patched+folded, compile, patched+compile;
    for inference also compile+freezing (fastvit_kernels.compile_frozen of the unpatched model:
    Inductor's freezing and max-autotune GEMMs) and serve
    (fastvit_kernels.optimize_for_inference(model, dtype, compile=True), the same compiler settings)."""
    if impl == "serve":
        from fastvit_kernels.inference import optimize_for_inference

        return optimize_for_inference(copy.deepcopy(base), dtype, compile=True)
    if impl == "compile+freezing":
        from fastvit_kernels.inference import compile_frozen

        return compile_frozen(copy.deepcopy(base).to(dtype).eval())
    patch_timm, _ = patch_api() if impl.startswith("patched") else (None, None)
    model = copy.deepcopy(base).to(dtype).train(train)
    if impl.startswith("patched"):
        model = patch_timm(model, fold_bn=(impl == "patched+folded"))
    if impl.endswith("compile"):
        model = torch.compile(model)
    return model


def check_patched(base: nn.Module, device: torch.device, batch: int = 8, seed: int = 0,
                  image_size: int = 224) -> Dict[str, object]:
    """Patched vs eager timm in float32: eval outputs (patched, patched+folded), train-mode outputs
    and the gradients of every parameter for a cross-entropy loss."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, image_size, image_size, generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    result: Dict[str, object] = {}
    patch_timm, _ = patch_api()

    with torch.no_grad():
        want = copy.deepcopy(base).eval()(x)
        patched = patch_timm(copy.deepcopy(base).eval())
        result["patch_report"] = str(getattr(patched, "fastvit_kernels_report", ""))
        result["eval_rel_err"] = common.rel_err(patched(x), want)
        result["folded_eval_rel_err"] = common.rel_err(make_variant(base, "patched+folded")(x), want)

    eager = copy.deepcopy(base).train()
    patched = patch_timm(copy.deepcopy(base).train())
    outs = {}
    for key, model in (("eager", eager), ("patched", patched)):
        out = model(x)
        F.cross_entropy(out, y).backward()
        outs[key] = out
    result["train_rel_err"] = common.rel_err(outs["patched"], outs["eager"])
    # Per parameter: max|Δgrad| / max(max|grad|, 1e-3 · the largest gradient of the model). The
    # floor matters: some gradients are exactly zero in exact arithmetic (a bias feeding only
    # train-mode BatchNorms) and both runs then hold rounding noise whose ratio means nothing.
    patched_params = dict(patched.named_parameters())
    grads = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    floor = 1e-3 * max(g.abs().max().item() for g in grads.values())
    worst, worst_name, missing, compared, bias_worst = 0.0, None, [], 0, 0.0
    for name, p in eager.named_parameters():
        q = patched_params.get(name)
        if q is None or p.grad is None or q.grad is None:
            missing.append(name)
            continue
        compared += 1
        err = (q.grad.double() - p.grad.double()).abs().max().item() / max(p.grad.abs().max().item(), floor)
        if name.endswith("attention_biases"):
            bias_worst = max(bias_worst, err)
        if err > worst:
            worst, worst_name = err, name
    result["attention_bias_grad_rel_err"] = bias_worst
    result.update(grad_rel_err=worst, grad_worst_param=worst_name, grads_compared=compared, grads_missing=missing)
    result["ok"] = (
        result["eval_rel_err"] < common.REL_TOL[torch.float32]
        and result["folded_eval_rel_err"] < common.REL_TOL[torch.float32]
        and result["train_rel_err"] < TRAIN_TOL
        and worst < TRAIN_TOL
        and not missing
    )
    return result


def _levit_row(env, model_name, pass_, impl, batch, dtype, **fields):
    return common.make_row(env, case=model_name, **{"pass": pass_}, impl=impl, B=batch,
                           dtype=common.dtype_name(dtype), **fields)


def bench_inference(base: nn.Module, model_name: str, *, batch: int, dtype: torch.dtype, device: torch.device,
                    env: Dict, quick: bool, impls: Sequence[str] = INFER_IMPLS, backend: Optional[str] = None,
                    image_size: int = 224, min_run_time: Optional[float] = None) -> List[Dict]:
    """Images/s of each variant in eval mode under inference_mode; each output is compared with
    eager float32 timm (max relative error) before it is timed. `backend` forces the ops' backend
    in the patched variants (common.forcing_backend); min_run_time: CPU seconds per timing."""
    x32 = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(1)).to(device)
    x = x32.to(dtype)
    with torch.inference_mode():
        want = copy.deepcopy(base).eval()(x32).float()
    rows = []
    for impl in impls:
        row = _levit_row(env, model_name, "infer", impl, batch, dtype)
        common.log(f"{model_name} infer {impl} (batch {batch}) ...")

        def prepare():
            model = make_variant(base, impl, dtype)
            if impl.startswith("patched"):
                row["backend_note"] = str(getattr(getattr(model, "_orig_mod", model), "fastvit_kernels_report", ""))

            def step():
                with torch.inference_mode():
                    return model(x)

            return step

        def check(out):
            row["max_rel_err"] = common.rel_err(out.float(), want)
            row["match"] = row["max_rel_err"] < common.REL_TOL[dtype]
            if not row["match"]:
                common.log(f"    WARNING: {impl} output differs from eager timm (rel err {row['max_rel_err']:.2e})")

        # (patching not available, a compile failure: the row records the error)
        with common.forcing_backend(backend if impl.startswith("patched") else None):
            rows.append(common.measure_model(row, prepare, device, images=batch, quick=quick,
                                             min_run_time=_min_run_time(quick, min_run_time), check=check))
    add_speedups(rows, "patched+folded" if "patched+folded" in impls else "patched")
    return rows


def bench_training(base: nn.Module, model_name: str, *, batch: int, dtype: torch.dtype, device: torch.device,
                   env: Dict, quick: bool, impls: Sequence[str] = TRAIN_IMPLS, backend: Optional[str] = None,
                   image_size: int = 224, min_run_time: Optional[float] = None) -> List[Dict]:
    """Images/s of a training step (forward, cross-entropy, backward, SGD step) in train mode.
    Parameters stay float32; a float16/bfloat16 dtype runs the step under autocast. `backend`,
    min_run_time: as for bench_inference."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 3, image_size, image_size, generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with autocast:
        want = copy.deepcopy(base).train()(x).detach().float()
    rows = []
    for impl in impls:
        row = _levit_row(env, model_name, "train", impl, batch, dtype)
        common.log(f"{model_name} train {impl} (batch {batch}) ...")

        def prepare():
            model = make_variant(base, impl, torch.float32, train=True)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

            def step():
                opt.zero_grad(set_to_none=True)
                with autocast:
                    out = model(x)
                    loss = F.cross_entropy(out.float(), y)
                loss.backward()
                opt.step()
                return out

            return step

        def check(out):  # the first step's output is from the initial weights: comparable with eager
            row["max_rel_err"] = common.rel_err(out.float(), want)
            row["match"] = row["max_rel_err"] < max(TRAIN_TOL, common.REL_TOL[dtype])

        with common.forcing_backend(backend if impl.startswith("patched") else None):
            rows.append(common.measure_model(row, prepare, device, images=batch, quick=quick,
                                             min_run_time=_min_run_time(quick, min_run_time), check=check))
    add_speedups(rows, "patched")
    return rows


def _min_run_time(quick: bool, given: Optional[float]) -> float:
    return given if given is not None else (1.0 if quick else 4.0)


def add_speedups(rows: List[Dict], ref_impl: str) -> None:
    """ref_speedup (this row's time / ref_impl's, as for kernels) and vs_eager (eager time / this)."""
    common.add_ratios(rows, ref_impl)
    eager = {(r["case"], r["pass"]): r["ms"] for r in rows if r["impl"] == "eager" and r.get("ms")}
    for r in rows:
        e = eager.get((r["case"], r["pass"]))
        r["vs_eager"] = e / r["ms"] if e and r.get("ms") else None


COLUMNS = [
    common.Column("case", "model", left=True),
    common.Column("pass", "pass", left=True),
    common.Column("impl", "impl", left=True),
    common.Column("B", "B"),
    common.Column("img_per_s", "img/s", "{:.1f}"),
    common.Column("ms", "ms", "{:.1f}"),
    common.Column("vs_eager", "x eager", "{:.2f}"),
    common.Column("ref_speedup", "ref x", "{:.2f}"),
    common.Column("max_rel_err", "rel err", "{:.1e}"),
    common.Column("first_call_s", "1st s", "{:.1f}"),
    common.Column("note", "note", left=True),
]


def _notes(row: Dict) -> List[str]:
    return (["ref"] if row.get("impl") == row.get("ref_impl") else []) + (
        ["MISMATCH vs eager"] if row.get("match") is False else [])


def table(rows: List[Dict]) -> str:
    return common.noted_table(rows, COLUMNS, _notes)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def describe_check(name: str, check: Dict[str, object]) -> str:
    if "error" in check:
        return f"{name}: patched-vs-timm check failed: {check['error'][:300]}"
    return (f"{name}: patched vs timm (float32) max rel err: eval {check['eval_rel_err']:.1e}, folded "
            f"{check['folded_eval_rel_err']:.1e}, train {check['train_rel_err']:.1e}, grads {check['grad_rel_err']:.1e}"
            f" -> {'OK' if check['ok'] else 'MISMATCH'}")


def add_options(parser) -> None:
    parser.add_argument("--models", nargs="+", default=["levit_128s", "levit_256"])
    parser.add_argument("--train-batch", type=int, help="training batch (default 32 on CPU, 128 on CUDA)")
    parser.add_argument("--impls", nargs="+", choices=INFER_IMPLS,
                        help="subset of implementations (training runs those in eager/patched/compile)")


def run_from_args(ctx: common.Context) -> List[Dict]:
    args, device = ctx.args, ctx.device
    train_batch = args.train_batch or (128 if device.type == "cuda" else 32)
    infer_impls = [i for i in INFER_IMPLS if not args.impls or i in args.impls]
    train_impls = [i for i in TRAIN_IMPLS if not args.impls or i in args.impls]
    rows, checks = [], {}
    for name in args.models:
        common.log(f"building {name}")
        base = build_levit(name, device)
        # The same check as the main job (outputs and gradients, float32) before any timing.
        try:
            checks[name] = check = check_patched(base, device)
            common.log(f"{name} patched vs timm (float32): eval rel err {check['eval_rel_err']:.1e}, "
                       f"folded {check['folded_eval_rel_err']:.1e}, train {check['train_rel_err']:.1e}, "
                       f"grads {check['grad_rel_err']:.1e} -> {'OK' if check['ok'] else 'MISMATCH'}")
        except Exception as error:  # patching unavailable: the patched rows will say so too
            checks[name] = {"ok": False, "error": common.short_error(error, limit=2000)}
            common.log(f"{name} check failed: {common.short_error(error)}")
        if "infer" in args.passes:
            rows += bench_inference(base, name, batch=ctx.batch, dtype=ctx.dtype, device=device, env=ctx.env,
                                    quick=ctx.quick, impls=infer_impls)
        if "train" in args.passes:
            rows += bench_training(base, name, batch=train_batch, dtype=ctx.dtype, device=device, env=ctx.env,
                                   quick=ctx.quick, impls=train_impls)
        del base
    ctx.json_extra["checks"] = checks
    return rows


def report(rows: List[Dict], ctx: common.Context) -> str:
    checks = [describe_check(name, check) for name, check in ctx.json_extra["checks"].items()]
    return "\n".join(checks + [table(rows)])


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.main(argv, __doc__, name="bench_levit", batch=(32, 256), passes=PASSES,
                       add_options=add_options, run=run_from_args, report=report,
                       batch_help="inference batch (default 32 on CPU, 256 on CUDA)",
                       dtype_help="default float32 on CPU, float16 on CUDA (training: autocast, float32 weights)")


if __name__ == "__main__":
    sys.exit(main())
