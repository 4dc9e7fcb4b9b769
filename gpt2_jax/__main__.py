"""`python -m gpt2_jax COMMAND ...`: the `gpt2-jax` command (commands.py) without the console script."""

from gpt2_jax.commands import run

if __name__ == "__main__":
    run()
