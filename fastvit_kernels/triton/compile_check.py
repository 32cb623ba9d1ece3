"""Ahead-of-time GPU compilation of every Triton kernel, without a GPU.

Triton's interpreter (how the tests run the kernels on CPU) accepts code that the GPU compiler
rejects, so this compiles the kernels for real GPU targets with `triton.compile` (Triton's
front end, LLVM and ptxas; no driver needed) and reports each compilation's registers, spills
and shared memory from ptxas's own `-v` log.

What is compiled: each kernel module's `compile_variants()`, i.e. every configuration (dtype,
block sizes and other constexprs, num_warps, num_stages, pointer types) that the module's
launchers choose over the sizes it accepts, recorded from the launchers themselves on meta
tensors, so the list cannot drift from the launch code. `--subset` (what the default test
runs) keeps a representative part: per kernel and dtype, the smallest and largest block
configuration plus enough others that every constexpr flag value, num_warps, num_stages and
argument type occurs at least once.

A variant fails on a compile error or when its shared memory exceeds what the target GPU gives a
block (A100 for sm_80, H100 for sm_90): the launch would fail. Spills are reported, not fatal.

    python -m fastvit_kernels.triton.compile_check [--arch 80 90] [--op bias_attention ...]
        [--subset] [--jobs N] [--shard K/N] [--report build/triton_compile_report.txt]

Needs TRITON_INTERPRET unset (the kernels must be real JITFunctions); the test runs it in a
subprocess. Set TRITON_CACHE_DIR to an empty directory to time a cold compile.
"""

import argparse
import contextlib
import importlib
import io
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

OPS = ("bias_attention", "qna_attention", "policy_attention", "varlen_attention", "ggem_pool")
ARCHS = (80, 90)
# Shared memory a block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin): A100, H100.
MAX_SHARED = {80: 166912, 90: 232448}
DEFAULT_REPORT = os.path.join("build", "triton_compile_report.txt")
_USAGE_FILE = "fastvit_ptxas_usage.json"  # beside the cached kernel: its ptxas -v numbers


class Job(NamedTuple):
    """A variant in picklable form (the worker processes look the kernel up by name)."""

    op: str
    kernel: str
    dtype: str
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    divisible: Tuple[str, ...]
    num_warps: int
    num_stages: int
    case: str
    arch: int
    declared: Tuple[str, ...]  # the kernel's own constexpr parameters
    unusual: Tuple[str, ...] = ()  # "TABLE:fp32": pointer types other than the kernel's usual

    def config(self) -> str:
        """The declared constexprs (block sizes, flags), num_warps, num_stages, unusual pointer
        types and the case, compactly."""
        items = [f"{k}={_short(v)}" for k, v in self.constexprs.items()
                 if self.signature[k] == "constexpr" and k in self.declared]
        items += [f"w{self.num_warps}", f"s{self.num_stages}"]
        return " ".join(items + list(self.unusual) + ([self.case] if self.case else []))

    dtype_codes = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

    @property
    def dtype_code(self) -> str:
        return self.dtype_codes[self.dtype]



class Result(NamedTuple):
    job: Job
    seconds: float
    error: Optional[str] = None
    registers: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    stack: Optional[int] = None
    shared: Optional[int] = None
    notes: Tuple[str, ...] = ()

    @property
    def spills(self) -> int:
        return (self.spill_stores or 0) + (self.spill_loads or 0)


def _short(v) -> str:
    if v is None or isinstance(v, bool):
        return {True: "T", False: "F", None: "None"}[v]
    return str(v)


# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------


def _check_not_interpreted() -> None:
    from fastvit_kernels.triton._common import interpreted

    if interpreted():
        raise RuntimeError("compile_check: the kernels were imported under TRITON_INTERPRET; "
                           "they must be compiled JITFunctions (run it in a process without "
                           "TRITON_INTERPRET)")


def kernels_of(module) -> List[str]:
    """The module's @triton.jit kernels (the functions named *_kernel)."""
    from triton.runtime.jit import JITFunction

    return sorted(name for name, obj in vars(module).items()
                  if isinstance(obj, JITFunction) and name.endswith("_kernel"))


