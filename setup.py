"""Build: the package plus our attention kernels as pybind11 modules.

Kernels are built by `kernels/build.py` (no torch import here): the C++ CPU module always, the
CUDA module when a CUDA toolkit is found. See kernels/build.py for the switches.
"""

import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).parent / "kernels"))
try:
    from build import BuildKernels, kernel_extensions  # noqa: E402
except ImportError:  # kernels not present yet
    BuildKernels, kernel_extensions = None, lambda: []

setup(
    ext_modules=kernel_extensions(),
    cmdclass={"build_ext": BuildKernels} if BuildKernels else {},
)
