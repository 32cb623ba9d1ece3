"""Build script of fastvit_kernels.

The native extension ``fastvit_kernels._C`` (sources in csrc/) is optional: when it cannot be
built, the install still succeeds and every op runs on its PyTorch reference.

Environment:
    FASTVIT_KERNELS_NO_NATIVE=1       skip the native build (pure-Python install)
    FASTVIT_KERNELS_REQUIRE_NATIVE=1  make a failed native build fail the install
    MAX_JOBS=N                        parallel compile jobs (read by torch's ninja build)

Install for development with ``pip install --no-build-isolation -e .`` (torch must already be
installed: the extension compiles against it). CMakeLists.txt builds the same module with CMake.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

# Flags of every native source. No -march: the ISA-specific kernels pick their instructions with
# `#pragma GCC target` and are chosen at run time (csrc/isa/isa.cpp), so one wheel runs on any
# x86-64. -fopenmp makes at::parallel_for (OpenMP backend, inline in ATen's headers) parallel;
# the libgomp.so.1 it links is the one torch already loaded.
# -g0: no debug info (setuptools adds -g; it makes the module 20x larger and the build slower).
# --param=inline-unit-growth=100: GCC stops inlining once a translation unit has grown by this
# percentage (40 by default). Each csrc/isa/ unit holds every op's kernels and needs about 70;
# with the default, vexp / vlog stop being inlined into the kernels' loops (which never happened
# while each op had its own units, and changes the kernels' rounding through FMA contraction).
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "--param=inline-unit-growth=100"]
LINK_FLAGS = ["-fopenmp"]


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def warn_no_native(reason: str) -> None:
    message = (
        f"fastvit_kernels: native CPU kernels not built ({reason}); "
        "ops will use the PyTorch reference"
    )
    bar = "!" * 79
    print(f"\n{bar}\n{message}\n{bar}\n", file=sys.stderr, flush=True)


def native_build():
    """(ext_modules, cmdclass) for the native extension, or ([], {}) when it is skipped."""
    if env_flag("FASTVIT_KERNELS_NO_NATIVE"):
        print("fastvit_kernels: FASTVIT_KERNELS_NO_NATIVE=1, skipping the native build")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # torch missing or broken
        if env_flag("FASTVIT_KERNELS_REQUIRE_NATIVE"):
            raise
        warn_no_native(f"cannot import torch.utils.cpp_extension: {exc}")
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension whose failures become a warning (unless native kernels are required)."""

        def run(self):
            try:
                super().run()
            except Exception as exc:
                self._give_up(exc)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                self._give_up(exc, ext.name)

        def get_outputs(self):
            # Only what was really built (a failed optional module is absent).
            return [p for p in super().get_outputs() if os.path.exists(p)]

        def _give_up(self, exc, name="fastvit_kernels._C"):
            if env_flag("FASTVIT_KERNELS_REQUIRE_NATIVE"):
                raise exc
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            warn_no_native(f"building {name} failed: {type(exc).__name__}: {first_line}")

    defines = ["-DFVK_BUILD_SYSTEM=setuptools", "-DFVK_CXX_FLAGS=" + ",".join(CXX_FLAGS)]
    # One unit per ISA with every op's kernels (csrc/isa/), the ops (csrc/ops/), the module. The
    # ISA units come first: they are the longest compiles, and ninja starts jobs in this order.
    sources = (sorted(glob.glob("csrc/isa/*.cpp")) + sorted(glob.glob("csrc/ops/*.cpp"))
               + ["csrc/module.cpp"])
    ext = CppExtension(
        name="fastvit_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")],
        extra_compile_args=CXX_FLAGS + defines,
        extra_link_args=LINK_FLAGS,
    )
    # optional: setuptools then skips copying a module that failed to build (editable installs).
    ext.optional = not env_flag("FASTVIT_KERNELS_REQUIRE_NATIVE")
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_build()

setup(
    name="fastvit_kernels",
    version="0.1.0",
    description="Fused kernels for efficient vision transformers (LeViT attention and more)",
    packages=find_packages(include=["fastvit_kernels*"]),
    python_requires=">=3.10",
    install_requires=["torch"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "timm", "torchvision", "triton", "numpy"],
        "triton": ["triton"],
        "timm": ["timm", "torchvision"],
        # The serving benchmark's peer engines (python -m fastvit_kernels.bench.serve).
        "serve": ["onnx", "onnxscript", "onnxruntime", "openvino"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
