"""llm.c built on the device as ../shared/peers/README.md says: its carried copy (.peers/llm.c) copied into
--work, the CUDA 13 patch applied, then two nvcc compiles in parallel and a link, cuDNN attention on.

    python -m benchmarks.gpu.peers build --out DIR [--work DIR] [--dry]   # --dry: print the commands only

What nvcc needs is looked up, never assumed: CUDA's folder from `nvcc --dryrun` (its _HERE_), the compute capability
from nvidia-smi (90 if it says nothing), cuDNN as the pip package torch brought (`import nvidia.cudnn`), and each
header (cublas_v2.h, cublasLt.h, nvrtc.h, cudnn.h; nvml.h only if present: llm.c then also links NVML) and library
(cuBLAS, cuBLASLt, NVRTC, NVML) in CUDA's folder, then in the pip `nvidia/*` packages, then the system's. A pip
package ships only versioned libraries (libcublas.so.13), which `-lcublas` cannot find: those get an unversioned
link in work/llmc_lib. Whatever is missing ends the build with a record that names it.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import subprocess
import time

from benchmarks.gpu.common import nvidia_smi, record
from benchmarks.gpu.peers.carry import PEERS, writable

FLAGS = ["--threads=0", "-t=0", "--use_fast_math", "-std=c++17", "-O3", "-DENABLE_CUDNN", "-DENABLE_BF16"]
HEADERS = {"cublas_v2.h": "cublas", "cublasLt.h": "cublasLt", "nvrtc.h": "nvrtc", "cudnn.h": "cudnn"}
LIBRARIES = ("cublas", "cublasLt", "nvrtc")  # and nvidia-ml where nvml.h is found (llm.c's mfu.h then uses it)
SYSTEM_LIB_DIRS = ("/usr/local/nvidia/lib64", "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/local/cuda/lib64")


@dataclasses.dataclass
class Toolchain:
    nvcc: str = "nvcc"
    cuda_home: str = ""
    cudnn: str = "$CUDNN"  # the pip cuDNN folder (include/, lib/)
    cudnn_lib: str = "libcudnn.so.9"
    arch: str = "90"
    includes: list[str] = dataclasses.field(default_factory=list)
    link_dirs: list[str] = dataclasses.field(default_factory=list)
    libraries: list[str] = dataclasses.field(default_factory=lambda: list(LIBRARIES))
    run_dirs: list[str] = dataclasses.field(default_factory=list)  # LD_LIBRARY_PATH when llm.c runs
    missing: list[str] = dataclasses.field(default_factory=list)


def pip_nvidia_dirs() -> list[str]:
    """The `nvidia/*` package folders of this Python (torch's CUDA libraries come as such wheels)."""
    try:
        import nvidia
    except ImportError:
        return []
    return sorted(d for root in nvidia.__path__ for d in glob.glob(os.path.join(root, "*")) if os.path.isdir(d))


def cuda_home(nvcc: str) -> str:
    """CUDA's folder as nvcc itself reports it (`_HERE_` is its bin/; /usr/local/bin/nvcc may be a wrapper)."""
    try:
        text = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                              capture_output=True, text=True, timeout=60).stderr  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return ""
    here = re.search(r"^#\$ _HERE_=(.+)$", text, re.M)
    return os.path.dirname(here.group(1).strip()) if here else ""


