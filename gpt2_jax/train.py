"""The train command: `python train.py` or `gpt2-jax train` (also `python -m gpt2_jax.train`); `--help` lists every
flag.

The flags are checked before JAX is imported, then JAX's persistent compilation cache is turned on
(compile_cache.py; `--no_compile_cache` leaves it off) and, with `--distributed`, the processes join, before any
other JAX call as jax.distributed requires. The work happens in gpt2_jax/training/ (config.py: the flags;
setup.py: everything built before the first step; loop.py: the loop).

The corpus a run without `--dataset` trains on ships with the package: the wheel carries the repository's
`data/shakespeare/*.txt` as `gpt2_jax/corpus/shakespeare/` (pyproject.toml), and a source checkout or an editable
install reads them in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gpt2_jax.cli import run_cli

PACKAGE_DIR = Path(__file__).resolve().parent
CORPUS_LOCATIONS = (PACKAGE_DIR / "corpus" / "shakespeare", PACKAGE_DIR.parent / "data" / "shakespeare")


def bundled_corpus() -> Path:
    """The bundled Shakespeare corpus: inside an installed wheel, else in the source checkout this package is in."""
    return next((p for p in CORPUS_LOCATIONS if p.is_dir()), CORPUS_LOCATIONS[-1])


def main(argv: Sequence[str] | None = None) -> int:
    from gpt2_jax.compile_cache import use_compile_cache
    from gpt2_jax.data.cache import default_cache_dir
    from gpt2_jax.training.config import build_parser, check_ranges, explicit_flags, repair_text_flags
    from gpt2_jax.xla_cpu import use_training_flags

    explicit = explicit_flags(build_parser().parse_args(argv))
    repair_text_flags(explicit)
    check_ranges(explicit)  # flags out of range fail before jax is even imported
    use_training_flags(default_cache_dir())  # XLA reads its flags when its first backend starts: before that
    use_compile_cache(not explicit.get("no_compile_cache"))
    if explicit.get("distributed"):
        from gpt2_jax.training.distributed import initialize

        initialize(explicit.get("coordinator"), explicit.get("num_processes"), explicit.get("process_id"))
    from gpt2_jax.training.loop import run_training

    return run_training(explicit, bundled_dataset=str(bundled_corpus()))


if __name__ == "__main__":
    run_cli(main)
