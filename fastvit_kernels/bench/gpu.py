"""`python -m fastvit_kernels.bench.gpu`: the one-command GPU verification suite.

A lent GPU comes for about 15 minutes of device time (start-up included) with no network, so the
whole check is this one command; it runs in about 8 minutes, never stops at a failure (each step
records its error and the next step runs) and leaves its results in files. The device tool runs
it in the repository root and returns $OUT and the last 12,000 characters of output:

    python -m fastvit_kernels.bench.gpu --out $OUT --time-budget 480 2>&1 | tail -c 11000

Steps (each timed and logged):
  env          GPU, driver, compute capability, torch / triton / CUDA / cuDNN / nvcc versions,
               Python, git sha (unknown without a .git; source_digest identifies the sources
               then), CPU, hostname.
  build        `pip install --no-build-isolation --no-deps --no-index -e .` in the background
               (CUDA_HOME when nvcc is found, MAX_JOBS=16, niced), then `python -m
               fastvit_kernels.info`. --skip-build skips the install.
  correctness  every op on CUDA tensors with the Triton backend forced, forward and
               forward+backward, float32 / bfloat16 / float16, at the bench modules' model
               shapes and odd sizes (N = 1, 7, 49, 197, non-square grids, Nq != Nk, head widths
               that are not powers of two), inputs the strided views the modules make; each
               against float64 on fresh random inputs, outputs NaN-poisoned
               (FASTVIT_KERNELS_POISON=1), judged by the test suite's rule (tests/helpers.py
               assert_matches: half precision may err twice what plain PyTorch errs in that
               dtype). Every check also counts the calls of the Triton forward and backward, so
               it cannot pass on another backend. Worker processes, one per (op, dtype), run in
               parallel (Triton compiles on the CPU) and in isolation (a kernel fault kills only
               its worker; a new one goes on with the checks left).
  pytest       the test suite's triton-cuda tests of each op file (and test_compile.py),
               time-limited, in parallel with the checks.
  bench        microbenchmarks at model shapes, Triton forced for the op's rows, against eager
               PyTorch, SDPA, FlexAttention and torch.compile (the bench modules' cases and run
               functions), forward and forward+backward, float16 (and bfloat16 for
               bias_attention); compiled peers when time allows.
  levit        levit_256 inference images/s at batch 256 in float16: eager timm, patched
               (Triton forced), torch.compile(timm); then, as time allows, patched vs timm in
               float32 (outputs and every gradient), patched+folded, patched+compile and a
               training step (bench/levit.py's helpers).

Writes gpu_suite_<device>_<date>.log (everything, subprocess output included), .json (the
environment and every step's results) and _summary.txt under --out (default $OUT, else
benchmarks/results/ of the checkout), rewritten after every step, and prints the summary last:
which ops passed per dtype (failed shapes with their error), the microbenchmark ratios, levit
img/s, step timings and a suggested VERIFIED_ON_GPU for fastvit_kernels/backends.py.

--time-budget (default 480 s) is kept by skipping later optional parts when running late (the
remaining shapes of a check, compiled peers, torch.compile variants, the training step) and by
killing a worker at its step's deadline. --steps runs a subset. --dry-run runs the same steps on
CPU in Triton's interpreter at tiny sizes, one shape per op (80 to 95 s with --skip-build),
to check this script without a GPU (tests/test_gpu_suite.py).
"""

import os
import sys

# Triton reads TRITON_INTERPRET when a kernel is defined: set it before any kernel module loads.
if "--dry-run" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import hashlib  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Dict, List, Optional, Sequence, Tuple  # noqa: E402

import torch  # noqa: E402

from fastvit_kernels.bench import common  # noqa: E402

COMMAND = "python -m fastvit_kernels.bench.gpu --out $OUT --time-budget 480 2>&1 | tail -c 11000"
OPS = ("bias_attention", "qna_attention", "policy_attention", "varlen_attention", "ggem_pool")
STEPS = ("build", "correctness", "pytest", "bench", "levit")
CHECK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HALF = (torch.bfloat16, torch.float16)
PASSES = ("fwd", "fwd+bwd")
POISON_ENV_VAR = "FASTVIT_KERNELS_POISON"
# Time kept for the later steps, as fractions of the budget: a step must end early enough to
# leave them that much (and takes what an earlier step left over). The levit step ends END_S
# before the budget, to write the files.
RESERVES = {"bench": 0.27, "levit": 0.23}
END_S = 8.0
GRACE_S = 20.0  # a worker past its deadline is killed this much later (it skips work itself first)


def dtype_of(name: str) -> torch.dtype:
    return common.DTYPES[name]


# ---------------------------------------------------------------------------------------------
# What runs per op: correctness shapes and microbenchmark settings (the bench modules' own)
# ---------------------------------------------------------------------------------------------


class OpPlan:
    """One op's checks and microbenchmarks, on the bench module's Case classes and run().

    checks: (label, make(dtype, device, seed) -> a Case) with the model shapes first.
    bench(dtype, impls, env, device, batch=None) -> rows: the module's run() at the benchmark
    shapes (and batch: the module's CUDA default unless given), the op's rows with the Triton
    backend forced.
    """

    def __init__(self, op: str, test_file: str, checks, bench, bench_dtypes, fast_impls, compiled_impls,
                 group_keys=("case", "pass")):
        self.op, self.test_file, self.checks, self.bench = op, test_file, checks, bench
        self.bench_dtypes, self.fast_impls, self.compiled_impls = bench_dtypes, fast_impls, compiled_impls
        self.group_keys = tuple(group_keys)