def find_toolchain(work: str, nvidia: list[str] | None = None, home: str | None = None, cap: str | None = None
                   ) -> Toolchain:  # fmt: skip
    """Everything the build needs, found on this machine (see the module doc); `missing` names what was not.
    nvidia, home, cap: the pip `nvidia/*` folders, CUDA's folder and the compute capability, where already known."""
    tc = Toolchain()
    if home is None:
        nvcc = shutil.which("nvcc") or next(iter(glob.glob("/usr/local/cuda*/bin/nvcc")), "")
        tc.nvcc, home = (nvcc, cuda_home(nvcc)) if nvcc else ("nvcc", "")
        if not nvcc:
            tc.missing.append("nvcc (not on PATH, nor in /usr/local/cuda*/bin)")
    else:
        tc.nvcc = os.path.join(home, "bin", "nvcc")
    tc.cuda_home = home
    nvidia = pip_nvidia_dirs() if nvidia is None else nvidia
    cap = nvidia_smi().get("compute_cap", "") if cap is None else cap
    tc.arch = cap.replace(".", "") if re.fullmatch(r"\d+\.\d+", cap) else "90"
    cuda = [os.path.join(home, sub) for sub in ("include", "targets/x86_64-linux/include")] if home else []
    cudnn = [d for d in nvidia if os.path.basename(d) == "cudnn"]
    if cudnn:
        tc.cudnn = cudnn[0]
        found = sorted(glob.glob(os.path.join(tc.cudnn, "lib", "libcudnn.so.*")), key=len)
        tc.cudnn_lib = os.path.basename(found[0]) if found else tc.cudnn_lib
        tc.run_dirs.append(os.path.join(tc.cudnn, "lib"))
    else:
        tc.missing.append("cuDNN (no nvidia.cudnn package in this Python)")
    for header, what in HEADERS.items():
        where = find_file(header, cuda + [os.path.join(d, "include") for d in nvidia])
        if where is None:
            tc.missing.append(f"{header} ({what}'s header)")
        elif where not in cuda and where not in tc.includes:
            tc.includes.append(where)
    if find_file("nvml.h", cuda + [os.path.join(d, "include") for d in nvidia] + tc.includes):
        tc.libraries.append("nvidia-ml")
    lib_dirs = library_dirs(tc.cuda_home, nvidia)
    for name in tc.libraries:
        link_library(name, lib_dirs, os.path.join(work, "llmc_lib"), tc)
    return tc


def find_file(name: str, folders: list[str]) -> str | None:
    return next((d for d in folders if os.path.isfile(os.path.join(d, name))), None)


def library_dirs(home: str, nvidia: list[str]) -> list[str]:
    """Where libraries may lie, stubs last (a stub links, the driver's library runs)."""
    cuda = [os.path.join(home, sub) for sub in ("lib64", "targets/x86_64-linux/lib", "lib")] if home else []
    stubs = [os.path.join(d, "stubs") for d in cuda]
    found = [*cuda, *(os.path.join(d, "lib") for d in nvidia), *SYSTEM_LIB_DIRS, *stubs]
    return [d for d in dict.fromkeys(found) if os.path.isdir(d)]


def link_library(name: str, folders: list[str], link_dir: str, tc: Toolchain) -> None:
    """-l{name} made to resolve: the folder of lib{name}.so, or an unversioned link to lib{name}.so.N."""
    for folder in folders:
        plain = os.path.join(folder, f"lib{name}.so")
        versioned = sorted(glob.glob(plain + ".*"), key=len)
        if not (os.path.exists(plain) or versioned):
            continue
        if os.path.exists(plain):
            tc.link_dirs.append(folder)
        else:
            os.makedirs(link_dir, exist_ok=True)
            link = os.path.join(link_dir, f"lib{name}.so")
            if os.path.lexists(link):
                os.remove(link)
            os.symlink(versioned[0], link)
            tc.link_dirs.append(link_dir)
        if os.path.basename(folder) != "stubs":
            tc.run_dirs.append(folder)
        tc.link_dirs[:] = list(dict.fromkeys(tc.link_dirs))
        tc.run_dirs[:] = list(dict.fromkeys(tc.run_dirs))
        return
    tc.missing.append(f"lib{name}.so (searched {', '.join(folders) or 'nothing'})")


def commands(tc: Toolchain, frontend: str) -> list[list[str]]:
    """The two compiles (run in parallel) and the link, in llm.c's folder: ../shared/peers/README.md's steps."""
    arch = f"arch=compute_{tc.arch},code=[compute_{tc.arch},sm_{tc.arch}]"
    flags = [*FLAGS, "--generate-code", arch, f"-I{tc.cudnn}/include", f"-I{frontend}/include"]
    flags += [f"-I{d}" for d in tc.includes if d != f"{tc.cudnn}/include"]
    libs = [f"-L{tc.cudnn}/lib", f"-l:{tc.cudnn_lib}", *(f"-L{d}" for d in tc.link_dirs)]
    libs += [f"-l{name}" for name in tc.libraries]
    return [
        [tc.nvcc, "-c", *flags, "llmc/cudnn_att.cpp", "-o", "build/cudnn_att.o"],
        [tc.nvcc, "-c", *flags, "train_gpt2.cu", "-o", "build/train_gpt2.o"],
        [tc.nvcc, "build/train_gpt2.o", "build/cudnn_att.o", *libs, "-o", "train_gpt2cu"],
    ]


