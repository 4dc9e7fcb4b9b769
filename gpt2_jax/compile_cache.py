"""The persistent JAX compilation cache that `train.py` and `sample.py` turn on before their first compile.

XLA compiles every jitted function the first time it runs: 4-20 s for the demo's step on a 2-core CPU, minutes
for the large models on an accelerator. JAX can keep the compiled executables on disk, keyed by the program, its
shapes, the devices and the JAX/XLA versions, so that the next start of the same configuration loads them instead
of compiling again; a changed model, batch or device count simply misses. The commands keep the cache in
`$GPT2_JAX_CACHE/jax_cache`, else `$XDG_CACHE_HOME/gpt2_jax/jax_cache`, else `~/.cache/gpt2_jax/jax_cache` (beside
the token caches of read-only data folders); `--no_compile_cache` leaves it off, and deleting the folder is always
safe. Library callers (the Python API, `run_training`) keep JAX's default, no cache, unless they call
`use_compile_cache`.
"""

from __future__ import annotations

import os

from gpt2_jax.console import note

# JAX skips compiles shorter than 1 s by default. Here that would leave out every function of the small models and
# the sampler's prefill and decode chunks (0.2-1 s each on a 2-core CPU) while their sum is most of a start; an
# entry takes a few milliseconds to write and read back, so every compile is kept (and a fast machine behaves as a
# slow one does).
MIN_COMPILE_S = 0.0


def compile_cache_dir() -> str:
    from gpt2_jax.data.cache import default_cache_dir  # imported here: the commands import this module before numpy

    return os.path.join(default_cache_dir(), "jax_cache")


def use_compile_cache(enabled: bool = True) -> str | None:
    """Turn JAX's persistent compilation cache on (call before the first compile); returns its folder, or None
    when it stays off: `enabled` is False, or the folder cannot be written (said in one note)."""
    if not enabled:
        return None
    path = compile_cache_dir()
    try:
        os.makedirs(path, exist_ok=True)
        writable = os.access(path, os.W_OK)
    except OSError:
        writable = False
    if not writable:  # JAX would warn at every compile; one line says it once
        note(f"compiling without the compilation cache: {path} cannot be written (set GPT2_JAX_CACHE elsewhere)")
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
    return path
