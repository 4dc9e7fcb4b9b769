"""What the GPU call carries besides the checkout: the peers' sources and the wheels of the server's dependencies
that the device image lacks, fetched here into `.peers/` (git ignores it) and named in the device tool's `carry`.

    python -m benchmarks.gpu.peers fetch     # copies ../shared/peers/{llm.c,cudnn-frontend,nanoGPT,llm.c-cuda13.patch}
                                             # and downloads the wheels into .peers/wheels (about 4 + 3 MB)

The device image (/work/.library/device/KINDS.md, its package list of 2026-11-17) has JAX, torch, transformers,
httpx and tiktoken, but not FastAPI, Starlette, pydantic or uvicorn, which `gpt2-jax serve` needs. They travel as
wheels of the versions installed here (the versions the tests ran), for the device's Python 3.12 on x86-64, and the
call installs them into --work/site there (`install_wheels`) before any part runs.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable

from benchmarks.gpu.common import record

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
PEERS = os.path.join(ROOT, ".peers")
SOURCE = os.path.join(os.path.dirname(ROOT), "shared", "peers")  # ../shared/peers beside the checkout
COPIED = ("llm.c", "cudnn-frontend", "nanoGPT", "llm.c-cuda13.patch")
# distribution -> the module it installs: the server's dependencies that the device image lacks
SERVER_PACKAGES = {
    "fastapi": "fastapi", "starlette": "starlette", "pydantic": "pydantic", "pydantic-core": "pydantic_core",
    "annotated-types": "annotated_types", "typing-inspection": "typing_inspection", "uvicorn": "uvicorn",
}  # fmt: skip
DEVICE_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def fetch(source: str = SOURCE, dest: str = PEERS, wheels: bool = True, log: Callable[[str], None] = print) -> None:
    """A fresh copy of the peers' sources in `dest` (and the server's wheels in dest/wheels)."""
    missing = [name for name in COPIED if not os.path.exists(os.path.join(source, name))]
    if missing:
        raise SystemExit(f"{source} lacks {', '.join(missing)}: pass --source, the folder peers/README.md is in")
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    for name in COPIED:
        src, dst = os.path.join(source, name), os.path.join(dest, name)
        shutil.copytree(src, dst) if os.path.isdir(src) else shutil.copy2(src, dst)
    writable(dest)
    log(f"copied {', '.join(COPIED)} from {source} into {dest} ({folder_bytes(dest) / 2**20:.1f} MiB)")
    if wheels:
        command = download_command(os.path.join(dest, "wheels"))
        log(" ".join(command))
        subprocess.run(command, check=True)
        log(f"{len(glob.glob(os.path.join(dest, 'wheels', '*.whl')))} wheels in {os.path.join(dest, 'wheels')}")
    log(f'now run the device call with carry [".peers"] ({folder_bytes(dest) / 2**20:.1f} MiB)')


def download_command(folder: str) -> list[str]:
    """pip download of the server's missing dependencies, pinned to the versions installed here, as wheels for the
    device's CPython on x86-64 (/work/.library/device/README.md says how)."""
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in SERVER_PACKAGES]
    platforms = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
        DEVICE_PYTHON, "--implementation", "cp", *platforms, "-d", folder, *pins,
    ]  # fmt: skip


def install_wheels(env: dict[str, str], out: str, work: str, say: Callable[[str], None]) -> dict[str, str]:
    """On the device: the carried wheels into work/site where the server's packages are missing; the environment
    the parts get (PYTHONPATH with work/site after the checkout)."""
    wheels = sorted(glob.glob(os.path.join(PEERS, "wheels", "*.whl")))
    missing = [module for module in SERVER_PACKAGES.values() if importlib.util.find_spec(module) is None]
    if not missing:
        return env
    if not wheels:
        say(f"the server needs {', '.join(missing)}, and .peers/wheels holds no wheels: the serve part will fail")
        record(out, "wheels", part="serve", ok=False, missing=missing, error="no wheels carried")
        return env
    target = os.path.join(work, "site")
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    command += ["--no-cache-dir", "--upgrade", "--target", target, *wheels]
    done = subprocess.run(command, capture_output=True, text=True)
    say(f"installed {len(wheels)} wheels into {target}" if done.returncode == 0 else done.stderr[-2000:])
    record(out, "wheels", part="serve", ok=done.returncode == 0, missing=missing, target=target,
           wheels=[os.path.basename(w) for w in wheels])  # fmt: skip
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(env, PYTHONPATH=os.pathsep.join([*paths[:1], target, *paths[1:]]))


def writable(folder: str) -> None:
    """The owner may write everything under `folder` (a copy of a read-only tree is read-only too)."""
    for d, _, files in os.walk(folder):
        for path in [d, *(os.path.join(d, f) for f in files)]:
            os.chmod(path, os.stat(path).st_mode | 0o200)


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)