def plan(op: str, dry: bool) -> OpPlan:
    """The checks and benchmarks of `op` on a GPU, or (dry) one tiny shape for the interpreter."""
    half = "float32" if dry else "float16"
    batch = 1 if dry else 2  # correctness checks: small batches, the shapes are what matters
    quick = True

    if op == "bias_attention":
        from fastvit_kernels.bench import bias_attention as m

        def grid(name, kind, heads, rows, cols, dk, dv):
            return m.AttentionShape(name, "-", kind, heads, rows, dk, dv, 0, width=cols)

        dry_shape = grid("dry.shrink5x3", "shrink", 2, 5, 3, 16, 32)
        shapes = [dry_shape] if dry else m.select_shapes(["128s.attn14", "256.shrink14-7", "128s.shrink7-4", "256.attn4"]) + [
            grid("odd.1x1", "block", 2, 1, 1, 16, 32),  # N = 1
            grid("odd.7x1", "block", 3, 7, 1, 16, 32),  # N = 7
            grid("odd.shrink7x5", "shrink", 4, 7, 5, 32, 128),  # non-square, Nq = 12, Nk = 35
            grid("odd.7x7.dk20", "block", 2, 7, 7, 20, 40),  # N = 49, head widths not powers of two
            grid("odd.197x1", "block", 2, 197, 1, 32, 64),  # N = 197
        ]
        bench_shapes = [dry_shape] if dry else m.select_shapes(["256.attn14", "256.shrink14-7"])

        def bench(dtype, impls, env, device, batch=None):
            return m.run(bench_shapes, batch=batch or (1 if dry else 256), dtype=dtype, device=device, env=env, quick=quick,
                         impls=impls, backend="triton")

        return OpPlan(op, "tests/test_bias_attention.py",
                      [(s.name, lambda dt, dev, seed, s=s: m.Case(s, batch, dt, dev, seed)) for s in shapes],
                      bench, [half] + ([] if dry else ["bfloat16"]), ["op", "eager", "sdpa"], ["compile", "flex"])

    if op == "qna_attention":
        from fastvit_kernels.bench import qna_attention as m

        Q = m.QnaShape
        dry_shape = (Q("dry.3x2.s2", 3, 2, 8, 2, width=2), 3)
        shapes = [dry_shape] if dry else [(s, k) for s, k in zip(m.select_shapes(["s0.qna", "s1.down", "s2.qna"]),
                                                                   (3, 3, 7))] + [
            (Q("odd.1x1", 1, 2, 8, 1), 3),  # one pixel
            (Q("odd.7x5.s2", 7, 3, 16, 2, width=5), 3),  # non-square, odd sizes, strided
            (Q("odd.9x7.q1", 9, 4, 8, 1, queries=1, width=7), 7),  # one query, k = 7
            (Q("odd.13x11.d12", 13, 2, 12, 2, queries=3, width=11), 5),  # head width 12, three queries
        ]

        def bench(dtype, impls, env, device, batch=None):
            s, k = dry_shape if dry else (m.select_shapes(["s0.qna"])[0], 3)
            return m.run([s], kernel_sizes=(k,), batch=batch or (1 if dry else 128), dtype=dtype, device=device, env=env,
                         quick=quick, impls=impls, backend="triton")

        return OpPlan(op, "tests/test_qna_attention.py",
                      [(f"{s.name}.k{k}", lambda dt, dev, seed, s=s, k=k: m.Case(s, k, batch, dt, dev, seed))
                       for s, k in shapes],
                      bench, [half], ["op", "unfold", "conv"], ["compile-conv", "compile-unfold"],
                      group_keys=m.GROUP)

    if op == "policy_attention":
        from fastvit_kernels.bench import policy_attention as m

        deit = dict(tokens=m.TOKENS, heads=m.HEADS, head_dim=m.HEAD_DIM)
        dry_spec = ("dry.n9.keep0.5", 0.5, dict(tokens=9, heads=2, head_dim=16))
        specs = [dry_spec] if dry else [
            ("deit_s.keep0.7", 0.7, deit),
            ("deit_s.keep0.343", 0.343, deit),
            ("odd.n1", 1.0, dict(tokens=1, heads=2, head_dim=64)),
            ("odd.n7.keep0.5", 0.5, dict(tokens=7, heads=3, head_dim=32)),
            ("odd.n49.cls_only", 0.0, dict(tokens=49, heads=2, head_dim=64)),
            ("odd.n197.d48", 0.343, dict(tokens=197, heads=2, head_dim=48)),
        ]

        def bench(dtype, impls, env, device, batch=None):
            keep, shape = (dry_spec[1], dry_spec[2]) if dry else (0.7, deit)
            return m.run(batch=batch or (1 if dry else 256), dtype=dtype, device=device, env=env, quick=quick, keeps=(keep,),
                         impls=impls, backend="triton", **shape)

        return OpPlan(op, "tests/test_policy_attention.py",
                      [(label, lambda dt, dev, seed, keep=keep, shape=shape: m.Case(batch, keep, dt, dev, seed, **shape))
                       for label, keep, shape in specs],
                      bench, [half], ["op", "eager", "sdpa"], ["compile"])

    if op == "varlen_attention":
        from fastvit_kernels.bench import varlen_attention as m

        deit = dict(heads=m.HEADS, head_dim=m.HEAD_DIM)
        dry_spec = ("dry.5-1-3", [5, 1, 3], dict(heads=2, head_dim=16))
        specs = [dry_spec] if dry else [
            ("deit_s.threshold", m.threshold_lengths(8), deit),
            ("deit_s.fixed68", [68] * 4, deit),
            ("odd.1-7-49-197-2", [1, 7, 49, 197, 2], dict(heads=3, head_dim=64)),
            ("odd.one_token", [1], dict(heads=2, head_dim=32)),
            ("odd.197-1.d80", [197, 1], dict(heads=2, head_dim=80)),
        ]

        def bench(dtype, impls, env, device, batch=None):
            lengths, shape = ({dry_spec[0]: dry_spec[1]}, dry_spec[2]) if dry else (None, deit)
            return m.run(batch=batch or (1 if dry else 256), dtype=dtype, device=device, env=env, quick=quick, impls=impls,
                         backend="triton", lengths=lengths, **shape)

        return OpPlan(op, "tests/test_varlen_attention.py",
                      [(label, lambda dt, dev, seed, label=label, lengths=lengths, shape=shape:
                        m.Case(label, lengths, dt, dev, seed, **shape)) for label, lengths, shape in specs],
                      bench, [half], ["op", "padded", "loop"], [])

    if op == "ggem_pool":
        from fastvit_kernels.bench import ggem_pool as m

        P = m.PoolShape
        dry_shape = P("dry.n9.c24", "-", 9, 1, 24, 3)
        shapes = [dry_shape] if dry else m.select_shapes(["vit_s", "vit_b", "vit_l"]) + [
            # (One pooled token makes dp exactly 0, which only a scale-aware comparison can
            # judge: tests/test_ggem_pool.py's, in the pytest step.)
            P("odd.n2", "-", 2, 0, 64, 4),  # two tokens, no prefix
            P("odd.n7.c100", "-", 7, 1, 100, 5),  # channels not a power of two
            P("odd.n49", "-", 49, 0, 384, 6),
            P("odd.n197.c1000", "-", 197, 1, 1000, 8),
        ]

        def bench(dtype, impls, env, device, batch=None):
            shape = dry_shape if dry else m.select_shapes(["vit_b"])[0]
            return m.run([shape], batch=batch or (1 if dry else 256), dtype=dtype, device=device, env=env, quick=quick,
                         impls=impls, bandwidth=not dry, backend="triton")

        return OpPlan(op, "tests/test_ggem_pool.py",
                      [(s.name, lambda dt, dev, seed, s=s: m.Case(s, batch, dt, dev, seed)) for s in shapes],
                      bench, [half], ["op", "eager"], ["compile"])

    raise ValueError(f"unknown op {op!r}; ops are {OPS}")


# ---------------------------------------------------------------------------------------------
# Correctness: one check = one (op, dtype, shape, pass) against the float64 oracle
# ---------------------------------------------------------------------------------------------


class TritonCalls:
    """Counts calls of fastvit_kernels.triton.<op>.forward / .backward (wrapped in place, in this
    worker only), so that a check knows the Triton kernels ran: a forced backend that the autograd
    thread of a CUDA backward does not see would silently run another backend's backward."""

    def __init__(self, op: str):
        module = importlib.import_module(f"fastvit_kernels.triton.{op}")
        self.counts = {"forward": 0, "backward": 0}
        for name in self.counts:
            original = getattr(module, name)

            def counted(*args, _original=original, _name=name, **kwargs):
                self.counts[_name] += 1
                return _original(*args, **kwargs)

            setattr(module, name, counted)

    def snapshot(self) -> Dict[str, int]:
        return dict(self.counts)

    def since(self, snapshot: Dict[str, int]) -> Dict[str, int]:
        return {name: self.counts[name] - snapshot[name] for name in self.counts}


def comparator() -> Tuple[str, Callable]:
    """(rule, compare): compare(name, got, want, same_dtype, dtype) -> None, or why got fails.

    The test suite's rule when the checkout's tests/helpers.py is there (loaded from its file,
    no pytest run): tests/helpers.py assert_matches (max error within FLOOR[dtype] of the largest
    reference magnitude, or in half precision twice what plain PyTorch errs in that dtype; no
    NaN/inf). Else common.REL_TOL of the dtype (max|got - want| / max|want|)."""
    path = common.REPO_ROOT / "tests" / "helpers.py"
    try:
        spec = importlib.util.spec_from_file_location("_fastvit_kernels_test_helpers", path)
        helpers = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(helpers)
        assert_matches = helpers.assert_matches

        def compare(name, got, want, same_dtype, dtype):
            try:
                assert_matches(name, got, want, same_dtype, dtype=dtype)
            except AssertionError as error:
                return str(error)
            return None

        return "tests/helpers.py assert_matches", compare
    except Exception:  # not a checkout, or pytest missing
        def compare(name, got, want, same_dtype, dtype):
            if got.shape != want.shape:
                return f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
            if not torch.isfinite(got).all():
                return f"{name}: NaN/inf in the result (an element left unwritten?)"
            err = common.rel_err(got, want)
            return None if err <= common.REL_TOL[dtype] else f"{name}: rel err {err:.3g} > {common.REL_TOL[dtype]}"

        return "common.REL_TOL", compare


