"""Build script: compiles the Cython kernel modules runtime/_*.pyx with -O3 and OpenMP.

Metadata lives in pyproject.toml; this file only declares the Cython extensions. Every
``runtime/_*.pyx`` is one extension module (``runtime/_kernels.pyx`` holds the core kernels; a runtime
feature with kernels of its own -- sparse GNN ops, int8 inference, host embedding optimizers -- keeps
them in ``runtime/_kernels_<feature>.pyx``). ``INSIGHT_BUILD_ONLY=runtime._kernels_sparse`` (comma
separated) limits an in-place build to those modules while developing.
"""
import glob
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    only = {m.strip() for m in os.environ.get("INSIGHT_BUILD_ONLY", "").split(",") if m.strip()}
    exts = []
    pyx = glob.glob(os.path.join(HERE, "runtime", "_*.pyx"))
    pyx += glob.glob(os.path.join(HERE, "insight", "importer", "_*.pyx"))  # the trace importer's JSON scanner
    for path in sorted(pyx):
        rel = os.path.relpath(path, HERE)
        name = rel[:-len(".pyx")].replace(os.sep, ".")
        if only and name not in only:
            continue
        exts.append(Extension(
            name,
            [rel],
            include_dirs=[numpy.get_include()],
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        ))
    return exts


setup(
    ext_modules=cythonize(
        _extensions(),
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )
)
