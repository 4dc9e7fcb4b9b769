"""gpt2-jax: GPT-2 in JAX/Flax: load OpenAI / Hugging Face weights, fine-tune on every device, sample fast.

The public Python API is re-exported here (README "Use it from Python"):

    from gpt2_jax import Sampler, load_model
    sampler = Sampler.from_model(load_model("models/124M"))
    texts = sampler.generate(["The meaning of life is"], nsamples=2, length=40)

The names load on first use, so `python -m gpt2_jax.download` starts without importing JAX.

The map, lower layers first: a module imports from its own layer and the ones before it, never from a later one
(tests/test_api.py checks this and that no imports form a cycle).

dependencies.py  a Python without the requirements (or too old) gets one sentence, checked first of all
errors.py console.py io.py  one-sentence user errors, note/warning lines on stderr, crash-safe file writes
hints.py unicode.py  commands named in hints as the user can type them; text that is not valid Unicode, repaired
config.py    `GPT2Config`: the architecture and compute dtype, with presets (124M ... 1558M, mini, tiny)
model/       the training forward (`GPT2`, `init_params`), the parameter table, the cached decode forward, FLOPs
tokenizers/  GPT-2's BPE and SentencePiece behind one `Tokenizer` protocol; `load_tokenizer`
weights/     OpenAI TF checkpoints, Hugging Face safetensors, our native format; `load_model` reads any of them
sampling/    logit processors, the jitted decode loop, its host side, `Sampler`
data/        dataset files, the token cache, the train/validation split, batches
cli.py       what every command shares: `error: ...` lines and exit codes, argparse complaints in one sentence
compile_cache.py  the persistent JAX compilation cache that train and sample turn on
training/    flags, mesh, the jitted step, AdamW, checkpoints, the run directory, the training loop
convert.py download.py evaluate.py prepare.py sample.py train.py  the commands: `python -m gpt2_jax.NAME` (train
             and sample also as root scripts)
commands.py __main__.py  `gpt2-jax NAME ...` (= `python -m gpt2_jax NAME ...`): every command by name
corpus/      (in the wheel only) the bundled Shakespeare corpus, the repository's data/ folder
"""

from __future__ import annotations

from gpt2_jax import dependencies

dependencies.check()  # before anything imports JAX: a Python without it gets one sentence, not a traceback

import importlib  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

__version__ = "0.1.0"

_EXPORTS = {
    "GPT2Config": "gpt2_jax.config",
    "get_config": "gpt2_jax.config",
    "GPT2": "gpt2_jax.model.transformer",
    "init_params": "gpt2_jax.model.transformer",
    "load_model": "gpt2_jax.weights.loading",
    "Sampler": "gpt2_jax.sampling.sampler",
    "generate_text": "gpt2_jax.sampling.sampler",
    "load_tokenizer": "gpt2_jax.tokenizers.gpt2_bpe",
    "UserError": "gpt2_jax.errors",
}
__all__ = [  # _EXPORTS and __version__, spelled out for linters
    "GPT2",
    "GPT2Config",
    "Sampler",
    "UserError",
    "__version__",
    "generate_text",
    "get_config",
    "init_params",
    "load_model",
    "load_tokenizer",
]

if TYPE_CHECKING:  # what type checkers and editors see; at run time `__getattr__` imports on first use
    from gpt2_jax.config import GPT2Config, get_config
    from gpt2_jax.errors import UserError
    from gpt2_jax.model.transformer import GPT2, init_params
    from gpt2_jax.sampling.sampler import Sampler, generate_text
    from gpt2_jax.tokenizers.gpt2_bpe import load_tokenizer
    from gpt2_jax.weights.loading import load_model


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gpt2_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
