"""The host a benchmark ran on, without importing JAX (the data benchmark forks workers, which JAX's threads forbid):
the CPU's model name and the version of an installed package."""

from __future__ import annotations

import importlib.metadata
import platform


def package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return names[0] if names else platform.processor()
    except OSError:
        return platform.processor()
