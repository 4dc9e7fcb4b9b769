"""`gpt2-jax COMMAND` (gpt2_jax/commands.py) is each script or module, unchanged: the same --help, the same exit
codes; the root train.py is a shim over gpt2_jax/train.py."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2_jax import commands, hints
from gpt2_jax.cli import run_cli

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {  # the command and how it is run without gpt2-jax
    "train": [str(ROOT / "train.py")],
    "sample": [str(ROOT / "sample.py")],
    "convert": ["-m", "gpt2_jax.convert"],
    "download": ["-m", "gpt2_jax.download"],
    "evaluate": ["-m", "gpt2_jax.evaluate"],
    "prepare": ["-m", "gpt2_jax.prepare"],
    "serve": ["-m", "gpt2_jax.serve"],
    "bench": ["-m", "benchmarks"],
}


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(commands.main, argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_help_lists_every_command(capsys):
    code, out, _ = cli(["--help"], capsys)
    assert code == 0 and out.startswith("usage: gpt2-jax COMMAND")
    listed = [line.split()[0] for line in out.split("commands:\n", 1)[1].splitlines() if line.startswith("  ")]
    assert listed == list(SCRIPTS)
    code, bare, _ = cli([], capsys)
    assert code == 2 and bare == out  # no command: the same text, as a usage error


def test_an_unknown_command_is_one_sentence_with_exit_code_2(capsys):
    code, out, err = cli(["trian", "--steps", "5"], capsys)
    assert (code, out) == (2, "")
    choices = ", ".join(SCRIPTS)
    assert err == f"error: gpt2-jax has no command 'trian'; choose one of {choices} (gpt2-jax --help).\n"


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_command_is_its_script(name):
    env = dict(os.environ, COLUMNS="100")  # argparse wraps --help to the terminal's width

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)

    script, command = run(*SCRIPTS[name], "--help"), run("-m", "gpt2_jax", name, "--help")
    assert script.returncode == command.returncode == 0, command.stderr
    # The same flags and texts; the usage line (and any command a text names) is what the user typed, so it runs
    # as printed: `python -m gpt2_jax train` here (an installed `gpt2-jax train` names itself: test_hints_...).
    same = lambda text: text.split("\n\n", 1)[1].replace(" -m gpt2_jax download", " -m gpt2_jax.download")
    assert same(command.stdout) == same(script.stdout) and "--debug" in command.stdout
    prog = script.stdout.removeprefix("usage: ").split(" [-h]")[0]
    typed = command.stdout.removeprefix("usage: ").split(" [-h]")[0]
    assert typed.endswith(f" -m gpt2_jax {name}") and typed.split()[0] == prog.split()[0]  # the same interpreter
    # A bad flag: the same sentence and exit code either way, pointing at the --help of what was typed.
    script, command = run(*SCRIPTS[name], "--no_such_flag"), run("-m", "gpt2_jax", name, "--no_such_flag")
    assert command.returncode == script.returncode == 2
    assert command.stderr.startswith("error: ")
    assert command.stderr == script.stderr.replace(f"see {prog} --help", f"see {typed} --help")


def test_every_command_module_has_a_main():
    for name, (module, _) in commands.COMMANDS.items():
        assert callable(commands.command_main(name)), module
        assert callable(importlib.import_module(module).main)


def test_the_root_scripts_are_shims():
    import train
    from gpt2_jax.train import main

    assert train.main is main
    assert len((ROOT / "train.py").read_text(encoding="utf-8").splitlines()) < 20


def test_hints_name_commands_the_way_the_user_ran_this_one(monkeypatch):
    """The end of a training run says how to sample: as `gpt2-jax sample`, `python -m gpt2_jax.sample` or the
    checkout's `python sample.py`, whichever way the user started it."""
    monkeypatch.setattr(hints, "invoked_as", None)
    monkeypatch.setattr(hints, "python", lambda: "python")
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "train.py")])
    assert hints.command_for("sample") == "python sample.py"
    assert hints.command_for("download") == "python -m gpt2_jax.download"
    monkeypatch.chdir(ROOT / "tests")
    assert hints.command_for("sample") == f"python {ROOT / 'sample.py'}"  # from another folder: its path
    monkeypatch.setattr(sys, "argv", [str(Path(commands.__file__).with_name("train.py"))])
    assert hints.command_for("sample") == "python -m gpt2_jax.sample"
    monkeypatch.setattr(hints, "invoked_as", "gpt2-jax train")
    assert hints.command_for("sample") == "gpt2-jax sample"
