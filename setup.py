"""Build of torchquant's C++/CUDA extension against the installed torch.

Install with ``pip install --no-build-isolation .`` (or ``-e .``): build
isolation would fetch a different torch than the one the extension must match.
CUDA kernels are built when the installed torch is a CUDA build and nvcc is
found (never decided by torch.cuda.is_available(): build machines often have
no GPU). Set TORCHQUANT_CUDA=0 to force a CPU-only build.
"""
import glob
import os
import platform
import shutil

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")
IS_X86 = platform.machine().lower() in ("x86_64", "amd64")
# Flags of the kernels compiled once more per instruction set (chosen at run
# time): *_avx2.cpp and *_avx512.cpp (AVX-512 with VNNI and BF16, as on Zen 4
# and Ice Lake or newer).
ISA_FLAGS = {
    "_avx2.cpp": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx512bf16",
                    "-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}


def build_with_cuda() -> bool:
    if os.environ.get("TORCHQUANT_CUDA", "auto") == "0":
        return False
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    return torch.version.cuda is not None and bool(nvcc)


def sources(with_cuda: bool) -> list[str]:
    files = sorted(glob.glob(os.path.join(CSRC, "*.cpp"))) + sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    for sub in ("ptq", "runtime"):
        files += sorted(glob.glob(os.path.join(CSRC, sub, "*.cpp"))) + sorted(glob.glob(os.path.join(CSRC, sub, "cpu", "*.cpp")))
    files = [f for f in files if IS_X86 or not f.endswith(tuple(ISA_FLAGS))]
    if with_cuda:
        files += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        files += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cpp")))
    return files


class BuildWithIsaKernels(BuildExtension):
    """Compiles the *_avx2.cpp / *_avx512.cpp kernels with their flags and links them in.

    setuptools gives every source of an extension the same flags, so these
    translation units are compiled here first and handed over as objects.
    """

    def build_extension(self, ext):
        cxx_flags = ext.extra_compile_args.get("cxx", []) if isinstance(ext.extra_compile_args, dict) else list(ext.extra_compile_args)
        for suffix, flags in ISA_FLAGS.items():
            isa_sources = [s for s in ext.sources if s.endswith(suffix)]
            if not isa_sources:
                continue
            ext.sources = [s for s in ext.sources if s not in isa_sources]
            post = {"cxx": cxx_flags + flags, "nvcc": []} if self.use_ninja else cxx_flags + flags
            objects = self.compiler.compile(
                isa_sources,
                output_dir=os.path.join(self.build_temp, "isa" + suffix[:-4]),
                macros=ext.define_macros,
                include_dirs=ext.include_dirs,
                debug=self.debug,
                extra_postargs=post,
                depends=ext.depends,
            )
            ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


def extension():
    with_cuda = build_with_cuda()
    # ATen's parallel_for is an inline OpenMP region (torch is built with
    # AT_PARALLEL_OPENMP): without -fopenmp it silently runs on one thread.
    # The OpenMP runtime resolves to the libgomp that torch already loaded.
    # No FMA contraction: the AVX2, baseline and CUDA kernels must round the
    # same element math identically (see csrc/quant_math.h).
    cxx = ["-O3", "-std=c++17", "-fvisibility=hidden", "-fopenmp", "-ffp-contract=off"]
    macros = []
    if IS_X86:
        macros.append(("TORCHQUANT_HAVE_AVX2_KERNELS", None))
    kwargs = dict(
        name="torchquant._C",
        sources=sources(with_cuda),
        include_dirs=[os.path.join(ROOT, CSRC), os.path.join(ROOT, CSRC, "include")],
        define_macros=macros,
        depends=sorted(glob.glob(os.path.join(CSRC, "**", "*.h"), recursive=True)),
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        macros.append(("TORCHQUANT_WITH_CUDA", None))
        return CUDAExtension(extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "--fmad=false"]}, **kwargs)
    return CppExtension(extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    packages=find_packages(include=["torchquant", "torchquant.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildWithIsaKernels},
)
