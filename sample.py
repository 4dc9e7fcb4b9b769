"""Sample from GPT-2: `python sample.py --help` lists every flag; the command lives in gpt2_jax/sample.py."""

from gpt2_jax.cli import run_cli
from gpt2_jax.sample import main

if __name__ == "__main__":
    run_cli(main)