class CheckWorker:
    """Runs check units in one process: {"op", "dtype", "shape", "pass"} or a probe
    {"op", "dtype", "probe": "use_backend"}."""

    def __init__(self, device: torch.device, dry: bool):
        os.environ[POISON_ENV_VAR] = "1"  # kernels NaN-fill their outputs before writing them
        self.device, self.dry = device, dry
        self.rule, self.compare = comparator()
        self.plans: Dict[str, OpPlan] = {}
        self.calls: Dict[str, TritonCalls] = {}

    def case_of(self, unit):
        op = unit["op"]
        if op not in self.plans:
            self.plans[op] = plan(op, self.dry)
        checks = self.plans[op].checks
        index = next(i for i, (label, _) in enumerate(checks) if label == unit["shape"])
        # Fresh inputs: a seed of its own per shape, other than the benchmarks' (0).
        return checks[index][1](dtype_of(unit["dtype"]), self.device, 1000 + index)

    def counter(self, op: str) -> TritonCalls:
        if op not in self.calls:
            self.calls[op] = TritonCalls(op)
        return self.calls[op]

    def run(self, unit) -> List[Dict]:
        if unit.get("probe"):
            return [self.probe(unit)]
        op, dtype, pass_ = unit["op"], dtype_of(unit["dtype"]), unit["pass"]
        rec = {"op": op, "dtype": unit["dtype"], "shape": unit["shape"], "pass": pass_, "ok": False,
               "rule": self.rule, "error": None}
        try:
            case = self.case_of(unit)
            rec["describe"] = case.describe()
            need_grads = pass_ != "fwd"
            want = case.oracle(need_grads)
            same_dtype = case.oracle(need_grads, dtype=dtype) if dtype in HALF else [None] * len(want)
            counter = self.counter(op)
            got = []
            with common.forcing_backend("triton"):
                before = counter.snapshot()
                run = case.make_callable("op", pass_)
                rec["first_call_s"] = round(common.time_call(lambda: got.extend(run()), self.device), 3)
            rec["triton_calls"] = calls = counter.since(before)
            rec["max_rel_err"] = common.max_rel_err(got, want)
            if dtype in HALF:
                rec["torch_rel_err"] = common.max_rel_err(same_dtype, want)
            names = ["out"] if pass_ == "fwd" else [f"grad{i}" for i in range(len(want))]
            problems = [p for p in (self.compare(n, g, w, s, dtype) for n, g, w, s in zip(names, got, want, same_dtype))
                        if p]
            if len(got) != len(want):
                problems.append(f"{len(got)} results, the oracle has {len(want)}")
            if calls["forward"] < 1 or (need_grads and calls["backward"] < 1):
                problems.append(f"the Triton kernels did not run (calls: {calls})")
            rec["ok"] = not problems
            rec["error"] = "; ".join(problems) or None
        except Exception as error:  # record and go on
            rec["error"] = common.short_error(error, limit=600)
            traceback.print_exc()
            check_cuda_alive(self.device, [rec])
        return [rec]

    def probe(self, unit) -> Dict:
        """Does use_backend("triton") alone (a context variable) reach the backward? On CUDA the
        backward runs in an autograd thread, which does not see the caller's context variables."""
        from fastvit_kernels import backends

        op = unit["op"]
        rec = {"op": op, "dtype": unit["dtype"], "probe": "use_backend", "error": None}
        saved = os.environ.pop(backends.ENV_VAR, None)
        try:
            if op not in self.plans:
                self.plans[op] = plan(op, self.dry)
            case = self.case_of({**unit, "shape": self.plans[op].checks[0][0]})
            counter = self.counter(op)
            before = counter.snapshot()
            with backends.use_backend("triton"):
                case.make_callable("op", "fwd+bwd")()
            common.synchronize(self.device)
            rec["triton_calls"] = calls = counter.since(before)
            rec["use_backend_reaches_backward"] = calls["backward"] > 0
        except Exception as error:
            rec["error"] = common.short_error(error, limit=600)
            check_cuda_alive(self.device, [rec])
        finally:
            if saved is not None:
                os.environ[backends.ENV_VAR] = saved
        return rec


def check_cuda_alive(device: torch.device, records: Sequence[Dict] = ()) -> None:
    """After an error: if the CUDA context is lost (an illegal access poisons it), raise
    WorkerExit(records): the worker records the unit and exits, and the suite starts a new
    worker for the units left."""
    if device.type != "cuda":
        return
    try:
        torch.cuda.synchronize(device)
        torch.zeros(1, device=device).add_(1).item()
    except Exception as error:
        print(f"CUDA context lost ({common.short_error(error)}): worker exits", file=sys.stderr, flush=True)
        raise WorkerExit(records) from error


class WorkerExit(Exception):
    """Stop this worker after recording the current unit's records (the parent starts a new
    worker for the units left)."""

    def __init__(self, records: Sequence[Dict] = ()):
        super().__init__("CUDA context lost")
        self.records = list(records)


# ---------------------------------------------------------------------------------------------
# Microbenchmarks and the end-to-end model
# ---------------------------------------------------------------------------------------------


class BenchWorker:
    """Runs bench units {"op", "dtype", "impls"}: the module's run() for those implementations."""

    def __init__(self, device: torch.device, dry: bool, env: Dict):
        self.device, self.dry, self.env = device, dry, env

    def run(self, unit) -> List[Dict]:
        rows = plan(unit["op"], self.dry).bench(dtype_of(unit["dtype"]), unit["impls"], self.env, self.device)
        for row in rows:
            row["op"] = unit["op"]
        if any(r.get("error") for r in rows):
            check_cuda_alive(self.device, rows)
        return rows


class LevitWorker:
    """Runs levit units {"part": "check" | "infer" | "train", "impl"} on one model built once."""

    def __init__(self, device: torch.device, dry: bool, env: Dict):
        from fastvit_kernels.bench import levit

        self.levit, self.device, self.dry, self.env = levit, device, dry, env
        # Dry run: levit_128s at 64x64 (grids 4, 2, 1), batch 1, float32.
        self.model, self.image, self.batch, self.train_batch = (
            ("levit_128s", 64, 1, 2) if dry else ("levit_256", 224, 256, 128))
        self.dtype = torch.float32 if dry else torch.float16
        self.base = None

    def run(self, unit) -> List[Dict]:
        lv = self.levit
        if self.base is None:
            kwargs = {"img_size": self.image} if self.image != 224 else {}
            self.base = lv.build_levit(self.model, self.device, **kwargs)
        common_args = dict(dtype=self.dtype, device=self.device, env=self.env, quick=self.dry, impls=[unit["impl"]],
                           backend="triton", image_size=self.image, min_run_time=0.05 if self.dry else None)
        if unit["part"] == "check":
            try:
                with common.forcing_backend("triton"):
                    check = lv.check_patched(self.base, self.device, batch=8, image_size=self.image)
            except Exception as error:
                traceback.print_exc()
                check = {"ok": False, "error": common.short_error(error, limit=2000)}
                check_cuda_alive(self.device, [{"part": "check", "model": self.model, **check}])
            return [{"part": "check", "model": self.model, **check}]
        if unit["part"] == "infer":
            rows = lv.bench_inference(self.base, self.model, batch=self.batch, **common_args)
        else:
            rows = lv.bench_training(self.base, self.model, batch=self.train_batch, **common_args)
        for row in rows:
            row["part"] = unit["part"]
            row["image_size"] = self.image
        if any(r.get("error") for r in rows):
            check_cuda_alive(self.device, rows)
        return rows


def worker_main(args) -> int:
    """A worker process: runs its units in order, appending a start line and a result line per
    unit to --result (JSON lines), so the parent knows what finished and what crashed."""
    units = json.loads(Path(args.units).read_text())
    env = json.loads(Path(args.env_file).read_text())
    device = torch.device("cpu" if args.dry_run else args.device)
    if args.worker == "check":
        worker = CheckWorker(device, args.dry_run)
    elif args.worker == "bench":
        worker = BenchWorker(device, args.dry_run, env)
    else:
        worker = LevitWorker(device, args.dry_run, env)
    with open(args.result, "a") as out:
        def emit(event: Dict) -> None:
            out.write(json.dumps(event, default=str) + "\n")
            out.flush()

        for unit in units:
            left = args.deadline - time.time()
            if left < unit.get("min_left_s", 0.0):
                emit({"event": "done", "unit": unit["id"], "status": "skipped",
                      "reason": f"time budget ({left:.0f} s left, needs {unit.get('min_left_s', 0):.0f})"})
                continue
            emit({"event": "start", "unit": unit["id"]})
            common.log(f"unit {unit['id']}: {json.dumps({k: v for k, v in unit.items() if k != 'id'})}")
            t0 = time.perf_counter()
            stop = None
            try:
                records, status = worker.run(unit), "ok"
            except WorkerExit as exit_:
                records, status, stop = exit_.records, "error: CUDA context lost", exit_
            except Exception as error:  # record and go on
                traceback.print_exc()
                records, status = [], f"error: {common.short_error(error, limit=600)}"
                try:
                    check_cuda_alive(device)
                except WorkerExit as exit_:
                    stop = exit_
            emit({"event": "done", "unit": unit["id"], "status": status, "records": records,
                  "seconds": round(time.perf_counter() - t0, 2)})
            if stop is not None:
                return 3
    return 0


