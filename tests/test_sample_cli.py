"""`python sample.py` as users run it, in subprocesses: output formats, streaming, interactive mode, bad input.

The commands start together (a module fixture) so their start-up and compile times overlap. One of them runs as
`python -m gpt2_jax.sample`, the command the root script hands over to.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2_jax import sample
from gpt2_jax.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--model", "scratch:tiny", "--seed", "7", "--length", "9"]
HEADER = "=" * 40 + " SAMPLE {} " + "=" * 40
BAD_FLAGS = {
    "top_p_zero": ["--top_p", "0"],
    "top_p_above_one": ["--top_p", "1.5"],
    "top_k_negative": ["--top_k", "-1"],
    "temperature_negative": ["--temperature", "-0.5"],
    "length_zero": ["--length", "0"],
    "nsamples_zero": ["--nsamples", "0"],
    "not_a_number": ["--top_k", "many"],
    "unknown_flag": ["--prompt_text", "hi"],
    "two_prompt_sources": ["--prompt", "hi", "--interactive"],
    "stream_with_jsonl": ["--stream", "--format", "jsonl"],
}
IN_SUBPROCESS = ("top_p_above_one", "not_a_number")  # the rest run in-process: same code, no start-up cost


def start(args: list[str], command: tuple[str, ...] = (str(ROOT / "sample.py"),)) -> subprocess.Popen:
    env = dict(os.environ, PYTHONIOENCODING="ascii")  # sample.py must still write UTF-8
    return subprocess.Popen(
        [sys.executable, *command, *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(proc: subprocess.Popen, stdin: bytes = b"") -> tuple[int, str, str]:
    out, err = proc.communicate(stdin, timeout=900)
    return proc.returncode, out.decode("utf-8"), err.decode("utf-8")


def run_in_process(args: list[str], capsys) -> tuple[int, str, str]:
    """The command's `main` under run_cli, as `python sample.py ARGS` runs it, with its exit code and output."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(sample.main, args)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The subprocess runs, started together so that their start-up and compile times overlap."""
    garbage = tmp_path_factory.mktemp("prompt") / "garbage.bin"
    garbage.write_bytes(bytes(range(256)) * 3)  # invalid UTF-8, control bytes, NULs; far over tiny's 128 tokens
    procs = {
        "interactive": start([*TINY, "--interactive", "--nsamples", "2"]),
        "garbage": start(
            [*TINY, "--prompt_file", str(garbage), "--length", "20", "--top_k", "0", "--top_p", "0.9"],
            command=("-m", "gpt2_jax.sample"),
        ),
        **{name: start(BAD_FLAGS[name]) for name in IN_SUBPROCESS},
    }
    ctrl_c = start([*TINY, "--interactive"])  # left waiting at its prompt for its test
    stdin = {"interactive": "Hello\n\n  \nWörld ✓\n".encode()}
    return {name: finish(proc, stdin.get(name, b"")) for name, proc in procs.items()} | {"ctrl_c": ctrl_c}


def test_jsonl_text_and_stream_outputs(capsys):
    flags = [*TINY, "--nsamples", "3", "--batch_size", "2"]
    code, out, err = run_in_process([*flags, "--format", "jsonl"], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["sample"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["prompt"] == "" and r["seed"] == 7
        assert r["stop_reason"] in ("length", "endoftext")
        assert len(r["tokens"]) <= 9 and all(isinstance(t, int) for t in r["tokens"])
    assert len({tuple(r["tokens"]) for r in records}) == 3
    # OpenAI's layout; unconditional, so no closing line of '=' (OpenAI's unconditional script has none)
    expected = "".join(f"{HEADER.format(r['sample'])}\n{r['text']}\n" for r in records)
    assert run_in_process(flags, capsys)[1] == expected
    assert run_in_process([*flags, "--stream"], capsys)[1] == expected


def test_interactive_loop_reasks_on_empty_prompt_and_leaves_on_eof(runs):
    code, out, err = runs["interactive"]
    assert code == 0, err
    assert out.count("Model prompt >>> ") == 5  # Hello, '' (asked again), '  ', Wörld ✓, and the EOF
    assert out.count("Prompt should not be empty!") == 1
    assert out.count(HEADER.format(1)) == 3 and out.count(HEADER.format(2)) == 3  # "  " is a prompt, as in OpenAI's
    assert out.count("=" * 80 + "\n") == 3
    assert "Traceback" not in err


def test_binary_garbage_prompt_longer_than_the_context_is_repaired_and_windowed(runs):
    code, out, err = runs["garbage"]
    assert code == 0, err
    assert "invalid UTF-8" in err and "longer than the model's context" in err
    assert out.startswith(HEADER.format(1)) and out.endswith("=" * 80 + "\n")


@pytest.mark.parametrize("name", sorted(BAD_FLAGS))
def test_bad_flags_exit_2_with_one_sentence(runs, capsys, name):
    code, out, err = runs[name] if name in IN_SUBPROCESS else run_in_process(BAD_FLAGS[name], capsys)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err


def test_ctrl_c_at_the_prompt_leaves_cleanly(runs):
    proc = runs["ctrl_c"]
    seen = b""  # however long loading takes on a busy machine: SIGINT must arrive at the prompt, not before it
    while not seen.endswith(b">>> "):
        more = proc.stdout.read1(64)
        assert more, f"sample.py ended before its prompt: {seen[-500:]!r}"
        seen += more
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc)
    assert code == 0 and "Traceback" not in err
