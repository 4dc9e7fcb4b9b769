"""Our own model directory, and the params inside a training run's checkpoints.

    OUT/gpt2_jax.json    {"format": "gpt2-jax", "version": 1, "config": {n_vocab, n_ctx, n_embd, n_head, n_layer,
                          layer_norm_epsilon}}  (+ "training": {...} in a run directory)
    OUT/params/          orbax StandardCheckpointer directory of the float32 params pytree
    OUT/gpt2_jax.checksums.json   size and CRC-32 of every file under params/ (see checksums.py)
    OUT/encoder.json + OUT/vocab.bpe  or  OUT/tokenizer.model

A training run (`runs/NAME/`) has the same json and tokenizer, and `checkpoints/<step>/params` (StandardSave items
of an orbax CheckpointManager) instead of `params/`, with the checksums in the step directory when the trainer wrote
them. Whole directories are written under a temporary name beside the destination and renamed into place, so a
crash never leaves a half-written model under the final name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from gpt2_jax.config import GPT2Config, naming_the_file
from gpt2_jax.errors import UserError, first_line, root_cause
from gpt2_jax.io import atomic_write_bytes, quiet_orbax_failures
from gpt2_jax.model.transformer import abstract_params
from gpt2_jax.tokenizers.base import Tokenizer
from gpt2_jax.weights.checksums import verify_checksums, write_checksums

CONFIG_FILE = "gpt2_jax.json"
FORMAT, VERSION = "gpt2-jax", 1
CONFIG_FIELDS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer", "layer_norm_epsilon")


def write_model_json(directory: str | os.PathLike, config: GPT2Config, **extra: Any) -> None:
    record = {"format": FORMAT, "version": VERSION, "config": {k: getattr(config, k) for k in CONFIG_FIELDS}, **extra}
    atomic_write_bytes(Path(directory) / CONFIG_FILE, (json.dumps(record, indent=2) + "\n").encode())


def read_model_json(directory: str | os.PathLike) -> GPT2Config:
    path = Path(directory) / CONFIG_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        fields = record["config"]
        if not isinstance(fields, dict):
            raise TypeError(f"its config is a {type(fields).__name__}, not an object")
    except FileNotFoundError:
        raise UserError(f"{directory} has no {CONFIG_FILE}; it is not a gpt2-jax model or run directory.")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a valid gpt2-jax model file ({e}); convert the model again.")
    if record.get("format") != FORMAT or record.get("version", 0) > VERSION:
        raise UserError(f"{path} is format {record.get('format')!r} v{record.get('version')}; update gpt2-jax.")
    with naming_the_file(path):
        return GPT2Config(**{k: v for k, v in fields.items() if k in CONFIG_FIELDS})


def save_params(params_dir: str | os.PathLike, params: Mapping[str, Any]) -> None:
    """The params pytree, as float32, with orbax (which itself writes to a temporary name and renames).

    Uncompressed: zstd shrinks float weights by under 10% but makes restoring 124M ~2-3x slower on a CPU host and
    saving need ~1.8x the params in extra memory. Any orbax reader (StandardCheckpointer included) reads it.
    """
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    quiet_orbax_failures()  # a failed write is one sentence from the caller, not orbax's tracebacks
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as checkpointer:
        checkpointer.save(Path(params_dir).absolute(), args=ocp.args.PyTreeSave(params))


def load_params(params_dir: str | os.PathLike, config: GPT2Config) -> dict:
    """Restore params, checking their files against saved checksums and every shape against the config first (a clear
    sentence instead of orbax's error, or instead of silently wrong weights)."""
    return load_tree(params_dir, abstract_params(config), f"the config {config.to_hparams()}")


def load_tree(params_dir: str | os.PathLike, abstract: Any, expected: str) -> dict:
    """Restore a pytree of arrays shaped as `abstract` (params, or a LoRA run's adapters), checked as load_params
    says; `expected` names what dictates the shapes, for the error."""
    params_dir = Path(params_dir).absolute()
    # Checksums saved beside params/ (a converted model's, or a training step's) catch what orbax cannot see.
    verify_checksums(params_dir.parent, params_dir.name, advice="use another checkpoint, or convert the model again")
    # Placed on this process's first device whatever mesh wrote them: a run trained on 8 devices (replicated or
    # sharded) samples on one, and orbax refuses to guess a placement for devices it does not see.
    quiet_orbax_failures()  # a damaged file is one sentence below, not tracebacks from orbax's other readers
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    with _quiet_absl(), ocp.StandardCheckpointer() as checkpointer:
        try:
            stored = checkpointer.metadata(params_dir).item_metadata
            stored = stored.tree if hasattr(stored, "tree") else stored
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"Cannot read the params checkpoint {params_dir} ({first_line(e)}); convert it again.")
        stored_shapes = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree.leaves_with_path(stored)}
        for key, leaf in jax.tree.leaves_with_path(target):
            name = jax.tree_util.keystr(key)
            if stored_shapes.get(name) != tuple(leaf.shape):
                raise UserError(
                    f"{params_dir}: param {name} has shape {stored_shapes.get(name)} but {expected} needs "
                    f"{tuple(leaf.shape)}; the params and {CONFIG_FILE} do not match."
                )
        try:
            return checkpointer.restore(params_dir, target)
        except Exception as e:  # orbax wraps tensorstore's errors (truncated, corrupt data) in a bare Exception
            raise UserError(
                f"The params checkpoint {params_dir} is damaged ({first_line(root_cause(e))}); use another checkpoint."
            )


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Hide orbax's warning that a training checkpoint's `params` item has no _CHECKPOINT_METADATA of its own
    (true, and harmless: the step directory has it), which every load of a run would print."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


def save_native_model(
    directory: str | os.PathLike, params: Mapping[str, Any], config: GPT2Config, tokenizer: Tokenizer
) -> None:
    """Fill `directory` (normally the temporary one of `io.atomic_directory`) with a native model."""
    directory = Path(directory)
    save_params(directory / "params", params)
    write_checksums(directory, ["params"])
    tokenizer.save(directory)
    write_model_json(directory, config)


def is_native_model(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / "params").is_dir()


def is_run_directory(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / "checkpoints").is_dir()


def complete_steps(checkpoints_dir: Path) -> list[int]:
    """Steps of a run's `checkpoints/` directory that orbax finalised, oldest first, read without creating anything.

    Only `<step>` directories count: orbax's `<step>.orbax-checkpoint-tmp-...` (a save still running, or killed)
    and anything else found there are not checkpoints."""
    if not checkpoints_dir.is_dir():
        return []
    done = [
        p for p in checkpoints_dir.iterdir() if p.name.isdigit() and p.is_dir() and ocp.utils.is_checkpoint_finalized(p)
    ]
    return sorted(int(p.name) for p in done)
