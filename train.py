"""Fine-tune GPT-2 on your text (or train a small one from scratch): `python train.py --help` lists every flag.

    python train.py                                            # the demo: a small GPT-2 on the bundled corpus
    python train.py --dataset my.txt --init models/124M        # fine-tune 124M on one device or `--devices all`
    python train.py --dataset my.txt --restore_from latest     # continue runs/run1 where it stopped
    python train.py --distributed ...                          # on every host of a cluster (README: Several machines)

The command lives in gpt2_jax/train.py (installed as `gpt2-jax train`); the work in gpt2_jax/training/.
"""

from gpt2_jax.cli import run_cli
from gpt2_jax.train import main

if __name__ == "__main__":
    run_cli(main)
