"""What every benchmark shares: timing, the environment record, result rows, tables, JSON, the
kernel-case loop and the command-line skeleton.

Every module of fastvit_kernels.bench imports it as `from fastvit_kernels.bench import common`.
Results are rows of plain data (one per case, impl and pass) that carry the device, versions and
git sha, so files from different machines and commits can be concatenated and compared.

A benchmark module's command line is `common.main(...)`: the module declares its own options
(`add_options(parser)`), what a run does (`run_from_args(ctx) -> rows`) and what it prints
(`report(rows, ctx) -> str`); --device, --dtype, --batch, --quick, --out (and --impls, --passes),
the environment line, the JSON file and its default path are handled here once.
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, TypeVar

import torch

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout root when run from one
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------

_T0 = time.perf_counter()


def log(message: str) -> None:
    """A progress line on stderr, stamped with seconds since the process started benchmarking."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def resolve_device(name: Optional[str]) -> torch.device:
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds taken by one call (used for the first call of a compiled function)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def benchmark_ms(
    fn: Callable[[], object], device: torch.device, *, quick: bool = False, min_run_time: Optional[float] = None
) -> Dict[str, float]:
    """Median time of fn() in milliseconds, after warm-up.

    CPU: torch.utils.benchmark.Timer.blocked_autorange with every intra-op thread torch uses (the
    Timer defaults to one thread, which would misreport multi-threaded kernels).
    CUDA: triton.testing.do_bench (flushes L2 between calls, median of CUDA-event timings), or a
    CUDA-event loop when triton is missing.
    Returns {"ms": median, "iqr_ms": interquartile range, "runs": number of timed blocks}.
    """
    for _ in range(2):  # warm-up: allocator, caches, lazy inits (compiled fns were called already)
        fn()
    synchronize(device)
    if device.type == "cuda":
        return _benchmark_cuda_ms(fn, device, quick)
    from torch.utils.benchmark import Timer

    if min_run_time is None:
        min_run_time = 0.3 if quick else 1.5
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return {"ms": m.median * 1e3, "iqr_ms": m.iqr * 1e3, "runs": len(m.times)}