def jobs_of(ops: Sequence[str], archs: Sequence[int]) -> Tuple[List[Job], List[str]]:
    """Every variant of the ops for each arch, and problems: a kernel of a module that its
    compile_variants never launches, for some dtype."""
    from fastvit_kernels.triton._common import FLOAT_DTYPES

    _check_not_interpreted()
    jobs, problems = [], []
    for op in ops:
        module = importlib.import_module(f"fastvit_kernels.triton.{op}")
        variants = list(module.compile_variants())
        seen = {(v.name, v.dtype) for v in variants}
        for name in kernels_of(module):
            for dtype in FLOAT_DTYPES:
                if (name, dtype) not in seen:
                    problems.append(f"{op}.{name}: compile_variants() has no {dtype} launch")
        # Pointer types other than the inputs' and than the pointer's most common one (per kernel
        # and dtype) are worth a mention in the report.
        types: Dict[tuple, Dict[str, int]] = {}
        for v in variants:
            for k, t in v.signature.items():
                if t.startswith("*"):
                    count = types.setdefault((v.name, v.dtype, k), {})
                    count[t] = count.get(t, 0) + 1
        for arch in archs:
            for v in variants:
                declared = tuple(v.kernel.params[i].name for i in v.kernel.constexprs)
                inputs = "*" + Job.dtype_codes[str(v.dtype).replace("torch.", "")]
                unusual = tuple(
                    f"{k}:{t[1:]}" for k, t in v.signature.items() if t.startswith("*") and
                    t != inputs and
                    t != max(types[(v.name, v.dtype, k)].items(), key=lambda kv: kv[1])[0])
                jobs.append(Job(op, v.name, str(v.dtype).replace("torch.", ""), dict(v.signature),
                                dict(v.constexprs), tuple(v.divisible), v.num_warps, v.num_stages,
                                v.case, arch, declared, unusual))
    return jobs, problems


def _block_volume(job: Job) -> int:
    """Product of the declared integer constexprs (block sizes, head width constants)."""
    return math.prod(v for k, v in job.constexprs.items() if k in job.declared
                     and isinstance(v, int) and not isinstance(v, bool))


def representative(jobs: Sequence[Job]) -> List[Job]:
    """Per (op, kernel, arch): for each dtype its smallest and largest block configuration
    (_block_volume; on ties, the one with the most flags set); then, greedily, variants until
    every flag value (declared bool constexpr), case, num_warps and num_stages of each dtype,
    and argument type other than the inputs' (e.g. a float32 bias table with bfloat16 inputs)
    occurs at least once."""
    groups: Dict[tuple, List[Job]] = {}
    for job in jobs:
        groups.setdefault((job.op, job.kernel, job.arch), []).append(job)

    def features(job: Job) -> set:
        out = {("warps", job.dtype, job.num_warps), ("stages", job.dtype, job.num_stages),
               ("case", job.case)}
        out |= {(k, v) for k, v in job.constexprs.items()
                if k in job.declared and isinstance(v, bool)}
        out |= {(k, "inputs'" if t == "*" + job.dtype_code else t)
                for k, t in job.signature.items() if t.startswith("*")}
        return out

    def size(job: Job) -> tuple:
        return _block_volume(job), job.num_warps, job.num_stages

    def flags(job: Job) -> int:
        return sum(1 for k in job.declared if job.constexprs[k] is True)

    chosen: List[Job] = []
    for group in groups.values():
        picked: List[Job] = []
        for dtype in sorted({j.dtype for j in group}):
            of_dtype = [j for j in group if j.dtype == dtype]
            # On ties, the most flags set (the longest code) and the main case (no label).
            smallest = min(of_dtype, key=lambda j: (size(j), -flags(j), j.case != ""))
            largest = max(of_dtype, key=lambda j: (size(j), flags(j), j.case == ""))
            picked += [smallest] + ([largest] if largest is not smallest else [])
        needed = set().union(*map(features, group)) - set().union(*map(features, picked))
        by_size = sorted(group, key=size, reverse=True)
        while needed:  # the variant covering most missing features, the largest on ties
            best = max(by_size, key=lambda j: len(features(j) & needed))
            picked.append(best)
            needed -= features(best)
        chosen += picked
    return chosen


# ---------------------------------------------------------------------------------------------
# Compilation
# ---------------------------------------------------------------------------------------------


_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_PERF = re.compile(r"Potential Performance Loss: (\w+(?:\.\w+)*) instructions are serialized "
                   r"due to ([^.]*?) in the function")


def parse_ptxas_log(log: str) -> Dict[str, Any]:
    """registers, spill stores / loads and stack frame bytes (the maxima over the entries of the
    log) and ptxas's performance warnings, from `ptxas -v` output."""
    usage: Dict[str, Any] = {"notes": []}
    for m in _SPILL.finditer(log):
        usage["stack"] = max(usage.get("stack", 0), int(m.group(1)))
        usage["spill_stores"] = max(usage.get("spill_stores", 0), int(m.group(2)))
        usage["spill_loads"] = max(usage.get("spill_loads", 0), int(m.group(3)))
    for m in _REGS.finditer(log):
        usage["registers"] = max(usage.get("registers", 0), int(m.group(1)))
    for m in _PERF.finditer(log):
        note = f"{m.group(1).split('.')[0]} serialized"
        if note not in usage["notes"]:
            usage["notes"].append(note)
    return usage


