"""The one part of the build pyproject.toml cannot state for every setuptools it accepts: the
shared replica's C extension (sidecar/shm/_native.c; docs/SHARED_REPLICA.md says why it is C).
`pip install -e .` builds it in place."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "sidecar.shm._native",
            ["sidecar/shm/_native.c"],
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