# ---------------------------------------------------------------------------------------------
# Subprocesses: jobs, tasks and the pool that runs them
# ---------------------------------------------------------------------------------------------


class Job:
    """One subprocess, its output in a file, killed (with its process group) at kill_at."""

    def __init__(self, name: str, argv: Sequence[str], env: Dict[str, str], kill_at: float, workdir: Path):
        self.name, self.argv, self.env, self.kill_at = name, list(argv), env, kill_at
        self.output_path = workdir / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.{time.time_ns()}.out"
        self.proc = None
        self.rc: Optional[int] = None
        self.timed_out = False
        self.start_time = self.end_time = 0.0

    def start(self) -> None:
        self.start_time = time.time()
        with open(self.output_path, "w") as out:
            self.proc = subprocess.Popen(self.argv, cwd=common.REPO_ROOT, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def poll(self) -> bool:
        """True once the process has ended (killed first when past kill_at)."""
        if self.proc.poll() is None and time.time() > self.kill_at:
            self.timed_out = True
            self.kill()
        if self.proc.poll() is None:
            return False
        self.rc, self.end_time = self.proc.returncode, time.time()
        return True

    def kill(self) -> None:
        """Ends this job's process group (its own session: only what this job started)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass

    @property
    def seconds(self) -> float:
        return round((self.end_time or time.time()) - self.start_time, 1)

    def output(self) -> str:
        try:
            return self.output_path.read_text(errors="replace")
        except OSError:
            return ""


class CommandTask:
    """One command, run once (the build, `fastvit_kernels.info`, one pytest process)."""

    def __init__(self, name: str, argv: Sequence[str], env: Dict[str, str], kill_at: float,
                 after: Optional["CommandTask"] = None, background: bool = False):
        self.name, self.argv, self.env, self.kill_at = name, list(argv), env, kill_at
        self.after, self.background = after, background
        self.job: Optional[Job] = None
        self.done = False

    def ready(self) -> bool:
        return self.after is None or self.after.done

    def next_job(self, workdir: Path) -> Optional[Job]:
        if time.time() >= self.kill_at:
            self.done = True
            return None
        self.job = Job(self.name, self.argv, self.env, self.kill_at, workdir)
        return self.job

    def collect(self, job: Job) -> None:
        self.done = True


class WorkerTask:
    """Units of one step run by worker processes (`--worker KIND`), in order. A worker that dies
    (a kernel fault, a lost CUDA context) loses only the unit it was running: the next worker
    starts after it. Units not started by the soft deadline are recorded as skipped."""

    MAX_WORKERS = 6  # workers started for one task at most (each crash costs a start-up)

    def __init__(self, name: str, kind: str, units: List[Dict], args, env_file: Path, kill_at: float,
                 deadline: float, threads: Optional[int] = None):
        self.name, self.kind, self.args, self.env_file, self.threads = name, kind, args, env_file, threads
        self.kill_at, self.deadline = kill_at, deadline
        self.units, self.left = list(units), list(units)
        self.results: Dict[int, Dict] = {}  # unit id -> {"status", "records", "seconds"}
        self.jobs: List[Job] = []
        self.background = False
        self.done = False
        self._files: Tuple[Path, Path] = (Path(), Path())

    def ready(self) -> bool:
        return True

    def next_job(self, workdir: Path) -> Optional[Job]:
        if not self.left or time.time() >= self.deadline:
            for unit in self.left:
                self.results[unit["id"]] = {"status": "skipped", "reason": "time budget (not started)"}
            self.left, self.done = [], True
            return None
        stem = f"{self.name}.{len(self.jobs)}"
        units_file, result_file = workdir / f"{stem}.units.json", workdir / f"{stem}.result.jsonl"
        units_file.write_text(json.dumps(self.left))
        argv = [sys.executable, "-m", "fastvit_kernels.bench.gpu", "--worker", self.kind, "--units", str(units_file),
                "--result", str(result_file), "--env-file", str(self.env_file), "--deadline", f"{self.deadline:.3f}"]
        argv += ["--dry-run"] if self.args.dry_run else ["--device", self.args.device]
        self._files = (units_file, result_file)
        job = Job(self.name, argv, worker_env(self.args, self.threads), self.kill_at, workdir)
        self.jobs.append(job)
        return job

    def collect(self, job: Job) -> None:
        started, finished = None, set()
        try:
            lines = self._files[1].read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:  # a line cut off by a kill
                continue
            if event["event"] == "start":
                started = event["unit"]
            else:
                finished.add(event["unit"])
                self.results[event["unit"]] = {k: v for k, v in event.items() if k not in ("event", "unit")}
        why = "killed at the step's deadline" if job.timed_out else f"worker exited with status {job.rc}"
        tail = " | ".join(job.output().strip().splitlines()[-3:])[-600:]
        crashed = started if started is not None and started not in finished else None
        if crashed is not None:  # the unit it was running: recorded as crashed, the next worker goes on
            self.results[crashed] = {"status": f"crashed: {why}", "reason": tail, "records": []}
            finished.add(crashed)
        self.left = [u for u in self.left if u["id"] not in finished]
        if job.timed_out or (crashed is None and job.rc not in (0, 3)) or len(self.jobs) >= self.MAX_WORKERS:
            # Out of time, a worker that fails outside any unit (an import error, say), or too
            # many crashes: the units left are not started again.
            for unit in self.left:
                self.results[unit["id"]] = {"status": "skipped" if job.timed_out else f"not run: {why}",
                                            "reason": "time budget" if job.timed_out else tail}
            self.left = []
        self.done = not self.left

    def records(self) -> List[Dict]:
        return [r for unit_id in sorted(self.results) for r in self.results[unit_id].get("records", [])]


def worker_env(args, threads: Optional[int] = None) -> Dict[str, str]:
    """The environment of a subprocess: Triton's interpreter in a dry run (else never), no forced
    backend (workers force Triton where they mean to), and `threads` CPU threads for torch when
    given (processes side by side, or a dry run: OpenMP threads of a busy machine spin)."""
    env = dict(os.environ)
    env.pop("FASTVIT_KERNELS_BACKEND", None)
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
        threads = 1
    elif args.device == "cuda":
        env.pop("TRITON_INTERPRET", None)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def side_by_side_threads(args) -> int:
    """CPU threads for each of `jobs` processes running side by side."""
    return max(1, (os.cpu_count() or 1) // max(1, args.jobs))


def run_pool(tasks: List, jobs: int, workdir: Path, say: Callable[[str], None],
             on_done: Callable[[object, Job], None], linger_s: float = 90.0) -> None:
    """Runs the tasks' jobs, at most `jobs` at a time (background tasks do not count), in the
    order given; a WorkerTask with units left gets a new job after each one ends. Once only
    background jobs are left, they get at most linger_s more seconds."""
    pending, running = list(tasks), []
    try:
        _run_pool(pending, running, jobs, workdir, say, on_done, linger_s)
    except BaseException:  # interrupted: end what runs (each job's own process group) and pass it on
        for _, job in running:
            job.kill()
        raise


def _run_pool(pending, running, jobs, workdir, say, on_done, linger_s) -> None:
    while pending or running:
        if not any(not t.background for t in pending) and all(t.background for t, _ in running):
            for _, job in running:
                job.kill_at = min(job.kill_at, time.time() + linger_s)
        for task, job in list(running):
            if job.poll():
                running.remove((task, job))
                task.collect(job)
                on_done(task, job)
                if not task.done:
                    pending.insert(0, task)
        busy = sum(1 for task, _ in running if not task.background)
        for task in list(pending):
            if not task.ready() or (busy >= jobs and not task.background):
                continue
            pending.remove(task)
            job = task.next_job(workdir)
            if job is None:
                continue
            job.start()
            say(f"started {job.name} (pid {job.proc.pid})")
            running.append((task, job))
            busy += not task.background
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# Environment and build
# ---------------------------------------------------------------------------------------------


def source_digest() -> str:
    """sha256 over the package, csrc/ and the build files (path and content of each): identifies
    the code a run tested when there is no .git (the device gets a copy of the working tree)."""
    digest = hashlib.sha256()
    root = common.REPO_ROOT
    files = [p for top in ("fastvit_kernels", "csrc") for p in (root / top).rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".so", ".pyc")]
    files += [root / name for name in ("setup.py", "CMakeLists.txt") if (root / name).is_file()]
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _run_text(argv: Sequence[str], timeout: float = 20) -> Optional[str]:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def find_nvcc() -> Optional[str]:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and Path(home, "bin", "nvcc").is_file():
            return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


def suite_environment(device: torch.device, dry: bool) -> Dict[str, object]:
    """common.environment plus the driver, cuDNN, nvcc, hostname and the source digest."""
    env = common.environment(device)
    env.update(hostname=socket.gethostname(), dry_run=dry, source_digest=source_digest(),
               cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    nvcc = find_nvcc()
    version = _run_text([nvcc, "--version"]) if nvcc else None
    env["nvcc"] = version.splitlines()[-1] if version else None
    if device.type == "cuda":
        smi = _run_text(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                         "--format=csv,noheader"])
        if smi:
            fields = [f.strip() for f in smi.splitlines()[device.index or 0].split(",")]
            env.update(gpu_name_smi=fields[0], driver=fields[1], gpu_memory_smi=fields[2])
        else:
            try:
                version = torch._C._cuda_getDriverVersion()
                env["driver"] = f"CUDA driver API {version // 1000}.{version % 1000 // 10} (from torch)"
            except Exception:
                env["driver"] = None
    return env


def build_task(kill_at: float) -> CommandTask:
    """`pip install --no-build-isolation --no-deps --no-index -e .`: no network on the device
    (--no-deps: torch, numpy, ninja, pybind11 are taken as installed), CUDA_HOME when nvcc is
    found, MAX_JOBS=16, niced so that the checks running meanwhile keep their CPU."""
    env = dict(os.environ, MAX_JOBS="16", PIP_DISABLE_PIP_VERSION_CHECK="1")
    nvcc = find_nvcc()
    if nvcc:
        env["CUDA_HOME"] = str(Path(nvcc).resolve().parents[1])
    argv = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    if shutil.which("nice"):
        argv = ["nice", "-n", "10"] + argv
    return CommandTask("build", argv, env, kill_at, background=True)


# ---------------------------------------------------------------------------------------------
# pytest
# ---------------------------------------------------------------------------------------------

PYTEST_RESULT = re.compile(r"^(tests/\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.M)
PYTEST_SUMMARY = re.compile(r"^=+ (.*\b(?:passed|failed|error|errors|skipped|deselected|no tests ran)\b.*) =+$", re.M)
PYTEST_FAILURE = re.compile(r"^(?:FAILED|ERROR) (tests/\S+)(?: - (.*))?$", re.M)


def pytest_tasks(args, files: Sequence[str], kill_at: float) -> List[CommandTask]:
    """pytest on the files, in min(jobs, files) processes. On a GPU: the triton-cuda tests with
    FASTVIT_KERNELS_BACKEND=triton, so that the tests' backward (an autograd thread that does not
    see use_backend's context variable) runs Triton too."""
    n = max(1, min(len(files), args.jobs // 2))  # one per file on a GPU machine; one in a dry run
    groups = [list(files[i::n]) for i in range(n)]
    env = worker_env(args, threads=side_by_side_threads(args))
    if not args.dry_run:
        env["FASTVIT_KERNELS_BACKEND"] = "triton"
    tasks = []
    for group in groups:
        argv = [sys.executable, "-m", "fastvit_kernels.bench.gpu", "--worker", "pytest", *group, "-v", "-k",
                args.pytest_k, "-p", "no:cacheprovider",
                f"--maxfail={args.pytest_maxfail}", "-rfE", "-o", "console_output_style=classic"]
        name = "pytest:" + "+".join(Path(f).stem.replace("test_", "") for f in group)
        tasks.append(CommandTask(name, argv, env, kill_at))
    return tasks


def parse_pytest(task: CommandTask) -> Dict[str, object]:
    job = task.job
    text = job.output() if job else ""
    counts: Dict[str, int] = {}
    per_file: Dict[str, Dict[str, int]] = {}
    for test_id, outcome in PYTEST_RESULT.findall(text):
        for c in (counts, per_file.setdefault(test_id.split("::")[0], {})):
            c[outcome.lower()] = c.get(outcome.lower(), 0) + 1
    summary = PYTEST_SUMMARY.findall(text)
    failures = [f"{name}{' - ' + message[:200] if message else ''}" for name, message in PYTEST_FAILURE.findall(text)]
    if not failures:
        failures = [name for name, outcome in PYTEST_RESULT.findall(text) if outcome in ("FAILED", "ERROR")]
    if job is None:
        line = "not run (time budget)"
    elif job.timed_out:
        so_far = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing finished"
        line = f"timed out after {job.seconds:.0f} s: {so_far}"
    else:
        line = summary[-1] if summary else f"exit status {job.rc}, no summary line"
    return {"name": task.name, "argv": task.argv, "rc": job.rc if job else None, "timed_out": bool(job and job.timed_out),
            "seconds": job.seconds if job else 0.0, "counts": counts, "per_file": per_file, "summary": line,
            "failures": failures[:10], "files": [a for a in task.argv if a.startswith("tests/")]}


# ---------------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------------


class Suite:
    def __init__(self, args):
        self.args = args
        self.t0 = time.time()
        self.end = self.t0 + args.time_budget
        self.device = torch.device("cpu" if args.dry_run else args.device)
        self.workdir = Path(tempfile.mkdtemp(prefix="fastvit_gpu_suite_"))
        self.doc: Dict[str, object] = {
            "schema": common.SCHEMA_VERSION, "suite": "fastvit_kernels.bench.gpu", "dry_run": args.dry_run,
            "command": COMMAND, "argv": sys.argv, "time_budget_s": args.time_budget, "ops_selected": list(args.ops),
            "steps": {}, "correctness": [], "probes": [], "pytest": [], "bench": [], "levit": {"check": None, "rows": []},
        }
        self.out_dir = self.paths = None
        self.log_file = None
        self.no_gpu = False

    # -- output --------------------------------------------------------------------------------

    def say(self, message: str) -> None:
        line = f"[{time.time() - self.t0:6.1f}s] {message}"
        print(line, file=sys.stderr, flush=True)
        if self.log_file:
            self.log_file.write(line + "\n")
            self.log_file.flush()

    def log_output(self, title: str, text: str) -> None:
        if self.log_file:
            self.log_file.write(f"----- {title} -----\n{text.rstrip()}\n----- end of {title} -----\n")
            self.log_file.flush()

    def open_outputs(self, env: Dict) -> None:
        out = self.args.out
        if out is None:
            out = Path(os.environ["OUT"]) if os.environ.get("OUT") else (
                common.REPO_ROOT / "benchmarks" / "results" if (common.REPO_ROOT / "benchmarks").is_dir()
                else Path.cwd() / "gpu_suite_results")
        out.mkdir(parents=True, exist_ok=True)
        stamp = str(env["date"])[:19].replace(":", "").replace("-", "")
        stem = f"gpu_suite{'_dryrun' if self.args.dry_run else ''}_{common.device_kind(env)}_{stamp}"
        self.out_dir = out
        self.paths = {"log": out / f"{stem}.log", "json": out / f"{stem}.json", "summary": out / f"{stem}_summary.txt"}
        self.log_file = open(self.paths["log"], "w")

    def write(self) -> None:
        """Rewrites the JSON and the summary (after every step, so a killed run leaves files)."""
        self.doc["elapsed_s"] = round(time.time() - self.t0, 1)
        self.doc["ops"], self.doc["verified_on_gpu"] = verdicts(self.doc)
        if not self.paths:
            return
        tmp = self.paths["json"].with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str) + "\n")
        os.replace(tmp, self.paths["json"])
        self.paths["summary"].write_text(summary(self.doc, self.paths) + "\n")

    def step(self, name: str, status: str, started: float, seconds: Optional[float] = None, **extra) -> None:
        seconds = round(time.time() - started, 1) if seconds is None else seconds
        self.doc["steps"][name] = {"status": status, "seconds": seconds, **extra}
        self.say(f"step {name}: {status} ({self.doc['steps'][name]['seconds']:.0f} s)")
        self.write()

    def deadline(self, step: str) -> float:
        """When `step` must end: in time to leave the later steps (those that will run) their
        reserve of the budget, and END_S before its end."""
        later = {"correctness": ("bench", "levit"), "bench": ("levit",)}.get(step, ())
        reserve = sum(RESERVES[s] for s in later if self.wants(s)) * self.args.time_budget
        return self.end - END_S - reserve

    def kill_at(self, deadline: float) -> float:
        """When a worker past `deadline` is killed: GRACE_S later, but before the budget ends."""
        return min(deadline + GRACE_S, self.end - 2.0)

    def wants(self, step: str) -> bool:
        if self.no_gpu and step != "build":
            return False
        return step in self.args.steps and not (step == "build" and self.args.skip_build)

    # -- steps ---------------------------------------------------------------------------------

    def run(self) -> int:
        def terminate(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")

        signal.signal(signal.SIGTERM, terminate)
        started = time.time()
        try:
            if self.device.type == "cuda" and not torch.cuda.is_available():
                self.no_gpu = True
                raise RuntimeError("no CUDA device here: only the build runs (--dry-run checks the script on CPU)")
            env = suite_environment(self.device, self.args.dry_run)
            status = "ok"
        except Exception as error:  # no GPU, say: record and go on with what is known
            env = suite_environment(torch.device("cpu"), self.args.dry_run)
            env["error"] = common.short_error(error, limit=600)
            status = f"error: {env['error']}"
        self.doc["env"] = env
        self.open_outputs(env)
        self.say(f"fastvit_kernels GPU suite{' (DRY RUN: CPU, Triton interpreter)' if self.args.dry_run else ''}; "
                 f"budget {self.args.time_budget:.0f} s; results in {self.out_dir}")
        self.say(common.describe_env(env))
        self.env_file = self.workdir / "env.json"
        self.env_file.write_text(json.dumps(env, default=str))
        self.step("env", status, started)
        try:
            self.phase_checks()
            if self.wants("bench"):
                self.phase_bench()
            if self.wants("levit"):
                self.phase_levit()
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (below): the workers are ended, the files written
            self.say("interrupted")
            self.doc["interrupted"] = True
        finally:
            self.write()
            text = summary(self.doc, self.paths)
            self.log_output("summary", text)
            if self.log_file:
                self.log_file.close()
            shutil.rmtree(self.workdir, ignore_errors=True)
            print(text, flush=True)
        return 0

    def on_done(self, task, job: Job) -> None:
        state = "timed out" if job.timed_out else f"exit {job.rc}"
        self.say(f"finished {job.name} ({state}, {job.seconds:.0f} s)")
        self.log_output(f"{job.name} ({' '.join(job.argv[:12])}{' ...' if len(job.argv) > 12 else ''}; {state}, "
                        f"{job.seconds:.0f} s)", job.output())

    def phase_checks(self) -> None:
        """Build (background), correctness and pytest in parallel, then `fastvit_kernels.info`."""
        args, started = self.args, time.time()
        deadline = self.deadline("correctness")
        tasks: List = []
        build = None
        if self.wants("build"):
            build = build_task(kill_at=self.kill_at(deadline))
            tasks.append(build)
        check_tasks: List[WorkerTask] = []
        if self.wants("correctness"):
            units, next_id = [], 0
            for op in args.ops:
                checks = plan(op, args.dry_run).checks
                for dtype in (common.dtype_name(d) for d in CHECK_DTYPES):
                    group = []
                    for label, _ in checks:
                        for pass_ in PASSES:
                            group.append({"id": next_id, "op": op, "dtype": dtype, "shape": label, "pass": pass_})
                            next_id += 1
                    if dtype == "float32":  # once per op
                        group.append({"id": next_id, "op": op, "dtype": dtype, "probe": "use_backend"})
                        next_id += 1
                    units.append(group)
            # One slot of `jobs` is left to pytest, which starts at once beside the checks.
            n = max(1, min(args.jobs - 1, len(units)))
            for i in range(n):
                group = [u for g in units[i::n] for u in g]
                check_tasks.append(WorkerTask(f"check{i}", "check", group, args, self.env_file,
                                              kill_at=self.kill_at(deadline), deadline=deadline,
                                              threads=side_by_side_threads(args)))
            tasks += check_tasks
        test_tasks = []
        if self.wants("pytest"):
            files = [plan(op, args.dry_run).test_file for op in args.ops] + ["tests/test_compile.py"]
            files = [f for f in files if (common.REPO_ROOT / f).is_file()]
            test_tasks = pytest_tasks(args, files, kill_at=self.kill_at(deadline))
            tasks += test_tasks
        info = CommandTask("info", [sys.executable, "-m", "fastvit_kernels.info"], worker_env(args),
                           kill_at=self.kill_at(deadline), after=build, background=True)
        tasks.append(info)
        self.say(f"checks: {len(check_tasks)} correctness workers, {len(test_tasks)} pytest processes, "
                 f"build {'in the background' if build else 'skipped'}; up to {args.jobs} at a time; "
                 f"deadline +{deadline - self.t0:.0f} s")
        run_pool(tasks, args.jobs, self.workdir, self.say, self.on_done)

        if build is not None:
            job = build.job
            so = sorted(p.name for p in (common.REPO_ROOT / "fastvit_kernels").glob("_C*.so"))
            status = ("not started (time budget)" if job is None else "timed out" if job.timed_out
                      else "ok" if job.rc == 0 else f"failed (exit {job.rc})")
            self.step("build", status, started, seconds=job.seconds if job else 0.0, argv=build.argv, extension=so,
                      tail=job.output()[-1500:] if job else "")
        info_text = info.job.output() if info.job else "not run"
        self.doc["info"] = info_text
        self.say("python -m fastvit_kernels.info:\n" + info_text.rstrip())
        if check_tasks:
            records, probes, statuses = [], [], {}
            for task in check_tasks:
                for unit_id, result in sorted(task.results.items()):
                    statuses[unit_id] = result
                for rec in task.records():
                    (probes if rec.get("probe") else records).append(rec)
            # Units with no record (skipped, crashed) become failed checks that say why.
            recorded = {(r["op"], r["dtype"], r["shape"], r["pass"]) for r in records}
            for task in check_tasks:
                for unit in task.units:
                    key = (unit["op"], unit["dtype"], unit.get("shape"), unit.get("pass"))
                    if unit.get("probe") or key in recorded:
                        continue
                    result = statuses.get(unit["id"], {})
                    records.append({"op": unit["op"], "dtype": unit["dtype"], "shape": unit["shape"],
                                    "pass": unit["pass"], "ok": False, "not_run": True,
                                    "error": f"{result.get('status', 'not run')}: {result.get('reason', '')}".strip(": ")})
            order = {op: i for i, op in enumerate(OPS)}
            records.sort(key=lambda r: (order.get(r["op"], 99), r["dtype"]))
            self.doc["correctness"], self.doc["probes"] = records, probes
            passed = sum(1 for r in records if r.get("ok"))
            self.step("correctness", f"{passed}/{len(records)} checks passed", started,
                      workers=sum(len(t.jobs) for t in check_tasks))
        if test_tasks:
            self.doc["pytest"] = [parse_pytest(task) for task in test_tasks]
            failed = sum(r["counts"].get("failed", 0) + r["counts"].get("error", 0) for r in self.doc["pytest"])
            passed = sum(r["counts"].get("passed", 0) for r in self.doc["pytest"])
            timed_out = sum(1 for r in self.doc["pytest"] if r["timed_out"])
            self.step("pytest", f"{passed} passed, {failed} failed/errors"
                      + (f", {timed_out} process(es) timed out" if timed_out else ""), started, k=args.pytest_k)
        self.write()

    def phase_bench(self) -> None:
        args, started = self.args, time.time()
        deadline = self.deadline("bench")
        units, next_id = [], 0
        plans = {op: plan(op, args.dry_run) for op in args.ops}
        for op, p in plans.items():  # every op's eager peers first, then the compiled ones
            for dtype in p.bench_dtypes:
                units.append({"id": next_id, "op": op, "dtype": dtype, "impls": p.fast_impls})
                next_id += 1
        if not args.dry_run:  # compiling on the CPU takes minutes: not in the dry run
            for op, p in plans.items():
                for dtype in p.bench_dtypes[:1]:
                    for impl in p.compiled_impls:
                        units.append({"id": next_id, "op": op, "dtype": dtype, "impls": [impl], "min_left_s": 25})
                        next_id += 1
        task = WorkerTask("bench", "bench", units, args, self.env_file, kill_at=self.kill_at(deadline),
                          deadline=deadline)
        self.say(f"bench: {len(units)} units in one worker at a time; deadline +{deadline - self.t0:.0f} s")
        run_pool([task], 1, self.workdir, self.say, self.on_done)
        rows = task.records()
        for op, p in plans.items():  # ratios over every row of the op (units ran separately)
            op_rows = [r for r in rows if r.get("op") == op]
            common.add_ratios(op_rows, "op", p.group_keys + ("dtype",))
        self.doc["bench"] = rows
        self.doc["bench_units"] = {u["id"]: {**u, **{k: v for k, v in task.results.get(u["id"], {}).items()
                                                    if k != "records"}} for u in units}
        done = sum(1 for r in task.results.values() if r.get("status") == "ok")
        self.step("bench", f"{done}/{len(units)} units, {len(rows)} rows", started, workers=len(task.jobs))

    def phase_levit(self) -> None:
        args, started = self.args, time.time()
        deadline = self.deadline("levit")
        # (part, impl, seconds that must be left to start it): eager and patched inference always
        # run; torch.compile(timm) next (the comparison asked for), then the float32 check (its
        # kernels compile anew; the correctness step covered the ops at LeViT shapes already),
        # the other variants and training when time allows.
        need_compile = 75
        plan_ = [("infer", "eager", 0), ("infer", "patched", 0), ("infer", "compile", need_compile),
                 ("check", "patched", 40), ("infer", "patched+folded", 10),
                 ("infer", "patched+compile", need_compile), ("train", "eager", 30), ("train", "patched", 30),
                 ("train", "compile", need_compile + 30)]
        if args.dry_run:
            # Inference only: no torch.compile (minutes on the CPU), and no check: train-mode
            # BatchNorm needs batch 8 to be well conditioned (at batch 2 even the reference
            # backend differs from timm), a minute of the patched model in the interpreter.
            plan_ = [("infer", "eager", 0), ("infer", "patched", 0)]
        units = [{"id": i, "part": part, "impl": impl, "min_left_s": need}
                 for i, (part, impl, need) in enumerate(plan_)]
        task = WorkerTask("levit", "levit", units, args, self.env_file, kill_at=self.kill_at(deadline),
                          deadline=deadline)
        run_pool([task], 1, self.workdir, self.say, self.on_done)
        records = task.records()
        check = next((r for r in records if r.get("part") == "check"), None)
        rows = [r for r in records if r.get("part") in ("infer", "train")]
        from fastvit_kernels.bench import levit

        for part in ("infer", "train"):
            part_rows = [r for r in rows if r["part"] == part]
            levit.add_speedups(part_rows, "patched")
        self.doc["levit"] = {"check": check, "rows": rows,
                             "units": {u["id"]: {**u, **{k: v for k, v in task.results.get(u["id"], {}).items()
                                                         if k != "records"}} for u in units}}
        infer = {r["impl"]: r for r in rows if r["part"] == "infer" and r.get("img_per_s")}
        status = ", ".join(f"{impl} {r['img_per_s']:.0f} img/s" for impl, r in infer.items()) or "no timings"
        self.step("levit", status, started, workers=len(task.jobs))


# ---------------------------------------------------------------------------------------------
# Verdicts and the summary
# ---------------------------------------------------------------------------------------------


def verdicts(doc: Dict) -> Tuple[Dict[str, Dict], Dict[str, Tuple[str, ...]]]:
    """Per op: checks passed per dtype, the pytest result and whether the Triton path passed
    every check (-> the suggested VERIFIED_ON_GPU)."""
    ops: Dict[str, Dict] = {}
    for op in doc.get("ops_selected", OPS):
        records = [r for r in doc.get("correctness", []) if r["op"] == op]
        per_dtype = {}
        for dtype in (common.dtype_name(d) for d in CHECK_DTYPES):
            rs = [r for r in records if r["dtype"] == dtype]
            per_dtype[dtype] = {"passed": sum(1 for r in rs if r.get("ok")), "total": len(rs),
                                "failed": [f"{r['shape']} {r['pass']}: {r.get('error')}" for r in rs if not r.get("ok")]}
        why_not = []
        if not records:
            why_not.append("correctness not run")
        for dtype, result in per_dtype.items():
            if result["total"] and result["passed"] < result["total"]:
                why_not.append(f"{dtype}: {result['total'] - result['passed']} of {result['total']} checks failed or not run")
            if records and not result["total"]:
                why_not.append(f"{dtype}: no checks")
        test = pytest_of(doc, f"tests/test_{op}.py")
        if test and (test.get("failed") or test.get("error")):
            why_not.append(f"pytest: {test.get('failed', 0)} failed, {test.get('error', 0)} errors")
        op_rows = [r for r in doc.get("bench", []) if r.get("op") == op and r.get("impl") == "op" and r.get("error")]
        if op_rows:
            why_not.append(f"benchmark: {len(op_rows)} op rows failed ({op_rows[0]['error'][:120]})")
        ops[op] = {"dtypes": per_dtype, "pytest": test, "verified": not why_not, "why_not": why_not}
    verified = {op: ("triton",) for op, v in ops.items() if v["verified"]}
    return ops, verified


def pytest_of(doc: Dict, test_file: str) -> Optional[Dict[str, object]]:
    """The outcomes of one test file in the pytest step ({"passed": n, ...}, "timed_out"), or None."""
    for result in doc.get("pytest", []):
        if test_file in result["files"]:
            return {**result["per_file"].get(test_file, {}), "timed_out": result["timed_out"]}
    return None


def _fmt_pytest(test: Optional[Dict]) -> str:
    if not test:
        return "-"
    text = ", ".join(f"{n} {k}" for k, n in sorted(test.items()) if k != "timed_out") or "0 run"
    return text + (" (timed out)" if test.get("timed_out") else "")


def _fmt_ratio(row: Optional[Dict]) -> str:
    if row is None:
        return "-"
    if row.get("error"):
        return "n/a"
    return f"{row['ref_speedup']:.3g}x" if row.get("ref_speedup") else "-"


SUMMARY_LIMIT = 10_000  # characters: the device tool returns the last 12,000 of the output


def summary(doc: Dict, paths: Optional[Dict[str, Path]] = None) -> str:
    """The one-screen summary, at most SUMMARY_LIMIT characters (fewer failure lines when there
    are many; the JSON has them all)."""
    for details in ((14, 3), (6, 1), (3, 0)):
        text = _summary(doc, paths, *details)
        if len(text) <= SUMMARY_LIMIT:
            return text
    return "\n".join(line[:150] for line in text.splitlines())[-SUMMARY_LIMIT:]


def _summary(doc: Dict, paths: Optional[Dict[str, Path]], max_failures: int, max_test_failures: int) -> str:
    env = doc.get("env", {})
    ops, verified = doc.get("ops") or {}, doc.get("verified_on_gpu") or {}
    lines = []
    title = "fastvit_kernels GPU suite" + (" -- DRY RUN (CPU, Triton interpreter: not a GPU verification)"
                                          if doc.get("dry_run") else "")
    lines.append(f"===== {title}{' -- INTERRUPTED' if doc.get('interrupted') else ''} =====")
    lines.append(f"device: {env.get('device')} | capability {env.get('gpu_capability', '-')} | driver "
                 f"{env.get('driver', '-')} | {env.get('gpu_memory_gib', '-')} GiB | host {env.get('hostname')}")
    lines.append(f"torch {env.get('torch')} (CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}) | triton "
                 f"{env.get('triton')} | timm {env.get('timm')} | python {env.get('python')} | nvcc {env.get('nvcc')}")
    lines.append(f"git {env.get('git_sha')}{'+dirty' if env.get('git_dirty') else ''} | source digest "
                 f"{env.get('source_digest')} | cpu {env.get('cpu_model')} x{env.get('cpu_logical')} | {env.get('date')}")
    steps = doc.get("steps", {})
    lines.append("steps: " + " | ".join(f"{n} {s['seconds']:.0f}s {s['status']}" for n, s in steps.items())
                 + f" | total {doc.get('elapsed_s', 0):.0f}s of {doc.get('time_budget_s', 0):.0f}s")
    build = steps.get("build")
    if build:
        lines.append(f"build: {build['status']}; extension: {', '.join(build.get('extension') or []) or 'none'}")

    lines.append("")
    on_cpu = env.get("device_type") == "cpu"
    lines.append(f"correctness (Triton forced on {'CPU tensors, interpreted' if on_cpu else 'CUDA tensors'}, "
                 "fwd and fwd+bwd vs float64; checks passed):")
    if doc.get("correctness"):
        rule = next((r.get("rule") for r in doc["correctness"] if r.get("rule")), "-")
        header = f"  {'op':18s} {'float32':>9s} {'bfloat16':>9s} {'float16':>9s}  1st call fwd/bwd  pytest"
        lines.append(header)
        for op, v in ops.items():
            cells = []
            for dtype in ("float32", "bfloat16", "float16"):
                d = v["dtypes"][dtype]
                cells.append(f"{d['passed']}/{d['total']}" if d["total"] else "-")
            firsts = {r["pass"]: r.get("first_call_s") for r in doc["correctness"]
                      if r["op"] == op and r["dtype"] == ("float32" if doc.get("dry_run") else "float16")
                      and r.get("first_call_s") is not None}
            first = "/".join(f"{firsts[p]:.1f}s" if p in firsts else "-" for p in PASSES)
            lines.append(f"  {op:18s} {cells[0]:>9s} {cells[1]:>9s} {cells[2]:>9s}  {first:>16s}  "
                         f"{_fmt_pytest(v['pytest'])[:60]}")
        lines.append(f"  (rule: {rule}; 1st call: the first model shape in "
                     f"{'float32' if doc.get('dry_run') else 'float16'}, compiles, workers in parallel)")
        failures = [(op, dtype, f) for op, v in ops.items() for dtype, d in v["dtypes"].items() for f in d["failed"]]
        if failures:
            lines.append(f"  failures ({len(failures)}):")
            for op, dtype, f in failures[:max_failures]:
                lines.append(f"    {op} {dtype} {f}"[:240])
            if len(failures) > max_failures:
                lines.append(f"    ... {len(failures) - max_failures} more in the JSON")
        probes = [p for p in doc.get("probes", []) if "use_backend_reaches_backward" in p]
        if probes:
            reached = sorted({p["use_backend_reaches_backward"] for p in probes})
            lines.append(f"  use_backend('triton') alone reaches the backward: "
                         f"{'yes' if reached == [True] else 'NO' if reached == [False] else 'mixed'} "
                         f"(the suite and the pytest step also set FASTVIT_KERNELS_BACKEND=triton)")
    else:
        lines.append("  not run")
    if doc.get("pytest"):
        k = doc.get("steps", {}).get("pytest", {}).get("k")
        lines.append(f"pytest -k {k!r} (the test suite's own checks, time-limited):")
        for result in doc["pytest"]:
            lines.append(f"  {result['name']}: {result['summary'][:150]}")
            for failure in result["failures"][:max_test_failures]:
                lines.append(f"    {failure}"[:240])

    lines.append("")
    lines.append("microbenchmarks (op = Triton forced; 'x' = peer ms / op ms, > 1: the op is faster):")
    rows = doc.get("bench", [])
    if rows:
        groups: Dict[Tuple, List[Dict]] = {}
        for row in rows:
            key = (row.get("op"), row.get("case"), row.get("dtype"), row.get("pass"))
            groups.setdefault(key, []).append(row)
        for (op, case, dtype, pass_), group in groups.items():
            op_row = next((r for r in group if r.get("impl") == "op"), None)
            op_ms = (f"{op_row['ms']:.3f} ms" if op_row and op_row.get("ms") else
                     f"n/a ({(op_row or {}).get('error', 'missing')})"[:60])
            peers = " ".join(f"{r['impl']} {_fmt_ratio(r)}" for r in group if r.get("impl") != "op")
            lines.append(f"  {op} {case} {dtype} B={group[0].get('B')} {pass_}: op {op_ms} | {peers}"[:240])
        skipped = [u for u in doc.get("bench_units", {}).values() if u.get("status") not in ("ok", None)]
        if skipped:
            lines.append("  not run: " + "; ".join(f"{u['op']} {u['dtype']} {'/'.join(u['impls'])} "
                                                   f"({u.get('status')})" for u in skipped)[:600])
    else:
        lines.append("  not run")

    lines.append("")
    levit = doc.get("levit") or {}
    check = levit.get("check")
    lines.append("levit (end to end, Triton forced in the patched variants):")
    if check:
        if check.get("error"):
            lines.append(f"  {check.get('model')} patched vs timm (float32): FAILED: {check['error'][:200]}")
        else:
            lines.append(f"  {check.get('model')} patched vs timm (float32): eval {check['eval_rel_err']:.1e}, folded "
                         f"{check['folded_eval_rel_err']:.1e}, train {check['train_rel_err']:.1e}, grads "
                         f"{check['grad_rel_err']:.1e} -> {'OK' if check.get('ok') else 'MISMATCH'}")
    for row in levit.get("rows", []):
        what = (f"{row['img_per_s']:.1f} img/s, x eager {row['vs_eager']:.2f}" if row.get("img_per_s") and row.get("vs_eager")
                else f"{row['img_per_s']:.1f} img/s" if row.get("img_per_s") else f"n/a: {str(row.get('error'))[:120]}")
        err = f", rel err {row['max_rel_err']:.1e}" if row.get("max_rel_err") is not None else ""
        lines.append(f"  {row['case']} {row['part']} {row['impl']:16s} B={row['B']} {row['dtype']}: {what}{err}"
                     f"{' MISMATCH' if row.get('match') is False else ''}")
    skipped = [u for u in (levit.get("units") or {}).values() if u.get("status") not in ("ok", None)]
    if skipped:
        lines.append("  not run: " + "; ".join(f"{u['part']} {u['impl']} ({u.get('status')})" for u in skipped)[:400])
    if not check and not levit.get("rows"):
        lines.append("  not run")

    lines.append("")
    not_verified = {op: v["why_not"] for op, v in ops.items() if not v["verified"]}
    body = ", ".join(f'"{op}": ("triton",)' for op in verified)
    lines.append("suggested for fastvit_kernels/backends.py" + (" (dry run: do NOT use)" if doc.get("dry_run") else "")
                 + ":")
    lines.append(f"  VERIFIED_ON_GPU: Dict[str, Sequence[str]] = {{{body}}}")
    for op, why in not_verified.items():
        lines.append(f"  not {op}: {'; '.join(why)}"[:240])
    if paths:
        lines.append("files: " + " ".join(str(p) for p in paths.values()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]]):
    parser = argparse.ArgumentParser(prog="python -m fastvit_kernels.bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for the log, JSON and summary (default $OUT, else "
                        "benchmarks/results/ of the checkout)")
    parser.add_argument("--time-budget", type=float, help="seconds for the whole run (default 480; dry run 110)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS),
                        help="steps to run (env always runs; default all)")
    parser.add_argument("--skip-build", action="store_true", help="no pip install (the build step)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--jobs", type=int, help="processes at a time for the checks and pytest: jobs - 1 "
                        "correctness workers and pytest (default: the CPUs, at most 16; dry run 2)")
    parser.add_argument("--pytest-k", help="pytest -k expression (default 'triton-cuda'; dry run: two cheap "
                        "triton-cpu tests)")
    parser.add_argument("--pytest-maxfail", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true", help="CPU and Triton's interpreter, tiny sizes")
    # For debugging the suite: the GPU plan on another device (cpu, with TRITON_INTERPRET=1 set).
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    # Internal: a worker process of the suite.
    parser.add_argument("--worker", choices=("check", "bench", "levit"), help=argparse.SUPPRESS)
    parser.add_argument("--units", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--env-file", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.time_budget is None:
        args.time_budget = 110.0 if args.dry_run else 480.0
    if args.jobs is None:
        args.jobs = 2 if args.dry_run else max(2, min(16, os.cpu_count() or 2))
    if args.pytest_k is None:
        args.pytest_k = ("triton-cpu and (non_contiguous_grad_and_inference or custom_eps)" if args.dry_run
                         else "triton-cuda")
    return args


def watch_parent() -> None:
    """Ends this process (a worker, in a session of its own) within a second or two of the
    suite's end, if the suite is killed before it could end its workers."""
    import threading

    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(137)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["--worker", "pytest"]:  # pytest, under the watch for the suite's end
        import pytest

        watch_parent()
        return int(pytest.main(argv[2:]))
    args = parse_args(argv)
    if args.worker:
        watch_parent()
        return worker_main(args)
    return Suite(args).run()


if __name__ == "__main__":
    sys.exit(main())