def _ptxas_usage(ptx: str, arch: int) -> Dict[str, Any]:
    """Runs Triton's ptxas with -v on PTX (for a kernel compiled before the usage was saved)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", "-lineinfo",
             f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "k.o")],
            capture_output=True, text=True)
    return parse_ptxas_log(proc.stdout + proc.stderr)


def compile_job(job: Job) -> Result:
    """Compiles one variant; never raises (a failure is the result's error)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.cache import get_cache_manager

    start = time.perf_counter()
    try:
        module = importlib.import_module(f"fastvit_kernels.triton.{job.op}")
        kernel = getattr(module, job.kernel)
        names = [p.name for p in kernel.params]
        attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in job.divisible}
        src = ASTSource(kernel, job.signature, job.constexprs, attrs)
        knobs.nvidia.dump_ptxas_log = True  # a fresh compile prints ptxas's -v log to stdout
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32),
                                      options={"num_warps": job.num_warps,
                                               "num_stages": job.num_stages})
        cache = get_cache_manager(compiled.hash)
        usage = parse_ptxas_log(log.getvalue())
        if "registers" in usage:
            cache.put(json.dumps(usage), _USAGE_FILE, binary=False)
        else:  # a cache hit: the numbers saved at its compilation, or ptxas again
            path = cache.get_file(_USAGE_FILE)
            if path:
                with open(path) as f:
                    usage = json.load(f)
            else:
                usage = _ptxas_usage(compiled.asm["ptx"], job.arch)
                cache.put(json.dumps(usage), _USAGE_FILE, binary=False)
        shared = int(compiled.metadata.shared)
        error = None
        if shared > MAX_SHARED[job.arch]:
            error = (f"needs {shared} bytes of shared memory, sm_{job.arch} gives a block at most "
                     f"{MAX_SHARED[job.arch]}: the launch would fail")
        return Result(job, time.perf_counter() - start, error, usage.get("registers"),
                      usage.get("spill_stores"), usage.get("spill_loads"), usage.get("stack"),
                      shared, tuple(usage.get("notes", ())))
    except Exception as e:  # noqa: BLE001 - every failure is reported per variant
        text = f"{type(e).__name__}: {e}"
        return Result(job, time.perf_counter() - start, text)


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)


def compile_all(jobs: Sequence[Job], processes: int = 0, progress=None) -> List[Result]:
    """Compiles the jobs, in `processes` worker processes (0: one per CPU; 1: in this one).
    The workers are spawned: a script calling this needs `if __name__ == "__main__":`."""
    processes = processes or os.cpu_count() or 1
    results = []
    if processes == 1:
        for job in jobs:
            results.append(compile_job(job))
            if progress:
                progress(len(results), len(jobs))
        return results
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that imported torch
    with ctx.Pool(processes, initializer=_worker_init) as pool:
        for result in pool.imap(compile_job, jobs, chunksize=1):
            results.append(result)
            if progress:
                progress(len(results), len(jobs))
    return results


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _row(r: Result) -> str:
    j = r.job
    regs = "-" if r.registers is None else str(r.registers)
    spill = "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
    shared = "-" if r.shared is None else f"{r.shared // 1024}K"
    status = "ERROR" if r.error else ("spills" if r.spills else "ok")
    notes = ", ".join(r.notes)
    return (f"{j.op:<17} {j.kernel:<17} sm_{j.arch} {j.dtype:<8} {regs:>4} {spill:>9} "
            f"{shared:>5} {r.seconds:5.1f}s {status:<6} {j.config()}" + (f"  [{notes}]" if notes else ""))


HEADER = (f"{'op':<17} {'kernel':<17} {'arch':<5} {'dtype':<8} {'regs':>4} {'spill s/l':>9} "
          f"{'smem':>5} {'time':>6} {'status':<6} config")


