"""setup.py of the wheel that carries the engine (copied next to
python_shim/pyproject.toml into the staging directory by
scripts/build_wheel.py; all metadata is in that pyproject.toml).

Its one job: the wheel holds native code (the engine's addon, zeromq's
binary) but no Python extension, so it is tagged py3-none-<platform>: any
Python 3, no Python ABI, the manylinux platform that build_wheel.py found
from the binaries' glibc and libstdc++ symbol versions (UCM_WHEEL_PLATFORM).
"""

import os

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.dist import Distribution


class EngineDistribution(Distribution):
    def has_ext_modules(self) -> bool:
        return True  # native code inside: the package goes to platlib, the wheel is not pure


class EngineWheel(bdist_wheel):
    def get_tag(self) -> tuple[str, str, str]:
        platform = os.environ.get("UCM_WHEEL_PLATFORM")
        if not platform:
            raise SystemExit(
                "UCM_WHEEL_PLATFORM is not set: build this wheel with scripts/build_wheel.py (npm run wheel)"
            )
        return "py3", "none", platform


setup(distclass=EngineDistribution, cmdclass={"bdist_wheel": EngineWheel})
