"""How a run starts (fresh, or from which checkpoint) and with which options.

The start depends on `--restore_from` and on what the run directory holds:

    (not given) / fresh   new run; a directory holding checkpoints is refused unless `fresh --overwrite`
    latest                continue the newest complete checkpoint (its options, except flags given again); an
                          empty directory starts fresh, as gpt-2-simple does
    PATH                  continue another run's (or an older) checkpoint in this directory; `--overwrite` is
                          needed when this directory already holds checkpoints

Half-written checkpoints (a run killed while saving) are reported here and removed when the run opens its
checkpoints; a checkpoint that does not read back is skipped with a warning for the one before it (state.py).

The options then resolve flag by flag (config.py): the flags given, else the resumed run's options, else a new
run's defaults when no `--init` is given (the pretrained 124M found here, or the demo, which says so), else the
field defaults.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from gpt2_jax.console import note
from gpt2_jax.errors import UsageError
from gpt2_jax.hints import command_for
from gpt2_jax.training.checkpoints import complete_steps, half_written, resolve_checkpoint_path
from gpt2_jax.training.config import DEMO_ACCELERATOR, DEMO_CPU, TrainConfig, resolve
from gpt2_jax.training.mesh import on_cpu
from gpt2_jax.training.run_dir import RunDir

PRETRAINED_CANDIDATES = ("models/124M-jax", "models/124M", "models/gpt2")  # converted first: it loads fastest
MODEL_MARKERS = ("gpt2_jax.json", "model.ckpt.index", "model.safetensors", "checkpoint")


@dataclasses.dataclass(frozen=True)
class StartMode:
    kind: str  # 'fresh', 'resume' (this directory's newest checkpoint) or 'path' (another checkpoint)
    source: Path | None = None  # the checkpoints directory restored from (absolute); None when fresh
    step: int | None = None  # the step asked for; None: the newest that reads back

    @property
    def fresh(self) -> bool:
        return self.kind == "fresh"


def resolve_start(run: RunDir, explicit: dict[str, Any], bundled_dataset: str) -> tuple[TrainConfig, StartMode]:
    """(the run's options, how it starts) from the flags the user gave (`explicit`) and the run directory."""
    leftovers = half_written(run.checkpoints)
    if leftovers:
        names = ", ".join(p.name for p in leftovers)
        note(f"ignoring half-written checkpoint(s) {names} in {run.checkpoints} (a run stopped while saving them)")
    start = choose_start(run, explicit.get("restore_from"), bool(explicit.get("overwrite")))
    saved, defaults = None, None
    if not start.fresh:
        saved = RunDir(start.source.parent).read_training_options() or {}
    elif "init" not in explicit:
        defaults = new_run_defaults(bundled_dataset, explicit.get("steps"))
    cfg = resolve(explicit, saved=saved, defaults=defaults)
    if cfg.warmup_steps >= cfg.steps:
        note(f"--warmup_steps {cfg.warmup_steps} is not below --steps {cfg.steps}: the rate never peaks")
    return cfg, start


def choose_start(run: RunDir, restore_from: str | None, overwrite: bool) -> StartMode:
    """The start that `--restore_from` (and `--overwrite`) ask for, given the checkpoints `run` holds."""
    existing = complete_steps(run.checkpoints)
    if restore_from is None or restore_from == "fresh":
        if existing and not (restore_from == "fresh" and overwrite):
            what = "--overwrite was not given" if restore_from == "fresh" else "no --restore_from was given"
            raise _refuse_existing(run, existing, what)
        return StartMode("fresh")
    if restore_from == "latest":
        if not existing:
            note(f"{run.path} has no complete checkpoint yet, so this run starts fresh")
            return StartMode("fresh")
        return StartMode("resume", run.checkpoints.absolute())
    source, step = resolve_checkpoint_path(restore_from)
    if source == run.checkpoints.absolute() and (step is None or (existing and step == existing[-1])):
        return StartMode("resume", source)
    if existing and not overwrite:
        raise _refuse_existing(run, existing, f"--restore_from {restore_from} would continue elsewhere")
    return StartMode("path", source, step)


def _refuse_existing(run: RunDir, steps: list[int], what: str) -> UsageError:
    return UsageError(
        f"{run.path} already holds checkpoints (newest: step {steps[-1]}) and {what}; continue it with "
        "--restore_from latest, start over with --restore_from fresh --overwrite (deletes them), "
        "or train into another --run_name."
    )


def new_run_defaults(bundled_dataset: str, steps_flag: int | None) -> dict[str, Any]:
    """A new run without --init: fine-tune the pretrained 124M when one is here, else run the demo (and say so)."""
    pretrained = find_pretrained([Path.cwd(), Path(bundled_dataset).parent.parent])
    if pretrained:
        return {"init": pretrained}
    demo = dict(DEMO_CPU if on_cpu() else DEMO_ACCELERATOR)
    print(
        f"No pretrained GPT-2 found in models/124M (get it with `{command_for('download')} 124M`), so "
        f"this is the demo: a small GPT-2 ({demo['init']}, 6 layers x 384, its own "
        f"{demo['vocab_size']}-piece vocabulary) trained from scratch for "
        f"{demo['steps'] if steps_flag is None else steps_flag} steps, then samples. Pass --init to choose the model.",
        flush=True,
    )
    return demo


def find_pretrained(search_dirs: list[Path]) -> str | None:
    for base in search_dirs:
        for name in PRETRAINED_CANDIDATES:
            path = base / name
            if path.is_dir() and any((path / marker).exists() for marker in MODEL_MARKERS):
                return str(path) if base == Path.cwd() else str(path.absolute())
    return None
