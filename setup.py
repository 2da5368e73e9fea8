"""Builds fastprompt._C, the C++ CPU kernels, against the torch that is installed.

Install without build isolation so the extension links the venv's torch:
    pip install --no-build-isolation -e .
"""
import glob
import os
import platform

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
if not sources:
    raise SystemExit("setup.py: no C++ sources under csrc/ (run it from the project root)")
# Fast math that keeps IEEE semantics for NaN/inf (the kernels test finiteness explicitly).
cflags = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-trapping-math", "-fno-math-errno"]
if platform.machine() in ("x86_64", "AMD64"):
    # AVX2/FMA: every x86 server of the last decade; the exp/log loops vectorise 8-wide.
    cflags += ["-mavx2", "-mfma"]
setup(
    ext_modules=[
        CppExtension(
            "fastprompt._C",
            sources,
            extra_compile_args=cflags,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