def apply_patch(diff: str, root: str) -> list[str]:
    """A unified diff applied as `patch -p1` would, each hunk's old lines checked where it says they are (or,
    once shifted, the only place they are); the files changed. No `patch` program needed on the device."""
    changed = []
    for block in re.split(r"^--- .*\n(?=\+\+\+ )", diff, flags=re.M)[1:]:
        header, *hunks = re.split(r"^@@ -(\d+)(?:,\d+)? \+\d+(?:,\d+)? @@.*\n", block, flags=re.M)
        path = os.path.join(root, header.split()[1].split("/", 1)[1])
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines(keepends=True)
        shift = 0
        for start, body in zip(hunks[::2], hunks[1::2]):
            body = [line for line in body.splitlines(keepends=True) if not line.startswith("\\")]
            old = [line[1:] for line in body if line[:1] in (" ", "-")]
            new = [line[1:] for line in body if line[:1] in (" ", "+")]
            at = int(start) - 1 + shift
            if lines[at : at + len(old)] != old:
                places = [i for i in range(len(lines)) if lines[i : i + len(old)] == old]
                if len(places) != 1:
                    raise ValueError(f"the patch does not apply to {path} at line {start}")
                at = places[0]
            lines[at : at + len(old)] = new
            shift += len(new) - len(old)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(lines)
        changed.append(path)
    return changed


def build(out: str, work: str, dry: bool = False) -> dict:
    """llm.c's train_gpt2cu in work/llm.c (see the module doc); a 'peer_build' record either way."""
    src, dest = os.path.join(PEERS, "llm.c"), os.path.join(work, "llm.c")
    binary = os.path.join(dest, "train_gpt2cu")
    tc = Toolchain() if dry else find_toolchain(work)
    steps = commands(tc, os.path.join(PEERS, "cudnn-frontend"))
    shown = [" ".join(c) for c in steps]
    base = dict(peer="llm.c", binary=binary, commands=shown, folder=dest, run_dirs=tc.run_dirs, arch=tc.arch)
    if dry:
        print("llm.c build, in", dest, "after the CUDA 13 patch:\n  " + "\n  ".join(shown), flush=True)
        return record(out, "peer_build", **base, ok=None, dry=True, carried=os.path.isdir(src))
    if not os.path.isdir(src):
        return record(out, "peer_build", **base, ok=False, error=f"{src} is missing: run `python -m "
                      "benchmarks.gpu.peers fetch` before the call and carry .peers")  # fmt: skip
    if tc.missing:
        return record(out, "peer_build", **base, ok=False, error="not found: " + "; ".join(tc.missing))
    if os.path.exists(binary) and os.path.getmtime(binary) > os.path.getmtime(os.path.join(src, "train_gpt2.cu")):
        return record(out, "peer_build", **base, ok=True, reused=True, seconds=0.0)  # an earlier call's build
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)
    writable(dest)
    with open(os.path.join(PEERS, "llm.c-cuda13.patch"), encoding="utf-8") as f:
        patched = apply_patch(f.read(), dest)
    os.makedirs(os.path.join(dest, "build"), exist_ok=True)
    version = subprocess.run([tc.nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    start = time.time()
    compiles = [subprocess.Popen(c, cwd=dest, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for c in steps[:2]]  # fmt: skip
    outputs = [p.communicate()[0] for p in compiles]
    codes = [p.returncode for p in compiles]
    if not any(codes):
        link = subprocess.run(steps[2], cwd=dest, capture_output=True, text=True)
        codes.append(link.returncode)
        outputs.append(link.stdout + link.stderr)
    for command, output in zip(shown, outputs):
        print(f"$ {command}\n{output}", end="", flush=True)
    ok = not any(codes) and os.path.exists(binary)
    error = None if ok else "\n".join(o[-1500:] for o, c in zip(outputs, codes) if c)[-3000:]
    return record(out, "peer_build", **base, ok=ok, seconds=time.time() - start, exit_codes=codes,
                  nvcc=version[-1:], cudnn=tc.cudnn, patched=patched, error=error)  # fmt: skip
