"""`python -m fastvit_kernels.bench`: does fastvit_kernels work here, and how fast is it?

On the device present (cuda if available, else cpu; `--device` to choose):
  1. the environment: hardware, versions, which bias_attention backend runs;
  2. timm levit_128s against a patched copy: outputs (eval) and gradients (train) must match;
  3. end-to-end images/s: eager timm, patched, patched + folded BatchNorm, torch.compile of timm;
  4. the bias_attention microbenchmarks (fastvit_kernels/_bench_bias_attention.py, also run by
     benchmarks/bench_bias_attention.py);
  5. the qna_attention microbenchmark at the QnA-ViT tiny stage-0 shape (k=3) and QnA-ViT tiny
     inference images/s against plain PyTorch (benchmarks/bench_qna.py, bench_qna_vit.py);
  6. DynamicViT: policy_attention fwd+bwd at keep 0.7 / 0.343 against DynamicViT's eager formula
     and SDPA, varlen_attention against padded SDPA, and DynamicViT-S against DeiT-S images/s at
     batch 1 and 64 (benchmarks/bench_dynamicvit.py);
  7. the performance targets (benchmarks/README.md) met or not, and the JSON file.

    python -m fastvit_kernels.bench --quick          # a few minutes on a 2-core CPU
    python -m fastvit_kernels.bench --out results.json

Works without the native extension: then the plain-PyTorch reference runs, and it says so.
The end-to-end helpers here are also used by benchmarks/bench_levit.py.
"""

import argparse
import copy
import importlib
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvit_kernels.bench import common as U

INFER_IMPLS = ("eager", "patched", "patched+folded", "compile", "patched+compile")
TRAIN_IMPLS = ("eager", "patched", "compile")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Largest relative error (max|a-b| / max|b|) accepted between patched and eager timm.
OUTPUT_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
# Train mode: BatchNorm divides by batch statistics, which amplifies rounding (torch.compile of
# timm itself differs from eager timm by ~3e-4 there), so outputs and gradients get 1e-3.
TRAIN_TOL = 1e-3

# Performance targets (benchmarks/README.md): (description, section, case, pass, batch, peer,
# minimum op speed-up = peer time / reference time). Defined for CPU float32 at these batches.
# Section "qna" reads the QnA summary (fastvit_kernels._bench_qna_attention.summarize): the peer
# is a summary column, and a negative minimum means "at most" (memory ratios).
TARGETS = (
    ("bias_attention fwd, 128s.attn14 B=64: op >= 5x eager", "kernel", "128s.attn14", "fwd", 64, "eager", 5.0),
    ("bias_attention fwd, 128s.attn14 B=64: op >= 2.5x compiled FlexAttention", "kernel", "128s.attn14", "fwd", 64, "flex", 2.5),
    ("bias_attention fwd+bwd, 128s.attn14 B=64: op >= 3x SDPA", "kernel", "128s.attn14", "fwd+bwd", 64, "sdpa", 3.0),
    ("levit_128s inference batch 32: patched+folded >= 1.2x torch.compile(timm)", "levit", "levit_128s", "infer", 32, "compile", 1.2),
    # QnA (issue 3), at the QnA-ViT tiny stage-0 layer (56x56, h=8, d=8, k=3), batch 32; peers are
    # the fastest plain-PyTorch formulation (unfold or grouped conv) and the fastest compiled one.
    ("qna_attention fwd, s0.qna.k3 B=32: op >= 3x the fastest PyTorch formulation", "qna", "s0.qna.k3", "fwd", 32, "vs_eager", 3.0),
    ("qna_attention fwd, s0.qna.k3 B=32: op >= 1.5x its torch.compile", "qna", "s0.qna.k3", "fwd", 32, "vs_compiled", 1.5),
    ("qna_attention fwd+bwd, s0.qna.k3 B=32: op >= 2x the fastest PyTorch formulation", "qna", "s0.qna.k3", "fwd+bwd", 32, "vs_eager", 2.0),
    ("qna_attention fwd+bwd, s0.qna.k3 B=32: peak memory <= 0.5x unfold's", "qna", "s0.qna.k3", "fwd+bwd", 32, "mem_vs_unfold", -0.5),
    # DynamicViT (issue 4), DeiT-S shapes (N=197, H=6, D=64). Section "dyvit" reads the attention
    # rows (peer's time / op's time); "dyvit_keep" the op's time at keep 0.7 / its time at the
    # case's keep; "dyvit_model" DynamicViT-S images/s / DeiT-S images/s.
    ("policy_attention fwd+bwd, keep 0.7 B=64: op >= 3x DynamicViT's eager formula", "dyvit", "policy.keep0.7", "fwd+bwd", 64, "eager", 3.0),
    ("policy_attention fwd+bwd, keep 0.343 B=64: faster than at keep 0.7", "dyvit_keep", "policy.keep0.343", "fwd+bwd", 64, "op", 1.0),
    ("DynamicViT-S inference batch 64: >= 1.3x DeiT-S images/s", "dyvit_model", "B64", "infer", 64, "dyvit.topk", 1.3),
    ("DynamicViT-S inference batch 1: not slower than DeiT-S", "dyvit_model", "B1", "infer", 1, "dyvit.topk", 1.0),
)


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


