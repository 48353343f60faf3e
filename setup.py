"""Builds kdfast._C: the CPU kernels always, the CUDA kernels when torch is a CUDA build and
nvcc exists. KDFAST_CUDA=0 / KDFAST_CUDA=1 forces the CUDA kernels off / on.

Build with `pip install -e . --no-build-isolation` against the torch already installed (an
isolated build would download a second, multi-GB torch).
"""

import glob
import os
import shutil

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
CUDA_ARCHS = os.environ.get("KDFAST_CUDA_ARCHS", "80;90")


def _want_cuda() -> bool:
    # Decided from the torch build and the toolkit, never from torch.cuda.is_available():
    # build machines often have no GPU.
    import torch

    nvcc = cpp_extension.CUDA_HOME is not None and (
        shutil.which("nvcc") is not None
        or os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    )
    possible = torch.version.cuda is not None and nvcc
    forced = os.environ.get("KDFAST_CUDA")
    if forced == "1" and not possible:
        raise RuntimeError(
            f"KDFAST_CUDA=1 but the CUDA kernels cannot be built: torch.version.cuda="
            f"{torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME} (need a CUDA build of "
            "torch and nvcc)"
        )
    return possible if forced is None else forced == "1"


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _extension():
    with_cuda = _want_cuda()
    # No -ffast-math: -inf and NaN must keep IEEE meaning. -fno-trapping-math only lets GCC
    # if-convert the selects in kd_math.h so the row loops vectorize.
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fvisibility=hidden"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/**/*.cpp")
    macros = []
    extra = {"cxx": cxx}
    cls = cpp_extension.CppExtension
    if with_cuda:
        cls = cpp_extension.CUDAExtension
        sources += _sources("csrc/cuda/*.cu")
        archs = [a.strip() for a in CUDA_ARCHS.split(";") if a.strip()]
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        extra["nvcc"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", *gencode]
        macros.append(("KDFAST_WITH_CUDA", None))
        macros.append(("KDFAST_CUDA_ARCHS", '"' + ",".join(f"sm_{a}" for a in archs) + '+PTX"'))
    return cls(
        name="kdfast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        define_macros=macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp", "-lmvec"],
    )


setup(
    packages=find_packages(include=["kdfast", "kdfast.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
