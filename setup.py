"""Build hook: all metadata is in setup.cfg.

``BUILD_EXT=1 pip install --no-build-isolation .`` also compiles the CUDA kernels of
``cuda_ext/`` ahead of time into ``autopar._cuda_ext``: it needs a CUDA build of torch installed
(hence no build isolation) and nvcc; ``TORCH_CUDA_ARCH_LIST`` picks the GPU generations.
Without BUILD_EXT the package installs as pure Python, and ``autopar.runtime.kernels.cuda_ext``
compiles the kernels on first use from a source checkout.
"""

from __future__ import annotations

import glob
import os

from setuptools import setup

if os.environ.get("BUILD_EXT") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(glob.glob("cuda_ext/*.cu")) + ["cuda_ext/bindings.cpp"]
    flags = {"cxx": ["-O3"], "nvcc": ["-O3"]}
    setup(
        ext_modules=[CUDAExtension("autopar._cuda_ext", sources, extra_compile_args=flags)],
        cmdclass={"build_ext": BuildExtension},
    )
else:
    setup()
