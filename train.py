"""Fine-tune GPT-2 on your text (or train a small one from scratch): `python train.py --help` lists every flag.

    python train.py                                            # the demo: a small GPT-2 on the bundled corpus
    python train.py --dataset my.txt --init models/124M        # fine-tune 124M on one device or `--devices all`
    python train.py --dataset my.txt --restore_from latest     # continue runs/run1 where it stopped
    python train.py --distributed ...                          # on every host of a cluster (README: Several machines)

The work happens in gpt2_jax/training/ (config.py: the flags; setup.py: everything built before the first step;
loop.py: the loop).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gpt2_jax.cli import run_cli

BUNDLED_DATASET = Path(__file__).resolve().parent / "data" / "shakespeare"


def main(argv: Sequence[str] | None = None) -> int:
    from gpt2_jax.training.config import build_parser, check_ranges, explicit_flags

    explicit = explicit_flags(build_parser().parse_args(argv))
    check_ranges(explicit)  # flags out of range fail before jax is even imported
    if explicit.get("distributed"):  # before any other JAX call, as jax.distributed requires
        from gpt2_jax.training.distributed import initialize

        initialize(explicit.get("coordinator"), explicit.get("num_processes"), explicit.get("process_id"))
    from gpt2_jax.training.loop import run_training

    return run_training(explicit, bundled_dataset=str(BUNDLED_DATASET))


if __name__ == "__main__":
    run_cli(main)
