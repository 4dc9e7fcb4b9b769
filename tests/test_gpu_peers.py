"""The GPU call's peers and plumbing, on the CPU: llm.c's and nanoGPT's printed lines parsed into points (fixtures
made from the format strings in their sources), llm.c's build found and planned on a fake CUDA tree, the CUDA 13
patch applied as `patch -p1` applies it, the carried folder fetched, the entry point's map and budget. The whole
call at toy sizes runs in tests/test_benchmarks.py (test_gpu_call_dry_run_end_to_end).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.gpu import __main__ as entry
from benchmarks.gpu.common import SIZES, read_records
from benchmarks.gpu.peers import carry, llmc, llmc_build, nanogpt

REPO = Path(__file__).resolve().parent.parent
SHARED_PEERS = REPO.parent / "shared" / "peers"
PEAK = (989e12, "datasheet (NVIDIA H100 80GB HBM3)")
FLOPS_124M = 855_166_464  # 6N + 12LHQT per token at T=1024, N on 50,257 (test_benchmarks checks it by hand)

# train_gpt2.cu's per-step printf, copied verbatim (C and Python's % agree on every conversion used here).
LLMC_STEP = "step %4d/%d | loss %7.6f (%+.2fz)| norm %6.4f (%+.2fz)| lr %.2e | %.2f ms | %.1f%% bf16 MFU | %.0f tok/s"
LLMC_TOTAL = "total average iteration time: %f ms"


def llmc_output(batch: int, step_ms: list[float]) -> str:
    lines = ["| device                | NVIDIA H100 80GB HBM3                              |", "val loss 11.012345"]
    for i, ms in enumerate(step_ms):
        z = float("nan") if i < 2 else 0.5
        tokens_per_s = batch * 1024 / (ms / 1e3)
        lines.append(LLMC_STEP % (i + 1, len(step_ms), 11.0 - i / 10, z, 1.23, z, 1e-4, ms, 38.1, tokens_per_s))
    lines += ["val loss 10.5", LLMC_TOTAL % (sum(step_ms[1:]) / (len(step_ms) - 1))]
    return "\n".join(lines) + "\n"


def test_llmc_step_lines_become_a_point_in_our_fields():
    step_ms = [900.0, 140.0, 75.0, 72.0, 71.0] + [70.0, 69.0, 71.0, 70.0, 68.0, 72.0]  # warm-up first
    point = llmc.point_from(llmc_output(32, step_ms), 32, 1024, PEAK)
    steady = step_ms[llmc.SKIP_STEPS :]
    assert point["step_ms"] == pytest.approx(70.0) == pytest.approx(sorted(steady)[len(steady) // 2])
    assert point["tokens_per_s"] == pytest.approx(32 * 1024 / 0.070)
    assert point["mfu"] == pytest.approx(point["tokens_per_s"] * FLOPS_124M / 989e12)  # our count, not llm.c's
    assert (point["peer"], point["job"], point["batch"], point["seq"]) == ("llm.c", "train", 32, 1024)
    assert point["steps"] == 11 and point["steady_steps"] == 6 and point["first_loss"] == 11.0
    assert point["mfu_printed"] == pytest.approx(0.381)  # llm.c's own MFU, its moving-average tok/s
    assert point["tokens_per_s_printed"] == pytest.approx(32 * 1024 / 0.072, abs=0.5)
    assert point["printed"][-1].startswith("total average iteration time:") and "bf16 MFU" in point["printed"][0]
    assert "error" in llmc.point_from("cudaCheck error: out of memory\n", 64, 1024, PEAK)


def test_llmc_runs_with_flags_its_source_accepts():
    argv = llmc.command("./train_gpt2cu", "t_*.bin", "v_*.bin", 64, 1024, 40)
    flags = dict(zip(argv[1::2], argv[2::2]))
    assert flags["-e"] == "d12" and flags["-b"] == "64" and flags["-t"] == "1024" and flags["-x"] == "40"
    assert int(flags["-v"]) > 40 and flags["-s"] == "0"  # -v 0 would divide by zero: step % val_loss_every
    assert flags["-i"] == "t_*.bin" and flags["-j"] == "v_*.bin" and "-o" not in flags
    source = SHARED_PEERS / "llm.c" / "train_gpt2.cu"
    if source.exists():  # every flag is one train_gpt2.cu parses
        text = source.read_text(encoding="utf-8")
        for flag in flags:
            assert f"argv[i][1] == '{flag[1]}'" in text, flag
        assert "step % val_loss_every == 0" in text and "sample_every > 0 &&" in text
        printed = re.search(r'printf0\("(step %4d/%d \|.*?)\\n"', text)
        assert printed and printed[1] == LLMC_STEP  # the fixture's format is the source's


def test_nanogpt_bench_output_becomes_a_point():
    # bench.py's own prints: f"{k}/{num_steps} loss: {lossf:.4f}" and the timed stage's summary line.
    lines = ["Overriding: batch_size = 32", "Compiling model..."]
    lines += [f"{k}/10 loss: {10.9 - k / 100:.4f}" for k in range(10)] + [f"{k}/20 loss: {10.8:.4f}" for k in range(20)]
    lines.append(f"time per iteration: {68.25:.4f}ms, MFU: {130.61:.2f}%")
    point = nanogpt.point_from("\n".join(lines) + "\n", 32, 1024, PEAK)
    assert point["step_ms"] == pytest.approx(68.25) and point["tokens_per_s"] == pytest.approx(32 * 1024 / 0.06825)
    assert point["mfu"] == pytest.approx(point["tokens_per_s"] * FLOPS_124M / 989e12)
    assert point["mfu_printed"] == pytest.approx(1.3061) and point["first_loss"] == pytest.approx(10.9)
    assert point["printed"] == ["19/20 loss: 10.8000", "time per iteration: 68.2500ms, MFU: 130.61%"]
    assert "error" in nanogpt.point_from("Traceback ...\nRuntimeError: CUDA out of memory\n", 64, 1024, PEAK)
    argv = nanogpt.command(64, 1024)
    assert argv[1:] == ["bench.py", "--batch_size=64", "--block_size=1024", "--dtype=bfloat16", "--compile=True",
                        "--real_data=False", "--bias=True"]  # fmt: skip
    bench = SHARED_PEERS / "nanoGPT" / "bench.py"
    if bench.exists():  # each key is one of bench.py's globals, so its configurator takes it
        text = bench.read_text(encoding="utf-8")
        for arg in argv[2:]:
            assert re.search(rf"^{arg[2:].split('=')[0]} = ", text, re.M), arg
        assert 'print(f"time per iteration: {dt/num_steps*1000:.4f}ms, MFU: {mfu*100:.2f}%")' in text


def fake_cuda(tmp_path: Path, nvml: bool) -> tuple[str, list[str]]:
    """A CUDA folder with nvcc's own headers only, and torch's pip `nvidia/*` packages with versioned libraries."""
    home = tmp_path / "cuda-13.0"
    (home / "include").mkdir(parents=True)
    (home / "lib64" / "stubs").mkdir(parents=True)
    if nvml:
        (home / "include" / "nvml.h").touch()
        (home / "lib64" / "stubs" / "libnvidia-ml.so").touch()
    files = {
        "cublas": ["cublas_v2.h", "cublasLt.h", "libcublas.so.13", "libcublasLt.so.13"],
        "cuda_nvrtc": ["nvrtc.h", "libnvrtc.so.13", "libnvrtc.so.13.0.88"],
        "cudnn": ["cudnn.h", "libcudnn.so.9"],
    }
    nvidia = []
    for package, names in files.items():
        folder = tmp_path / "site" / "nvidia" / package
        for name in names:
            where = folder / ("lib" if ".so" in name else "include")
            where.mkdir(parents=True, exist_ok=True)
            (where / name).touch()
        nvidia.append(str(folder))
    return str(home), nvidia


def test_llmc_build_finds_pip_cuda_libraries_and_links_them_unversioned(tmp_path, monkeypatch):
    monkeypatch.setattr(llmc_build, "SYSTEM_LIB_DIRS", ())
    home, nvidia = fake_cuda(tmp_path, nvml=False)
    work = tmp_path / "work"
    tc = llmc_build.find_toolchain(str(work), nvidia=nvidia, home=home, cap="9.0")
    assert tc.missing == [] and tc.arch == "90" and tc.nvcc == f"{home}/bin/nvcc"
    assert tc.libraries == ["cublas", "cublasLt", "nvrtc"]  # no nvml.h: llm.c's mfu.h leaves NVML out
    links = work / "llmc_lib"
    assert os.readlink(links / "libnvrtc.so").endswith("/cuda_nvrtc/lib/libnvrtc.so.13")  # the shortest name
    assert os.readlink(links / "libcublas.so").endswith("/cublas/lib/libcublas.so.13")
    cudnn = f"{tmp_path}/site/nvidia/cudnn"
    assert tc.run_dirs == [
        f"{cudnn}/lib",
        f"{tmp_path}/site/nvidia/cublas/lib",
        f"{tmp_path}/site/nvidia/cuda_nvrtc/lib",
    ]
    compile_att, compile_train, link = llmc_build.commands(tc, "/peers/cudnn-frontend")
    assert (
        compile_att[-3:] == ["llmc/cudnn_att.cpp", "-o", "build/cudnn_att.o"] and compile_train[-3] == "train_gpt2.cu"
    )
    assert "arch=compute_90,code=[compute_90,sm_90]" in compile_train and "-DENABLE_CUDNN" in compile_train
    assert f"-I{cudnn}/include" in compile_att and "-I/peers/cudnn-frontend/include" in compile_att
    assert f"-I{tmp_path}/site/nvidia/cublas/include" in compile_att and compile_att.count(f"-I{cudnn}/include") == 1
    assert link[-2:] == ["-o", "train_gpt2cu"] and f"-L{links}" in link and "-l:libcudnn.so.9" in link
    assert [a for a in link if a.startswith("-l") and a != "-l:libcudnn.so.9"] == ["-lcublas", "-lcublasLt", "-lnvrtc"]


def test_llmc_build_links_nvml_where_its_header_is_and_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(llmc_build, "SYSTEM_LIB_DIRS", ())
    home, nvidia = fake_cuda(tmp_path, nvml=True)
    tc = llmc_build.find_toolchain(str(tmp_path / "work"), nvidia=nvidia, home=home, cap="")
    assert tc.libraries[-1] == "nvidia-ml" and f"{home}/lib64/stubs" in tc.link_dirs
    assert not any("stubs" in d for d in tc.run_dirs)  # the driver's own libnvidia-ml runs, not the stub
    assert tc.arch == "90"  # nvidia-smi said nothing
    no_cudnn = llmc_build.find_toolchain(str(tmp_path / "w2"), nvidia=nvidia[:2], home=home, cap="8.0")
    assert no_cudnn.arch == "80" and no_cudnn.missing == ["cuDNN (no nvidia.cudnn package in this Python)",
                                                          "cudnn.h (cudnn's header)"]  # fmt: skip


def test_llmc_build_fails_with_a_record_that_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(llmc_build, "PEERS", str(tmp_path / "no-peers"))
    done = llmc_build.build(str(tmp_path), str(tmp_path / "work"))
    assert done["ok"] is False and "benchmarks.gpu.peers fetch" in done["error"]
    (record,) = read_records(str(tmp_path))
    assert record["kind"] == "peer_build" and record["peer"] == "llm.c" and len(record["commands"]) == 3


@pytest.mark.skipif(not SHARED_PEERS.exists(), reason="../shared/peers is not beside this checkout")
def test_cuda13_patch_applies_as_patch_p1_would(tmp_path):
    diff = (SHARED_PEERS / "llm.c-cuda13.patch").read_text(encoding="utf-8")
    for name in ("ours", "patch"):
        (tmp_path / name / "llmc").mkdir(parents=True)
        shutil.copy(SHARED_PEERS / "llm.c" / "llmc" / "cuda_utils.cuh", tmp_path / name / "llmc")
    changed = llmc_build.apply_patch(diff, str(tmp_path / "ours"))
    assert changed == [str(tmp_path / "ours" / "llmc" / "cuda_utils.cuh")]
    text = Path(changed[0]).read_text(encoding="utf-8")
    assert "cudaMallocManaged(out, bytes)" not in text and "cudaCheck_(err, file, line);\n        return 1;" in text
    if shutil.which("patch"):
        subprocess.run(["patch", "-p1", "-s", "-i", str(SHARED_PEERS / "llm.c-cuda13.patch")], cwd=tmp_path / "patch",
                       check=True)  # fmt: skip
        assert (tmp_path / "patch" / "llmc" / "cuda_utils.cuh").read_text(encoding="utf-8") == text
    with pytest.raises(ValueError, match="does not apply"):
        llmc_build.apply_patch(diff, str(tmp_path / "ours"))  # already applied: its old lines are gone


def test_fetch_copies_the_peers_writable(tmp_path):
    source = tmp_path / "peers"
    for name in ("llm.c/llmc", "cudnn-frontend/include", "nanoGPT"):
        (source / name).mkdir(parents=True)
    (source / "nanoGPT" / "bench.py").write_text("batch_size = 12\n", encoding="utf-8")
    (source / "llm.c-cuda13.patch").write_text("--- a/x\n", encoding="utf-8")
    os.chmod(source / "nanoGPT", 0o555)  # ../shared is read-only
    lines = []
    carry.fetch(str(source), str(tmp_path / "dest"), wheels=False, log=lines.append)
    assert sorted(os.listdir(tmp_path / "dest")) == sorted(carry.COPIED)
    assert os.stat(tmp_path / "dest" / "nanoGPT").st_mode & 0o200 and 'carry [".peers"]' in lines[-1]
    with pytest.raises(SystemExit, match=r"lacks llm\.c"):
        carry.fetch(str(tmp_path / "dest" / "nanoGPT"), str(tmp_path / "d2"), wheels=False)
    command = carry.download_command("/x/wheels")
    assert command[command.index("--python-version") + 1] == "3.12" and "--only-binary=:all:" in command
    assert any(re.fullmatch(r"fastapi==[\d.]+", arg) for arg in command) and command[-7:][0].startswith("fastapi==")


def test_entry_point_map_matches_its_docstring_and_orders_parts():
    table = entry.__doc__.split("The map.")[1]
    for part in entry.PARTS:
        row = re.search(rf"^    {part.name} .*?(\d+)$", table, re.M)
        assert row and int(row[1]) == part.expected_s, part.name  # the docstring's seconds are the code's
    assert [p.name for p in entry.PARTS][:6] == ["device", "shards", "check", "train", "llmc", "nanogpt"]
    through_serve = sum(p.expected_s for p in entry.PARTS[: [p.name for p in entry.PARTS].index("serve") + 1])
    assert through_serve <= entry.parse_args(["--out", "x"]).budget - entry.SUMMARY_S  # the issues' core fits
    assert entry.parse_args(["--out", "x", "--parts", "topk,train"]).parts == ["train", "topk"]  # the map's order
    with pytest.raises(SystemExit):
        entry.parse_args(["--out", "x", "--parts", "train,bogus"])
    assert SIZES.train_batches == (32, 64) and SIZES.decode_batches == (1, 64) and SIZES.lora == ("1558M", 1, 1024)


def test_a_part_that_no_longer_fits_the_budget_is_skipped_and_recorded(tmp_path):
    out = str(tmp_path / "out")
    call = entry.Call(entry.parse_args(["--out", out, "--work", str(tmp_path / "w"), "--budget", "60"]))
    call.part(entry.BY_NAME["lora"])  # needs 90 s; 60 - 15 kept for the summary are left
    (skipped,) = read_records(str(tmp_path / "out"))
    assert skipped["kind"] == "skipped" and skipped["part"] == "lora" and "budget" in skipped["reason"]
    assert "=== lora: SKIPPED" in (tmp_path / "out" / "gpu.log").read_text(encoding="utf-8")


def test_a_part_past_its_limit_is_stopped_with_everything_it_started(tmp_path):
    args = entry.parse_args(["--out", str(tmp_path), "--work", str(tmp_path / "w")])
    call = entry.Call(args)
    sleeper = "[sys.executable, '-c', 'import time; time.sleep(60)']"
    child = f"import subprocess, sys, time; p = subprocess.Popen({sleeper}); print('grandchild', p.pid, flush=True)"
    child += "; time.sleep(60)"
    start = time.monotonic()
    assert call.run_child([sys.executable, "-c", child], 5, dict(os.environ)) is None  # stopped
    assert time.monotonic() - start < 30
    pid = int(re.search(r"grandchild (\d+)", (tmp_path / "gpu.log").read_text(encoding="utf-8"))[1])
    time.sleep(0.5)
    status = Path(f"/proc/{pid}/status")
    assert not status.exists() or "State:\tZ" in status.read_text()  # gone (or a zombie nobody has reaped yet)