def _benchmark_cuda_ms(fn, device, quick) -> Dict[str, float]:
    warmup_ms, rep_ms = (10, 40) if quick else (25, 200)
    try:
        from triton.testing import do_bench

        q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.25, 0.5, 0.75])
        return {"ms": q[1], "iqr_ms": q[2] - q[0], "runs": None}  # do_bench does not say
    except ImportError:
        pass
    # Event loop fallback: time each call separately and take the median.
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 5 or time.perf_counter() < deadline:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    n = len(times)
    return {"ms": times[n // 2], "iqr_ms": times[(3 * n) // 4] - times[n // 4], "runs": n}


@contextlib.contextmanager
def _quiet_stderr():
    """Silences file descriptor 2 (output of C++ libraries too) for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """The most bytes allocated at once while fn() runs, beyond what was allocated before.

    CUDA: torch.cuda.max_memory_allocated. CPU: the running total that PyTorch's CPU allocator
    reports to the profiler at every allocation (so buffers allocated inside C++ kernels count).
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        synchronize(device)
        del result
        return torch.cuda.max_memory_allocated(device) - before
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # the profiler logs a line on stderr at start and at stop
        prof.start()
    try:
        result = fn()
        del result
    finally:
        with _quiet_stderr():
            prof.stop()
    peak = 0
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        if event.tag == _EventType.Allocation:
            # total_allocated counts from the start of profiling.
            peak = max(peak, event.extra_fields.total_allocated)
        pending.extend(event.children)
    return peak


def measure_copy_bandwidth(device: torch.device) -> float:
    """Memory bandwidth in bytes/s from one large copy (counts the read and the write).

    CUDA: a device-to-device copy of up to 1 GiB. CPU: a copy between two 512 MiB buffers (larger
    than the last-level cache), by PyTorch's intra-op threads.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        nbytes = min(1 << 30, free // 4)  # two buffers, leave room for the benchmarks
        src = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
    else:
        nbytes = 512 << 20
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.zeros_like(src)
    ms = benchmark_ms(lambda: dst.copy_(src), device)["ms"]
    src = dst = None  # free both buffers before emptying the cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / (ms / 1e3)


def copy_bandwidth(device: torch.device, env: Dict[str, object]) -> float:
    """measure_copy_bandwidth, logged and recorded as env['copy_bandwidth_gbs']."""
    log(f"measuring {device.type} copy bandwidth ...")
    bandwidth = measure_copy_bandwidth(device)
    env["copy_bandwidth_gbs"] = round(bandwidth / 1e9, 1)
    log(f"    {bandwidth / 1e9:.1f} GB/s")
    return bandwidth


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _physical_cores() -> Optional[int]:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo; None where unknown."""
    try:
        cores, phys = set(), None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":", 1)[1].strip()
                elif line.startswith("core id"):
                    cores.add((phys, line.split(":", 1)[1].strip()))
        return len(cores) or None
    except OSError:
        return None


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken
        return None


def native_status() -> Dict[str, Optional[str]]:
    """Whether fastvit_kernels._C loaded, its ISA, and why not when it did not."""
    from fastvit_kernels import _native

    if not _native.available():
        return {"native": None, "native_isa": None, "native_error": _native.load_error}
    isa = None
    try:
        isa = str(_native.native.cpu_isa())
    except Exception as error:  # an older build without cpu_isa()
        isa = f"unknown ({type(error).__name__})"
    return {"native": "loaded", "native_isa": isa, "native_error": None}


def environment(device: torch.device) -> Dict[str, object]:
    """Everything needed to interpret a timing: hardware, threads, versions, code revision."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        extra = {
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_sm_count": props.multi_processor_count,
            "gpu_capability": f"{props.major}.{props.minor}",
        }
    else:
        name = _cpu_model()
        extra = {}
    sha = _git("rev-parse", "HEAD") or "unknown"
    # Dirty: the code that runs (package, kernels, build) differs from the commit; result files
    # and benchmark scripts do not count.
    status = _git("status", "--porcelain", "--", "fastvit_kernels", "csrc", "setup.py", "CMakeLists.txt")
    env = {
        "device_type": device.type,
        "device": name,
        "cpu_model": _cpu_model(),
        "cpu_logical": os.cpu_count(),
        "cpu_physical_cores": _physical_cores(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "fastvit_kernels": _version("fastvit_kernels"),
        "git_sha": sha,
        "git_dirty": None if status is None else bool(status),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        # Other processes on the machine distort timings (most on few cores): keep the evidence.
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        **native_status(),
        **extra,
    }
    return env


def device_kind(env: Dict[str, object]) -> str:
    """A short file-name-safe device label: 'cpu-2t-xeon', 'cuda-nvidia-h100-80gb-hbm3'."""
    if env["device_type"] == "cuda":
        label = f"cuda-{env['device']}"
    else:
        model = re.sub(r"\(R\)|\(TM\)|CPU|Processor|@.*", "", str(env["cpu_model"]))
        label = f"cpu-{env['torch_threads']}t-{model}"
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def default_out_path(script: str, env: Dict[str, object]) -> Path:
    """benchmarks/results/<script>_<device kind>_<date>.json (date from the environment record)."""
    stamp = str(env["date"])[:19].replace(":", "").replace("-", "")
    return REPO_ROOT / "benchmarks" / "results" / f"{script}_{device_kind(env)}_{stamp}.json"


def describe_env(env: Dict[str, object]) -> str:
    native = (
        f"native {env['native_isa']}" if env.get("native") else f"native missing ({env.get('native_error')})"
    )
    return (
        f"{env['device']} | {env['torch_threads']} threads, cpu capability {env['cpu_capability']} | "
        f"torch {env['torch']} triton {env['triton']} timm {env['timm']} python {env['python']} "
        f"cuda {env['cuda']} | {native} | git {str(env['git_sha'])[:12]}"
        f"{'+dirty' if env.get('git_dirty') else ''} | load {env.get('loadavg_1m')} | {env['date']}"
    )


# ---------------------------------------------------------------------------------------------
# Rows, ratios, JSON, table
# ---------------------------------------------------------------------------------------------

# The environment fields copied into every row, so rows stay meaningful once separated.
ROW_ENV_KEYS = ("device", "device_type", "torch_threads", "torch", "triton", "git_sha", "native_isa")


def make_row(env: Dict[str, object], **fields) -> Dict[str, object]:
    row = {key: env.get(key) for key in ROW_ENV_KEYS}
    row.update(fields)
    row.setdefault("ms", None)
    row.setdefault("error", None)
    return row


def add_ratios(rows: List[Dict[str, object]], ref_impl: str, group_keys: Sequence[str] = ("case", "pass")) -> None:
    """Sets row['ref_impl'] and row['ref_speedup'] = time of this row / time of ref_impl.

    The reference is the same (case, pass) row of `ref_impl` (the fused op); a speed-up > 1 means
    the reference is that many times faster than this row's implementation.
    """
    ref_ms = {}
    for row in rows:
        if row.get("impl") == ref_impl and row.get("ms"):
            ref_ms[tuple(row.get(k) for k in group_keys)] = row["ms"]
    for row in rows:
        ref = ref_ms.get(tuple(row.get(k) for k in group_keys))
        row["ref_impl"] = ref_impl
        row["ref_speedup"] = row["ms"] / ref if ref and row.get("ms") else None


def write_json(path: Path, env: Dict[str, object], rows: List[Dict[str, object]], **meta) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(os, "getloadavg"):
        env = {**env, "loadavg_1m_end": round(os.getloadavg()[0], 2)}
    doc = {"schema": SCHEMA_VERSION, "env": env, **meta, "rows": rows}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
        f.write("\n")
    return path


@dataclass
class Column:
    key: str
    header: str
    fmt: str = "{}"  # format for present values; None prints as "-"
    width: int = 0  # 0: fit the content
    left: bool = False


def _cell(value, col: Column) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return col.fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def format_table(rows: Iterable[Dict[str, object]], columns: Sequence[Column]) -> str:
    """A fixed-width text table; the last column may be long (notes, errors) and is not padded."""
    rows = list(rows)
    cells = [[_cell(row.get(c.key), c) for c in columns] for row in rows]
    widths = [
        max([len(c.header), c.width] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)
    ]

    def line(values: Sequence[str]) -> str:
        parts = []
        for i, (v, c) in enumerate(zip(values, columns)):
            if i == len(columns) - 1:
                parts.append(v)
            else:
                parts.append(v.ljust(widths[i]) if c.left else v.rjust(widths[i]))
        return "  ".join(parts).rstrip()

    out = [line([c.header for c in columns]), line(["-" * w for w in widths[:-1]] + ["-" * len(columns[-1].header)])]
    out += [line(r) for r in cells]
    return "\n".join(out)


# The kernel microbenchmarks' table (bias, ggem, policy / varlen attention): one row per
# (case, pass, impl), the op's speed-up over each peer, and notes (backend, failures, extra).
KERNEL_COLUMNS = [
    Column("case", "case", left=True),
    Column("pass", "pass", left=True),
    Column("impl", "impl", left=True),
    Column("ms", "ms", "{:.3f}"),
    Column("ref_speedup", "op x", "{:.2f}"),
    Column("max_rel_err", "rel err", "{:.1e}"),
    Column("first_call_s", "1st s", "{:.1f}"),
    Column("bw_fraction", "bw floor", "{:.1%}"),
    Column("note", "note", left=True),
]


def noted_table(rows: List[Dict[str, object]], columns: Sequence[Column],
                notes: Callable[[Dict], List[str]] = lambda row: []) -> str:
    """format_table after setting each row's "note" column: notes(row), then "n/a: <error>" when
    the row failed."""
    for row in rows:
        parts = list(notes(row))
        if row.get("error"):
            parts.append(f"n/a: {row['error'][:160]}")
        row["note"] = "; ".join(parts)
    return format_table(rows, columns)


def backend_note(row: Dict[str, object]) -> List[str]:
    """["backend=<name>"] for an op's row (which backend ran), else []."""
    return [f"backend={row['backend']}"] if row.get("backend") else []


def kernel_table(rows: List[Dict[str, object]], extra_notes: Callable[[Dict], List[str]] = lambda row: []) -> str:
    """KERNEL_COLUMNS of the rows (the bandwidth column only when some row has it); notes: the
    op's backend, extra_notes(row), failures."""
    has_floor = any(r.get("bw_fraction") is not None for r in rows)
    return noted_table(rows, [c for c in KERNEL_COLUMNS if has_floor or c.key != "bw_fraction"],
                       lambda row: backend_note(row) + extra_notes(row))


# ---------------------------------------------------------------------------------------------
# Kernel cases: checking and timing every implementation of an op
# ---------------------------------------------------------------------------------------------

# Largest relative error (max|got - want| / max|want|) accepted against a float64 (or float32)
# reference, by the dtype the implementation computes in: the LeViT check and the pytest-benchmark
# suite assert it; the microbenchmarks record the error in their rows.
REL_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max|got - want| / max|want| (relative to the tensor's scale, so tiny entries don't dominate)."""
    want = want.detach().double()
    scale = want.abs().max().item() or 1.0
    return (got.detach().double() - want).abs().max().item() / scale


def max_rel_err(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """The worst rel_err over pairs of tensors (an output and its gradients, say)."""
    return max((rel_err(a, b) for a, b in zip(got, want)), default=0.0)


def short_error(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception, for a table cell and a JSON field (full text in 'error')."""
    text = f"{type(error).__name__}: {error}".strip()
    first = text.splitlines()[0] if text else type(error).__name__
    return first if len(first) <= limit else first[: limit - 3] + "..."


def pass_leaves(pass_: str, tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The tensors one pass of a kernel case runs on: the case's own for "fwd", fresh leaf copies
    that require grad for "fwd+bwd" (so every timed call starts a new graph)."""
    if pass_ == "fwd":
        return list(tensors)
    return [t.detach().clone().requires_grad_() for t in tensors]


def pass_runner(pass_: str, call: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor],
                grad_out: torch.Tensor) -> Callable[[], List[torch.Tensor]]:
    """run() of one pass: [call()] without autograd for "fwd"; for "fwd+bwd", the gradients of
    `leaves` (pass_leaves) for grad_out, as a kernel case's oracle returns them."""
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                return [call()]

        return run
    return lambda: list(torch.autograd.grad(call(), list(leaves), grad_out))


def measure(row: Dict[str, object], prepare: Callable[[], Callable[[], List[torch.Tensor]]],
            want: Sequence[torch.Tensor], device: torch.device, *, quick: bool,
            floor_bytes: Optional[int] = None, bandwidth: Optional[float] = None,
            peak_memory: bool = False) -> Dict[str, object]:
    """Times one implementation of a kernel benchmark into its row.

    prepare() -> run: run() is one timed call and returns the tensors to compare with `want` (the
    first len(result) oracle tensors). The first call (which compiles, for compiled peers) is
    reported as first_call_s and checked (max_rel_err), not timed. With peak_memory, peak_mb is
    the most memory a call allocates at once. With a bandwidth (bytes/s), floor_ms and
    bw_fraction say how close the time is to moving floor_bytes. An exception (e.g. a peer
    without a backward) is recorded in row['error'].
    """
    try:
        run = prepare()
        first = {}
        row["first_call_s"] = round(time_call(lambda: first.setdefault("r", run()), device), 3)
        got = list(first.pop("r"))
        row["max_rel_err"] = max_rel_err(got, want[:len(got)])
        if peak_memory:
            row["peak_mb"] = peak_memory_bytes(run, device) / 2**20
        timing = benchmark_ms(run, device, quick=quick)
        row.update(ms=timing["ms"], iqr_ms=timing["iqr_ms"], runs=timing["runs"])
        if bandwidth and floor_bytes is not None:
            row["floor_ms"] = floor_bytes / bandwidth * 1e3
            row["bw_fraction"] = row["floor_ms"] / row["ms"]
    except Exception as error:  # record and go on
        row["error"] = short_error(error, limit=2000)
        log(f"    failed: {short_error(error)}")
    if row["ms"] is not None:
        peak = f", peak {row['peak_mb']:.0f} MiB" if peak_memory else ""
        log(f"    {row['ms']:.3f} ms{peak} (first call {row['first_call_s']:.2f} s, rel err {row['max_rel_err']:.1e})")
    return row


@contextlib.contextmanager
def forcing_backend(name: Optional[str]):
    """Forces the ops' backend `name` (e.g. "triton") for the block; None changes nothing.

    fastvit_kernels.use_backend sets a context variable, which the autograd threads that run a
    CUDA backward do not see (they start from an empty context), so the FASTVIT_KERNELS_BACKEND
    environment variable, which every thread reads, is set for the block as well.
    """
    if name is None:
        yield
        return
    from fastvit_kernels import backends

    saved = os.environ.get(backends.ENV_VAR)
    os.environ[backends.ENV_VAR] = name
    try:
        with backends.use_backend(name):
            yield
    finally:
        if saved is None:
            os.environ.pop(backends.ENV_VAR, None)
        else:
            os.environ[backends.ENV_VAR] = saved


def bench_kernel_cases(cases: Iterable, impls: Sequence[str], passes: Sequence[str], env: Dict[str, object], *,
                       quick: bool, bandwidth: Optional[float] = None, peak_memory: bool = False,
                       backend: Optional[str] = None) -> List[Dict]:
    """Checks and times every implementation of each kernel case, for each pass: one row each.
    With a `backend` (e.g. "triton"), the `op` rows run with that backend forced (forcing_backend);
    by default the op takes its automatic choice.

    `cases` yields a bench module's case objects (its inputs at one shape; a generator, so that one
    case at a time holds memory), which have:
      name, device                    for the log and the timing
      describe()                      a line for the log (batch, shape, dtype)
      row_fields()                    its parameters, copied into each row (case, B, shapes, dtype)
      oracle(need_grads, dtype)       the reference: [output], or the inputs' gradients, in float64
                                      (dtype: the same formula in another dtype)
      make_callable(impl, pass_)      one call of `impl` ("fwd" or "fwd+bwd"), returning what
                                      oracle returns
      backend()                       the backend the op takes for these inputs
      floor_bytes(pass_)              (with a bandwidth) the fewest bytes the pass must move
    """
    rows = []
    for case in cases:
        log(f"case {case.name}: {case.describe()}")
        for pass_ in passes:
            want = case.oracle(need_grads=pass_ != "fwd")
            for impl in impls:
                row = make_row(env, **case.row_fields(), **{"pass": pass_}, impl=impl)
                log(f"{case.name} {pass_:7s} {impl:14s} ...")

                def prepare():
                    if impl == "op":
                        row["backend"] = case.backend()
                    return case.make_callable(impl, pass_)

                floor = case.floor_bytes(pass_) if bandwidth else None
                with forcing_backend(backend if impl == "op" else None):
                    rows.append(measure(row, prepare, want, case.device, quick=quick, floor_bytes=floor,
                                        bandwidth=bandwidth, peak_memory=peak_memory))
        case = want = None  # free this case's inputs and oracle before the next is made
    return rows


def measure_model(row: Dict[str, object], prepare: Callable[[], Callable[[], object]], device: torch.device, *,
                  images: int, quick: bool, min_run_time: float,
                  check: Optional[Callable[[object], None]] = None) -> Dict[str, object]:
    """Times one end-to-end model variant into its row, as measure() does for a kernel.

    prepare() -> step: step() is one timed call (an inference batch or a training step) returning
    the model's output. The first call (which compiles, for compiled variants) is reported as
    first_call_s and handed to check(output), which compares it and records what it finds in the
    row; then ms, iqr_ms, runs and img_per_s = images per second. An exception (patching
    unavailable, a compile failure) is recorded in row['error'].
    """
    try:
        step = prepare()
        first = {}
        row["first_call_s"] = round(time_call(lambda: first.setdefault("out", step()), device), 3)
        output = first.pop("out")
        if check is not None:
            check(output)
        del output
        timing = benchmark_ms(step, device, quick=quick, min_run_time=min_run_time)
        row.update(ms=timing["ms"], iqr_ms=timing["iqr_ms"], runs=timing["runs"],
                   img_per_s=images / (timing["ms"] / 1e3))
        log(f"    {row['img_per_s']:.1f} img/s ({row['ms']:.1f} ms, first call {row['first_call_s']:.1f} s)")
    except Exception as error:  # record and go on
        row["error"] = short_error(error, limit=2000)
        log(f"    failed: {short_error(error)}")
    return row


T = TypeVar("T")


def select_by_name(items: Sequence[T], patterns: Optional[Sequence[str]]) -> List[T]:
    """The items (shapes) whose .name contains any of the patterns; all of them when none given."""
    if not patterns:
        return list(items)
    chosen = [item for item in items if any(p in item.name for p in patterns)]
    if not chosen:
        names = ", ".join(item.name for item in items)
        raise SystemExit(f"no shape matches {list(patterns)}; shapes are: {names}")
    return chosen


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32 (how rows and logs name a dtype)."""
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------
# The command line every benchmark module shares
# ---------------------------------------------------------------------------------------------


def make_parser(doc: str, *, prog: Optional[str] = None, batch: Tuple[Optional[int], Optional[int]] = (None, None),
                batch_help: Optional[str] = None, dtype_help: Optional[str] = None,
                quick_help: str = "short timings", impls: Sequence[str] = (),
                passes: Sequence[str] = ()) -> argparse.ArgumentParser:
    """An ArgumentParser (described by the first paragraph of `doc`) with the options every
    benchmark has: --device, --dtype, --batch, --quick, --out; and, when the benchmark names its
    implementations and passes, --impls and --passes (a subset of those; default all).
    `batch` = (default on CPU, default on CUDA) is only shown here; start() applies it."""
    if batch_help is None:
        cpu, cuda = batch
        batch_help = f"images per batch (default {cpu})" if cpu == cuda else f"default: {cpu} on CPU, {cuda} on CUDA"
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help=dtype_help or "default: float32 on CPU, float16 on CUDA")
    parser.add_argument("--batch", type=int, help=batch_help)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path,
                        help="JSON path (default: benchmarks/results/<name>_<device>_<date>.json of the checkout)")
    if impls:
        parser.add_argument("--impls", nargs="+", choices=impls, default=list(impls))
    if passes:
        parser.add_argument("--passes", nargs="+", choices=passes, default=list(passes))
    return parser


@dataclass
class Context:
    """A benchmark run: the parsed options and what they resolve to on this machine."""

    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    batch: Optional[int]  # --batch, else the benchmark's default for the device
    env: Dict[str, object]  # environment(device); benchmarks may add to it (copy bandwidth, ...)
    json_extra: Dict[str, object] = field(default_factory=dict)  # more top-level keys of the JSON file

    @property
    def quick(self) -> bool:
        return self.args.quick


def start(args: argparse.Namespace, batch: Tuple[Optional[int], Optional[int]] = (None, None)) -> Context:
    """Resolves --device (cuda if available), --dtype (float16 on CUDA, float32 on CPU) and --batch
    (`batch` = (default on CPU, default on CUDA)), and records the environment."""
    device = resolve_device(args.device)
    on_cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if on_cuda else torch.float32)
    return Context(args, device, dtype, args.batch or batch[on_cuda], environment(device))


def write_results(ctx: Context, name: str, rows: List[Dict[str, object]], **meta) -> Optional[Path]:
    """Writes the JSON file (--out, else benchmarks/results/<name>_<device kind>_<date>.json of the
    checkout; outside a checkout without --out, none) and says where."""
    out = ctx.args.out
    if out is None and (REPO_ROOT / "benchmarks").is_dir():
        out = default_out_path(name, ctx.env)
    if out is None:
        print("no JSON written (not run from a checkout; --out PATH writes one)")
        return None
    path = write_json(out, ctx.env, rows, **meta)
    print(f"wrote {path}")
    return path


def main(argv: Optional[Sequence[str]], doc: str, *, name: str,
         run: Callable[[Context], List[Dict[str, object]]],
         report: Callable[[List[Dict[str, object]], Context], str],
         add_options: Optional[Callable[[argparse.ArgumentParser], None]] = None,
         batch: Tuple[Optional[int], Optional[int]] = (None, None), batch_help: Optional[str] = None,
         dtype_help: Optional[str] = None, quick_help: str = "short timings",
         impls: Sequence[str] = (), passes: Sequence[str] = ()) -> int:
    """The command line of a benchmark module: parse the common options (make_parser) and the
    module's own (add_options), print the environment, rows = run(ctx), print the environment and
    report(rows, ctx) (the tables), write the JSON file (named after `name`, plus ctx.json_extra)."""
    parser = make_parser(doc, batch=batch, batch_help=batch_help, dtype_help=dtype_help, quick_help=quick_help,
                         impls=impls, passes=passes)
    if add_options is not None:
        add_options(parser)
    ctx = start(parser.parse_args(argv), batch)
    print(describe_env(ctx.env), file=sys.stderr)
    rows = run(ctx)
    print(describe_env(ctx.env))
    print(report(rows, ctx))
    write_results(ctx, name, rows, **ctx.json_extra)
    return 0
