"""XLA:CPU flags that training turns on by default, where the running jaxlib has them.

YNNPACK's dot fusion (`--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`) runs each matmul
through YNNPACK's kernels: training measured 5-8% faster on a 2-core AMD EPYC and 4.5% on a Xeon with AVX-512,
with the same first-step loss (benchmarks/README.md, "XLA:CPU flags"); decoding was unchanged, so only training
(train.py and the benchmarks' training job) asks for it. The flag is experimental, and XLA aborts the whole process
on a flag it does not know, so it is used only after a throwaway process of this very jaxlib has started with it
and multiplied two matrices; the answer is kept per jaxlib (in the cache folder), so the probe costs one start, once.
XLA reads XLA_FLAGS when its first backend starts: `use_training_flags` must run before any JAX computation. A flag
the user already gives in XLA_FLAGS is left as they set it; GPT2_JAX_XLA_DEFAULTS=0 turns the defaults off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

TRAINING_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",)
PROBE = "import jax, jax.numpy as jnp; (jnp.ones((64, 64)) @ jnp.ones((64, 64))).block_until_ready()"
PROBE_TIMEOUT_S = 300  # a start of jax on a loaded machine; a probe that never ends counts as "not accepted"


def jaxlib_identity() -> str:
    """What decides which flags XLA knows: the jaxlib installed (its version and where it lies)."""
    import importlib.metadata

    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"{version} {sys.prefix}"


def accepted(flag: str, cache_file: str) -> bool:
    """Whether this jaxlib starts with `flag`: remembered in `cache_file`, else probed in a throwaway process."""
    key = f"{jaxlib_identity()} {flag}"
    try:
        with open(cache_file, encoding="utf-8") as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    if key not in known:
        env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
        try:
            probe = subprocess.run(
                [sys.executable, "-c", PROBE], env=env, capture_output=True, timeout=PROBE_TIMEOUT_S, check=False
            )
            known[key] = probe.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False  # not remembered: a later start may probe again
        try:
            os.makedirs(os.path.dirname(cache_file), exist_ok=True)
            with open(f"{cache_file}.tmp-{os.getpid()}", "w", encoding="utf-8") as f:
                json.dump(known, f, indent=1)
            os.replace(f"{cache_file}.tmp-{os.getpid()}", cache_file)
        except OSError:
            pass  # an unwritable cache folder costs a probe per start, nothing else
    return bool(known[key])


def use_training_flags(cache_dir: str) -> list[str]:
    """Add the training flags this jaxlib accepts to XLA_FLAGS (before JAX starts); returns the flags added."""
    if os.environ.get("GPT2_JAX_XLA_DEFAULTS") == "0":
        return []
    current = os.environ.get("XLA_FLAGS", "")
    added = []
    for flag in TRAINING_FLAGS:
        name = flag.split("=", 1)[0]
        if name in current or not accepted(flag, os.path.join(cache_dir, "xla_flags.json")):
            continue
        added.append(flag)
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
