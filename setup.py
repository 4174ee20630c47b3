"""The one part of the build pyproject.toml cannot state for every setuptools it accepts: the
shared replica's C extension (sidecar/shm/_native.c; docs/SHARED_REPLICA.md says why it is C).
`pip install -e .` builds it in place, with its source's hash (`SOURCE_HASH`, which the loader
compares with the source it runs beside: sidecar/shm/build.py)."""

import importlib.util
from pathlib import Path

from setuptools import Extension, setup

# sidecar/shm/build.py by path: importing the `sidecar` package here would need its dependencies
_spec = importlib.util.spec_from_file_location(
    "_native_build", Path(__file__).resolve().parent / "sidecar" / "shm" / "build.py"
)
assert _spec is not None and _spec.loader is not None
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)

setup(
    ext_modules=[
        Extension(
            "sidecar.shm._native",
            ["sidecar/shm/_native.c"],
            define_macros=[("NATIVE_SOURCE_HASH", f'"{_build.source_hash()}"')],
            extra_compile_args=[
                "-O2",
                "-std=gnu11",
                "-Wall",
                "-Wextra",
                "-Wno-unused-parameter",
                "-Wno-missing-field-initializers",
                "-Wno-cast-function-type",
            ],
        )  # fmt: skip
    ]
)