def build_levit(name: str, device: torch.device, seed: int = 0) -> nn.Module:
    """timm model (random weights, randomised biases and BN statistics), eval mode, on device."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    return randomize_levit_(model, seed).to(device).eval()


def make_variant(base: nn.Module, impl: str, dtype: torch.dtype = torch.float32, train: bool = False) -> nn.Module:
    """A copy of `base` for one implementation: eager, patched, patched+folded, compile, patched+compile."""
    patch_timm, _ = patch_api() if impl.startswith("patched") else (None, None)
    model = copy.deepcopy(base).to(dtype).train(train)
    if impl.startswith("patched"):
        model = patch_timm(model, fold_bn=(impl == "patched+folded"))
    if impl.endswith("compile"):
        model = torch.compile(model)
    return model


def check_patched(base: nn.Module, device: torch.device, batch: int = 8, seed: int = 0) -> Dict[str, object]:
    """Patched vs eager timm in float32: eval outputs (patched, patched+folded), train-mode outputs
    and the gradients of every parameter for a cross-entropy loss."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 224, 224, generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    result: Dict[str, object] = {}
    patch_timm, _ = patch_api()

    with torch.no_grad():
        want = copy.deepcopy(base).eval()(x)
        patched = patch_timm(copy.deepcopy(base).eval())
        result["patch_report"] = str(getattr(patched, "fastvit_kernels_report", ""))
        result["eval_rel_err"] = U.rel_err(patched(x), want)
        result["folded_eval_rel_err"] = U.rel_err(make_variant(base, "patched+folded")(x), want)

    eager = copy.deepcopy(base).train()
    patched = patch_timm(copy.deepcopy(base).train())
    outs = {}
    for key, model in (("eager", eager), ("patched", patched)):
        out = model(x)
        F.cross_entropy(out, y).backward()
        outs[key] = out
    result["train_rel_err"] = U.rel_err(outs["patched"], outs["eager"])
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
        result["eval_rel_err"] < OUTPUT_TOL[torch.float32]
        and result["folded_eval_rel_err"] < OUTPUT_TOL[torch.float32]
        and result["train_rel_err"] < TRAIN_TOL
        and worst < TRAIN_TOL
        and not missing
    )
    return result


def _levit_row(env, model_name, pass_, impl, batch, dtype, **fields):
    return U.make_row(env, case=model_name, **{"pass": pass_}, impl=impl, B=batch,
                      dtype=str(dtype).replace("torch.", ""), **fields)


def bench_inference(base: nn.Module, model_name: str, *, batch: int, dtype: torch.dtype, device: torch.device,
                    env: Dict, quick: bool, impls: Sequence[str] = INFER_IMPLS) -> List[Dict]:
    """Images/s of each variant in eval mode under inference_mode; each output is compared with
    eager float32 timm (max relative error) before it is timed."""
    x32 = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device)
    x = x32.to(dtype)
    with torch.inference_mode():
        want = copy.deepcopy(base).eval()(x32).float()
    rows = []
    for impl in impls:
        row = _levit_row(env, model_name, "infer", impl, batch, dtype)
        U.log(f"{model_name} infer {impl} (batch {batch}) ...")
        try:
            model = make_variant(base, impl, dtype)
            if impl.startswith("patched"):
                row["backend_note"] = str(getattr(getattr(model, "_orig_mod", model), "fastvit_kernels_report", ""))

            def run():
                with torch.inference_mode():
                    return model(x)

            first = {}
            row["first_call_s"] = round(U.time_call(lambda: first.setdefault("out", run()), device), 3)
            row["max_rel_err"] = U.rel_err(first.pop("out").float(), want)
            row["match"] = row["max_rel_err"] < OUTPUT_TOL[dtype]
            if not row["match"]:
                U.log(f"    WARNING: {impl} output differs from eager timm (rel err {row['max_rel_err']:.2e})")
            t = U.benchmark_ms(run, device, quick=quick, min_run_time=1.0 if quick else 4.0)
            row.update(ms=t["ms"], iqr_ms=t["iqr_ms"], runs=t["runs"], img_per_s=batch / (t["ms"] / 1e3))
            U.log(f"    {row['img_per_s']:.1f} img/s ({row['ms']:.1f} ms/batch, first call {row['first_call_s']:.1f} s, "
                  f"rel err {row['max_rel_err']:.1e})")
        except Exception as error:  # e.g. patching not available, compile failure: record, go on
            row["error"] = U.short_error(error, limit=2000)
            U.log(f"    failed: {U.short_error(error)}")
        rows.append(row)
    _speedups(rows, "patched+folded" if "patched+folded" in impls else "patched")
    return rows