def summary(results: Sequence[Result], rows: int = 40) -> List[str]:
    """Variant counts per op and arch, errors, and the spilling variants (the `rows` worst)."""
    lines = []
    counts: Dict[Tuple[str, int], List[Result]] = {}
    for r in results:
        counts.setdefault((r.job.op, r.job.arch), []).append(r)
    lines.append(f"{'op':<17} {'arch':<5} {'variants':>8} {'errors':>6} {'spilling':>8} "
                 f"{'max regs':>8} {'worst spill s/l':>15} {'compile s':>9}")
    for (op, arch), rs in sorted(counts.items()):
        worst = max(rs, key=lambda r: r.spills)
        lines.append(f"{op:<17} sm_{arch:<2} {len(rs):>8} {sum(1 for r in rs if r.error):>6} "
                     f"{sum(1 for r in rs if r.spills):>8} "
                     f"{max((r.registers or 0) for r in rs):>8} "
                     f"{worst.spill_stores or 0:>7}/{worst.spill_loads or 0:<7} "
                     f"{sum(r.seconds for r in rs):>9.1f}")
    errors = [r for r in results if r.error]
    spilling = sorted((r for r in results if r.spills and not r.error), key=lambda r: -r.spills)
    if spilling:
        lines += ["", f"spilling variants ({len(spilling)}, worst first; spills are not errors):",
                  HEADER]
        lines += [_row(r) for r in spilling[:rows]]
        if len(spilling) > rows:
            lines.append(f"... and {len(spilling) - rows} more (see the report file)")
    if errors:
        lines += ["", f"FAILED variants ({len(errors)}):"]
        for r in errors:
            lines.append(_row(r))
            lines += ["    " + l for l in r.error.strip().splitlines()[:12]]
    return lines


def write_report(path: str, results: Sequence[Result], header: Sequence[str] = ()) -> None:
    """Every variant, one row each, then the summary."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        for line in header:
            f.write(line + "\n")
        f.write(HEADER + "\n")
        for r in sorted(results, key=lambda r: (r.job.op, r.job.kernel, r.job.arch, r.job.dtype)):
            f.write(_row(r) + "\n")
            if r.error:
                f.write("".join("    " + l + "\n" for l in r.error.strip().splitlines()))
        f.write("\n" + "\n".join(summary(results)) + "\n")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastvit_kernels.triton.compile_check",
        description="Compile every Triton kernel variant for GPU targets (no GPU needed) and "
                    "report registers and spills.")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=sorted(MAX_SHARED),
                        help="compute capabilities (default: 80 90)")
    parser.add_argument("--op", nargs="+", default=list(OPS), choices=OPS, help="kernel modules")
    parser.add_argument("--subset", action="store_true",
                        help="only a representative subset (what the default test compiles)")
    parser.add_argument("--jobs", type=int, default=0, help="worker processes (0: one per CPU)")
    parser.add_argument("--shard", default="1/1", help="K/N: compile only the K-th of N slices")
    parser.add_argument("--report", default=DEFAULT_REPORT, help=f"report file ({DEFAULT_REPORT})")
    parser.add_argument("--rows", type=int, default=40, help="spilling variants printed (40)")
    parser.add_argument("--list", action="store_true", help="list the variants, compile nothing")
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET") and not os.environ.get("_FASTVIT_COMPILE_CHECK_CHILD"):
        # The kernels are interpreted functions here: start again without the interpreter.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["_FASTVIT_COMPILE_CHECK_CHILD"] = "1"
        argv = list(sys.argv[1:] if argv is None else argv)
        return subprocess.call([sys.executable, "-m", "fastvit_kernels.triton.compile_check", *argv],
                               env=env)
    _check_not_interpreted()
    t0 = time.perf_counter()
    jobs, problems = jobs_of(args.op, args.arch)
    total = len(jobs)
    if args.subset:
        jobs = representative(jobs)
    k, n = (int(x) for x in args.shard.split("/"))
    jobs = jobs[k - 1::n]
    enumerate_s = time.perf_counter() - t0
    if args.list:
        for job in jobs:
            print(f"{job.op} {job.kernel} sm_{job.arch} {job.dtype} {job.config()}")
        print(f"{len(jobs)} variants")
        return 1 if problems else 0

    cache = os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache (default)")
    print(f"compiling {len(jobs)} of {total} variants ({'subset' if args.subset else 'all'}, "
          f"shard {args.shard}) for sm_{', sm_'.join(map(str, args.arch))}; enumerated in "
          f"{enumerate_s:.1f}s; Triton cache {cache}", flush=True)

    last = [0.0]

    def progress(done, count):
        if time.perf_counter() - last[0] > 30 or done == count:
            last[0] = time.perf_counter()
            print(f"  {done}/{count} compiled, {time.perf_counter() - t0:.0f}s", flush=True)

    results = compile_all(jobs, args.jobs, progress)
    wall = time.perf_counter() - t0
    header = [f"Triton {__import__('triton').__version__}; {len(results)} variants "
              f"({'subset' if args.subset else 'all'}, shard {args.shard}); wall {wall:.0f}s "
              f"with {args.jobs or os.cpu_count()} processes; cache {cache}"]
    write_report(args.report, results, header)
    lines = header + [""] + summary(results, args.rows)
    if problems:
        lines += ["", "coverage problems:"] + ["  " + p for p in problems]
    print("\n".join(lines))
    print(f"\nfull table: {args.report}")
    failed = sum(1 for r in results if r.error)
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