def bench_training(base: nn.Module, model_name: str, *, batch: int, dtype: torch.dtype, device: torch.device,
                   env: Dict, quick: bool, impls: Sequence[str] = TRAIN_IMPLS) -> List[Dict]:
    """Images/s of a training step (forward, cross-entropy, backward, SGD step) in train mode.
    Parameters stay float32; a float16/bfloat16 dtype runs the step under autocast."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 3, 224, 224, generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with autocast:
        want = copy.deepcopy(base).train()(x).detach().float()
    rows = []
    for impl in impls:
        row = _levit_row(env, model_name, "train", impl, batch, dtype)
        U.log(f"{model_name} train {impl} (batch {batch}) ...")
        try:
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

            first = {}  # the first step's output is from the initial weights: comparable with eager
            row["first_call_s"] = round(U.time_call(lambda: first.setdefault("out", step()), device), 3)
            row["max_rel_err"] = U.rel_err(first.pop("out").float(), want)
            row["match"] = row["max_rel_err"] < max(TRAIN_TOL, OUTPUT_TOL[dtype])
            t = U.benchmark_ms(step, device, quick=quick, min_run_time=1.0 if quick else 4.0)
            row.update(ms=t["ms"], iqr_ms=t["iqr_ms"], runs=t["runs"], img_per_s=batch / (t["ms"] / 1e3))
            U.log(f"    {row['img_per_s']:.1f} img/s ({row['ms']:.1f} ms/step, first call {row['first_call_s']:.1f} s)")
        except Exception as error:
            row["error"] = U.short_error(error, limit=2000)
            U.log(f"    failed: {U.short_error(error)}")
        rows.append(row)
    _speedups(rows, "patched")
    return rows


def _speedups(rows: List[Dict], ref_impl: str) -> None:
    """ref_speedup (this row's time / ref_impl's, as for kernels) and vs_eager (eager time / this)."""
    U.add_ratios(rows, ref_impl)
    eager = {(r["case"], r["pass"]): r["ms"] for r in rows if r["impl"] == "eager" and r.get("ms")}
    for r in rows:
        e = eager.get((r["case"], r["pass"]))
        r["vs_eager"] = e / r["ms"] if e and r.get("ms") else None


LEVIT_COLUMNS = [
    U.Column("case", "model", left=True),
    U.Column("pass", "pass", left=True),
    U.Column("impl", "impl", left=True),
    U.Column("B", "B"),
    U.Column("img_per_s", "img/s", "{:.1f}"),
    U.Column("ms", "ms", "{:.1f}"),
    U.Column("vs_eager", "x eager", "{:.2f}"),
    U.Column("ref_speedup", "ref x", "{:.2f}"),
    U.Column("max_rel_err", "rel err", "{:.1e}"),
    U.Column("first_call_s", "1st s", "{:.1f}"),
    U.Column("note", "note", left=True),
]


def levit_table(rows: List[Dict]) -> str:
    for r in rows:
        notes = []
        if r.get("impl") == r.get("ref_impl"):
            notes.append("ref")
        if r.get("match") is False:
            notes.append("MISMATCH vs eager")
        if r.get("error"):
            notes.append(f"n/a: {r['error'][:160]}")
        r["note"] = "; ".join(notes)
    return U.format_table(rows, LEVIT_COLUMNS)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


class Stages:
    """Prints each stage with the elapsed time (stderr), so a slow step is visible as it runs."""

    def __init__(self, total: int):
        self.total, self.n, self.t0 = total, 0, time.perf_counter()

    def next(self, title: str) -> None:
        self.n += 1
        U.log(f"=== stage {self.n}/{self.total}: {title} (elapsed {time.perf_counter() - self.t0:.0f} s)")


def _find(rows: List[Dict], case: str, pass_: str, impl: str) -> Optional[Dict]:
    return next((r for r in rows if (r.get("case"), r.get("pass"), r.get("impl")) == (case, pass_, impl)), None)


def check_targets(levit_rows: List[Dict], kernel_rows: List[Dict], qna_summary: List[Dict], env: Dict,
                  dyvit_rows: Sequence[Dict] = (), dyvit_model_rows: Sequence[Dict] = ()) -> List[Dict]:
    results = []
    for text, section, case, pass_, batch, peer, bound in TARGETS:
        if section == "qna":
            row = next((r for r in qna_summary if (r["level"], r["case"], r["pass"]) == ("op", case, pass_)), None)
            measured = row.get(peer) if row else None
        elif section == "dyvit":
            row = _find(list(dyvit_rows), case, pass_, peer)
            measured = row.get("ref_speedup") if row else None
        elif section == "dyvit_keep":
            row, at_07 = _find(list(dyvit_rows), case, pass_, peer), _find(list(dyvit_rows), "policy.keep0.7", pass_, peer)
            measured = at_07["ms"] / row["ms"] if row and at_07 and row.get("ms") and at_07.get("ms") else None
        elif section == "dyvit_model":
            row = _find(list(dyvit_model_rows), case, pass_, peer)
            measured = row.get("vs_deit") if row else None
        else:
            row = next((r for r in (levit_rows if section == "levit" else kernel_rows)
                        if (r.get("case"), r.get("pass"), r.get("impl")) == (case, pass_, peer)), None)
            measured = row.get("ref_speedup") if row else None
        if measured is None:
            verdict = "not measured"
        elif env["device_type"] != "cpu" or row.get("dtype", "float32") != "float32" or row.get("B", batch) != batch:
            verdict = f"n/a (defined for CPU float32, batch {batch})"
        else:
            verdict = "met" if (measured >= bound if bound > 0 else measured <= -bound) else "NOT met"
        results.append({"target": text, "bound": bound, "measured": measured, "verdict": verdict})
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastvit_kernels.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda if available)")
    parser.add_argument("--model", default="levit_128s", help="timm LeViT model (default levit_128s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="timing dtype: default float32 on CPU, float16 on CUDA (checks always float32)")
    parser.add_argument("--batch", type=int, help="end-to-end batch (default 32 on CPU, 256 on CUDA)")
    parser.add_argument("--quick", action="store_true", help="one kernel shape, short timings (~5 min on 2 CPU cores)")
    parser.add_argument("--no-compile", action="store_true", help="skip every torch.compile peer")
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel microbenchmarks")
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/ of the checkout, if any)")
    args = parser.parse_args(argv)

    stages = Stages(7)
    device = U.resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    batch = args.batch or (256 if device.type == "cuda" else 32)

    stages.next("environment")
    env = U.environment(device)
    print(U.describe_env(env), flush=True)
    from fastvit_kernels.ops.bias_attention import select_backend

    s = U.LEVIT_ATTENTION_SHAPES[0]
    sample = [torch.empty(1, s.heads, s.nq, d, device=device, dtype=dtype) for d in (s.key_dim, s.key_dim, s.val_dim)]
    backend = select_backend(*sample, torch.empty(s.heads, s.table_size, device=device, dtype=dtype),
                             torch.zeros(s.nq, s.nk, dtype=torch.long, device=device)).name
    env["bias_attention_backend"] = backend
    line = f"bias_attention backend on {device.type} {str(dtype).replace('torch.', '')}: {backend}"
    if backend == "reference":
        line += f" (plain PyTorch; native extension: {env.get('native_error') or 'loaded'})"
    print(line, flush=True)

    stages.next(f"{args.model}: patched vs timm, outputs and gradients (float32)")
    base = build_levit(args.model, device)
    check: Dict[str, object]
    try:
        check = check_patched(base, device)
        print(check.get("patch_report", ""))
        print(f"max relative error vs timm: eval output {check['eval_rel_err']:.2e}, "
              f"folded eval output {check['folded_eval_rel_err']:.2e}, train output {check['train_rel_err']:.2e}, "
              f"gradients {check['grad_rel_err']:.2e} (worst: {check['grad_worst_param']}; attention biases "
              f"{check['attention_bias_grad_rel_err']:.2e}; "
              f"{check['grads_compared']} parameters compared) -> {'OK' if check['ok'] else 'MISMATCH'}", flush=True)
        if check["grads_missing"]:
            print(f"parameters without a matching gradient: {check['grads_missing']}")
    except Exception as error:  # patching unavailable or broken: report, still time eager peers
        check = {"ok": False, "error": U.short_error(error, limit=2000)}
        print(f"check failed: {U.short_error(error)}", flush=True)

    stages.next(f"{args.model} inference images/s (batch {batch}, {str(dtype).replace('torch.', '')})")
    impls = ["eager", "patched", "patched+folded"] + ([] if args.no_compile else ["compile"])
    levit_rows = bench_inference(base, args.model, batch=batch, dtype=dtype, device=device, env=env,
                                 quick=args.quick, impls=impls)
    print(levit_table(levit_rows), flush=True)

    stages.next("bias_attention microbenchmarks")
    kernel_rows: List[Dict] = []
    kbatch = 256 if device.type == "cuda" else 64
    if not args.no_kernels:
        from fastvit_kernels.bench import bias_attention as kernels

        shapes = U.select_shapes(["128s.attn14"] if args.quick else kernels.QUICK_SHAPES + ("256.attn14",))
        kimpls = [i for i in kernels.IMPLS if not (args.no_compile and i in ("compile", "flex"))]
        kernel_rows = kernels.run(shapes, batch=kbatch, dtype=dtype, device=device, env=env,
                                  quick=args.quick, impls=kimpls)
        print(kernels.table(kernel_rows), flush=True)

    stages.next("QnA: qna_attention microbenchmarks and QnA-ViT tiny images/s")
    qna_rows: List[Dict] = []
    qna_summary: List[Dict] = []
    if not args.no_kernels:
        from fastvit_kernels.bench import qna_attention as qna_bench
        from fastvit_kernels.bench import qna_vit as qna_vit_bench

        qimpls = [i for i in qna_bench.IMPLS if not (args.no_compile and i.startswith("compile-"))]
        qna_rows = qna_bench.run(qna_bench.select_shapes(qna_bench.QUICK_SHAPES), kernel_sizes=(3,),
                                 batch=256 if device.type == "cuda" else 32, dtype=dtype, device=device,
                                 env=env, quick=args.quick, impls=qimpls)
        qna_summary = qna_bench.summarize(qna_rows)
        print(qna_bench.table(qna_rows), flush=True)
        print(qna_bench.summary_table(qna_rows), flush=True)
        vimpls = [i for i in ("fused", "unfold", "conv", "compile-conv")
                  if not (args.no_compile and i.startswith("compile-"))]
        vit_rows = qna_vit_bench.bench("qna_vit_tiny", batch=batch, dtype=dtype, device=device, env=env,
                                       quick=args.quick, impls=vimpls, passes=("infer",))
        print(qna_vit_bench.table(vit_rows), flush=True)
        qna_rows += vit_rows

    stages.next("DynamicViT: policy_attention / varlen_attention and DynamicViT-S vs DeiT-S images/s")
    dyvit_rows: List[Dict] = []
    dyvit_model_rows: List[Dict] = []
    if not args.no_kernels:
        from fastvit_kernels.bench import dynamic_vit as dyvit_bench
        from fastvit_kernels.bench import dynamic_vit_attention as dyvit_attention

        pimpls = [i for i in dyvit_attention.POLICY_IMPLS if not (args.no_compile and i == "compile")]
        dyvit_rows = dyvit_attention.run(batch=256 if device.type == "cuda" else 64, dtype=dtype, device=device,
                                         env=env, quick=args.quick, keeps=(0.7, 0.343), policy_impls=pimpls,
                                         passes=("fwd+bwd",))
        print(dyvit_attention.table(dyvit_rows), flush=True)
        mimpls = [i for i in dyvit_bench.INFER_IMPLS if not (args.no_compile and i.endswith("compile"))]
        dyvit_model_rows = dyvit_bench.run(batches=(1, 64), dtype=dtype, device=device, env=env, quick=args.quick,
                                           passes=("infer",), infer_impls=mimpls)
        print(dyvit_bench.table(dyvit_model_rows), flush=True)

    stages.next("targets and results")
    targets = check_targets(levit_rows, kernel_rows, qna_summary, env, dyvit_rows, dyvit_model_rows)
    for t in targets:
        measured = "-" if t["measured"] is None else f"{t['measured']:.2f}x"
        print(f"  [{t['verdict']}] {t['target']}: measured {measured}")
    out = args.out
    if out is None and (U.REPO_ROOT / "benchmarks").is_dir():
        out = U.default_out_path("fastvit_bench", env)
    if out is not None:
        path = U.write_json(out, env, levit_rows + kernel_rows + qna_rows + dyvit_rows + dyvit_model_rows, check=check, targets=targets,
                            qna_summary=qna_summary)
        print(f"wrote {path}")
    U.log(f"done in {time.perf_counter() - stages.t0:.0f} s")
    return 0 if check.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
